"""Deliveries: the sender's message, unchanged, plus the worker's own headers.

The payload and every header the sender set are republished byte for byte
(they are what the envelope signature covers, and what the recipient
verifies), except:

- ``Nats-*`` headers, which instruct JetStream (expected sequences, rollups,
  TTLs) and are the sender's business only on its own outbox; the worker sets
  ``Nats-Msg-Id: <sender address>:<Symbi-Id>:<recipient address>``, scoped to
  the sender so that an agent that saw another's ``Symbi-Id`` cannot suppress
  that agent's deliveries by reusing it, and to the recipient so that each
  subscriber of an event gets its own copy;
- the worker's headers (``Symbi-Sender-Key``, ``Symbi-Route``,
  ``Symbi-Worker``), which a sender must never be able to forge: whatever the
  sender wrote under those names, in any letter case, is replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from agent_sdk.headers import H_MSG_ID
from agent_sdk.route import H_ROUTE, H_SENDER_KEY, H_WORKER
from policy_worker.broker import Publish
from policy_worker.route_tag import RouteSigner

_WORKER_HEADERS: Final = frozenset(h.lower() for h in (H_ROUTE, H_SENDER_KEY, H_WORKER))


def delivery_msg_id(sender: str, msg_id: str, recipient: str) -> str:
    return f"{sender}:{msg_id}:{recipient}"


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The sender's headers that a delivery carries on unchanged."""
    return {
        name: value
        for name, value in headers.items()
        if not name.lower().startswith("nats-") and name.lower() not in _WORKER_HEADERS
    }


def delivery(
    *,
    subject: str,
    headers: Mapping[str, str],
    payload: bytes,
    msg_id: str,
    sender: str,
    sender_key: str,
    recipient: str,
    signer: RouteSigner,
    worker: str,
) -> Publish:
    """The publish of one allowed message to one recipient's inbox (or host service)."""
    out = forwarded_headers(headers)
    out[H_MSG_ID] = delivery_msg_id(sender, msg_id, recipient)
    out[H_SENDER_KEY] = sender_key
    out[H_ROUTE] = signer.tag(
        msg_id=msg_id, sender=sender, recipient=recipient, sender_key=sender_key
    )
    out[H_WORKER] = worker
    return Publish(subject, payload, out)
