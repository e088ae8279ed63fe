"""Audit records: one JSON object per decision (per recipient), never the payload.

Published on ``audit.<allow|deny>.<src tier>.<dst tier|host>`` (the AUDIT
stream) with ``Nats-Msg-Id: audit:<ingress seq>:<recipient or ->``, so a
redelivered ingress message never adds a second record for the same
recipient. Besides the contract's fields (``id``, ``from``, ``to``, ``type``,
``level``, ``decision``, ``reason``, ``policy``, ``worker``, ``time``,
``sent_time``, ``size``, ``payload_sha256``) a record has ``recipient`` (the
agent or host service address, null for a message denied before it had
recipients), ``detail`` (a human-readable why, for operators), ``ingress_seq``
and ``outbox`` (the sender that the ingress subject proves, which for a
malformed message may be all that is known about it).

For a malformed message every field that cannot be read is null; the source
tier is ``unknown`` only if even the ingress subject is not an agent outbox.
For a message denied before it had recipients, the destination token is the
tier of ``Symbi-To`` if it names an agent, ``host``, ``event`` for an event
topic, or ``unknown``.
"""

from __future__ import annotations

import json
from typing import Any

from agent_sdk.headers import H_MSG_ID
from agent_sdk.names import audit_subject
from policy_worker.broker import Publish
from policy_worker.ingress import IngressItem, Target


def audit_msg_id(seq: int, recipient: str | None) -> str:
    return f"audit:{seq}:{recipient or '-'}"


def audit_record(item: IngressItem, target: Target, *, worker: str, now_ms: int) -> dict[str, Any]:
    f = item.fields
    decision = target.decision
    return {
        "id": f.id,
        "from": f.sender,
        "to": f.to,
        "type": f.type,
        "level": f.level,
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason,
        "policy": decision.policy_name,
        "worker": worker,
        "time": now_ms,
        "sent_time": f.sent_time,
        "size": f.size,
        "payload_sha256": f.payload_sha256,
        "recipient": target.recipient,
        "detail": decision.detail or None,
        "ingress_seq": item.seq,
        "outbox": str(item.arrived_from) if item.arrived_from is not None else None,
    }


def audit_publish(item: IngressItem, target: Target, *, worker: str, now_ms: int) -> Publish:
    """The publish of the audit record of ``target``'s decision."""
    record = audit_record(item, target, worker=worker, now_ms=now_ms)
    subject = audit_subject(record["decision"], item.src_tier, target.dst_tier)
    body = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return Publish(subject, body, {H_MSG_ID: audit_msg_id(item.seq, target.recipient)})
