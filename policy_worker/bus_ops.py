"""The ``host.bus`` service: agents change their own event subscriptions at run time.

An agent sends a ``data`` message to ``host.bus`` whose payload is JSON::

    {"op": "subscribe", "topics": ["metrics.cpu", "alerts.>"]}
    {"op": "unsubscribe", "topics": ["alerts.>"]}

Like any message it is checked and audited first; only once it is allowed
does the worker rewrite the sender's ``subscriptions`` in the registry. The
write is a read-modify-write with compare-and-set on the entry's revision,
retried on conflict, so it never overwrites a concurrent change (a revocation
above all: ``Registry.update`` writes a whole record computed beforehand and
could resurrect a revoked agent, so it is not used here). Ops are idempotent
(set semantics), so a redelivered op applies harmlessly a second time. A
payload that is not a valid op is still delivered to ``host.bus.in`` like any
message to a host service; the audit record's ``detail`` says why it was not
applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import ValidationError

from agent_sdk.errors import BrokerError, EnvelopeError
from broker_gateway.records import AgentRecord
from broker_gateway.streams import REGISTRY_BUCKET
from policy_worker.broker import JetStreamIO, RevisionConflict
from policy_worker.topics import check_pattern

BUS_SERVICE: Final = "bus"
BUS_ADDRESS: Final = f"host.{BUS_SERVICE}"
MAX_TOPICS_PER_OP: Final = 64
MAX_SUBSCRIPTIONS: Final = 256
MAX_OP_BYTES: Final = 64 * 1024
_CAS_ATTEMPTS: Final = 10

OpName = Literal["subscribe", "unsubscribe"]


@dataclass(frozen=True, slots=True)
class BusOp:
    """A validated subscription change."""

    op: OpName
    topics: tuple[str, ...]


def parse_bus_op(payload: bytes) -> BusOp:
    """The op in a ``host.bus`` payload, or :class:`EnvelopeError` saying what is wrong."""
    if len(payload) > MAX_OP_BYTES:
        raise EnvelopeError(f"op larger than {MAX_OP_BYTES} bytes")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError("payload is not a JSON op") from exc
    if not isinstance(body, dict) or set(body) != {"op", "topics"}:
        raise EnvelopeError('op must be {"op": ..., "topics": [...]}')
    op, topics = body["op"], body["topics"]
    if op not in ("subscribe", "unsubscribe"):
        raise EnvelopeError("op must be 'subscribe' or 'unsubscribe'")
    if not isinstance(topics, list) or not 1 <= len(topics) <= MAX_TOPICS_PER_OP:
        raise EnvelopeError(f"topics must be a list of 1 to {MAX_TOPICS_PER_OP} patterns")
    return BusOp(op, tuple(dict.fromkeys(check_pattern(t) for t in topics)))


def applied(current: tuple[str, ...], op: BusOp) -> tuple[str, ...]:
    """``current`` subscriptions after ``op``, in a stable order."""
    if op.op == "unsubscribe":
        drop = set(op.topics)
        return tuple(t for t in current if t not in drop)
    result = tuple(dict.fromkeys((*current, *op.topics)))
    if len(result) > MAX_SUBSCRIPTIONS:
        raise EnvelopeError(f"an agent may hold at most {MAX_SUBSCRIPTIONS} subscriptions")
    return result


class SubscriptionWriter:
    """Applies allowed ops to the registry with compare-and-set."""

    def __init__(self, io: JetStreamIO, bucket: str = REGISTRY_BUCKET) -> None:
        self.io = io
        self.bucket = bucket

    async def apply(self, address: str, op: BusOp) -> str:
        """Apply ``op`` to ``address``'s record; a one-line outcome for the audit detail.

        Raises :class:`BrokerError` only for broker failures (the message is
        then retried); problems with the op itself are reported in the result.
        """
        for _ in range(_CAS_ATTEMPTS):
            entry = await self.io.kv_get(self.bucket, address)
            if entry is None:
                return "bus: sender is not registered"
            try:
                record = AgentRecord.model_validate_json(entry.value)
            except ValidationError:
                return "bus: sender's registry record is unreadable"
            if not record.active:
                return "bus: sender is revoked"
            try:
                subscriptions = applied(record.subscriptions, op)
            except EnvelopeError as exc:
                return f"bus: not applied: {exc}"
            if subscriptions == record.subscriptions:
                return f"bus: {op.op}: nothing to change"
            updated = record.model_copy(update={"subscriptions": subscriptions})
            try:
                await self.io.kv_write(
                    self.bucket, address, updated.model_dump_json().encode(), entry.revision
                )
            except RevisionConflict:
                continue
            return f"bus: {op.op}d {', '.join(op.topics)}"[:200]
        raise BrokerError(f"registry record of {address} is changing concurrently")
