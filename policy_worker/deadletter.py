"""The dead-letter stream: where a message goes that the worker could not finish.

Only internal failures lead here (the broker timing out, a stream refusing a
write), never a message's content: content is always decided and audited.
After ``max_attempts`` failed deliveries of one ingress message, the original
payload and headers are published to ``deadletter.<src tier>`` (the
DEADLETTER stream) with the reason, and only then is the ingress message
acknowledged, so nothing is ever dropped silently. ``Nats-*`` headers of the
original are left out (they would instruct the dead-letter stream), and the
ingress sequence makes the publish idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from agent_sdk.headers import H_MSG_ID
from policy_worker.broker import Publish

H_DL_REASON: Final = "Symbi-Deadletter-Reason"
H_DL_SUBJECT: Final = "Symbi-Ingress-Subject"
H_DL_SEQ: Final = "Symbi-Ingress-Seq"
H_DL_ATTEMPTS: Final = "Symbi-Deadletter-Attempts"
H_DL_WORKER: Final = "Symbi-Deadletter-Worker"
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def deadletter_subject(src_tier: str) -> str:
    return f"deadletter.{src_tier}"


def deadletter(
    *,
    subject: str,
    headers: Mapping[str, str] | None,
    payload: bytes,
    seq: int,
    src_tier: str,
    reason: str,
    attempts: int,
    worker: str,
) -> Publish:
    """The publish that parks one ingress message, with why, in the dead-letter stream."""
    out = {k: v for k, v in (headers or {}).items() if not k.lower().startswith("nats-")}
    out[H_DL_REASON] = _CONTROL.sub(" ", reason)[:512]
    out[H_DL_SUBJECT] = _CONTROL.sub(" ", subject)[:256]
    out[H_DL_SEQ] = str(seq)
    out[H_DL_ATTEMPTS] = str(attempts)
    out[H_DL_WORKER] = worker
    out[H_MSG_ID] = f"deadletter:{seq}"
    return Publish(deadletter_subject(src_tier), payload, out)
