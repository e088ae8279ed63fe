"""The replay check: a (sender, nonce) pair seen by one worker is a replay for every other.

The shared state is the KV bucket ``symbi_nonces`` (TTL = the deduplication
window, at least twice the allowed clock skew, so an entry outlives the time
in which its message could pass the ``stale`` check). Each message that gets
past the pre-replay checks costs ONE ``create`` of the key
``<tier>.<id>.<nonce>`` (the sender proven by the ingress subject), made
*after* its decision and rate check, whose value records the outcome::

    <ingress stream seq>|<reason>                        one recipient
    <ingress stream seq>|<address>=<reason>,...          an event, per subscriber

If the create fails because the key exists, the entry is read:

- same ingress sequence: this is a redelivery of the very message whose first
  attempt died before acknowledging (a worker was killed). The stored outcome
  is reused, recipients included, so a crash never turns an allowed message
  into a denied one or the reverse, and deliveries and audit records (which
  carry per-message ``Nats-Msg-Id``\\ s) come out identical and deduplicated;
- another sequence: a replay.

A redelivered message (``num_delivered`` > 1) is looked up *before* the rate
check, so that its retry does not spend the sender's rate a second time.
All reads and writes of a batch are sent at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from agent_sdk.errors import BrokerError, EnvelopeError
from agent_sdk.names import AgentAddress, inbox_subject
from broker_gateway.streams import NONCE_BUCKET
from policy_worker.broker import JetStreamIO, RevisionConflict
from policy_worker.decision import REASONS, Decision, Reason
from policy_worker.ingress import IngressItem, Target, stage_of
from policy_worker.policy import PolicySet
from policy_worker.recipients import EVENT_TIER

_CLAIM_ROUNDS: Final = 3
# Reasons decided before a policy is looked up: a reused one carries no policy.
_NO_POLICY_REASONS: Final = frozenset(
    {"malformed", "unsigned", "bad_signature", "from_mismatch", "unknown_sender",
     "unknown_destination", "stale", "replay"}
)  # fmt: skip
REUSED_DETAIL: Final = "decided at an earlier delivery of this ingress message"


@dataclass(frozen=True, slots=True)
class NonceRecord:
    """A decoded entry: the first ingress sequence and its outcome (single or per recipient)."""

    seq: int | None
    reason: Reason | None = None
    per_recipient: tuple[tuple[str, Reason], ...] | None = None


def encode(item: IngressItem) -> bytes:
    """The entry value for ``item`` as decided now."""
    assert item.env is not None
    if item.env.type == "event":
        body = ",".join(f"{t.recipient or '-'}={t.decision.reason}" for t in item.targets)
    else:
        body = item.targets[0].decision.reason
    return f"{item.seq}|{body}".encode("ascii")


def decode(raw: bytes) -> NonceRecord:
    """Read an entry; an unreadable one decodes with ``seq`` None (then: a replay)."""
    try:
        text = raw.decode("ascii")
        seq_text, _, body = text.partition("|")
        seq = int(seq_text)
    except (UnicodeDecodeError, ValueError):
        return NonceRecord(None)
    if "=" not in body:
        single = _as_reason(body)
        return NonceRecord(seq if single is not None else None, single)
    pairs: list[tuple[str, Reason]] = []
    for part in body.split(","):
        address, _, reason = part.partition("=")
        checked = _as_reason(reason)
        if checked is None:
            return NonceRecord(None)
        pairs.append((address, checked))
    return NonceRecord(seq, per_recipient=tuple(pairs))


def _as_reason(text: str) -> Reason | None:
    return text if text in REASONS else None


def mark_replay(item: IngressItem, first_seq: int | None) -> None:
    """Deny every target that reached the replay check as ``replay``."""
    where = f" by ingress message {first_seq}" if first_seq is not None else ""
    for target in item.targets:
        if target.stage != "final":
            target.decision = Decision(
                "replay", detail=f"nonce {item.env.nonce if item.env else '?'} already used{where}"
            )
            target.stage = "final"
    item.resolved = True


def adopt(item: IngressItem, record: NonceRecord, policies: PolicySet) -> None:
    """Reuse the outcome stored by an earlier delivery of the same ingress message."""
    if record.per_recipient is not None:
        current = {t.recipient: t for t in item.targets}
        item.targets = [
            _reused(current.get(address), address, reason, item, policies)
            for address, reason in record.per_recipient
        ]
    elif record.reason is not None and len(item.targets) == 1:
        target = item.targets[0]
        if target.decision.reason != record.reason:
            target.decision = _decision(
                record.reason, target.decision, item, target.dst_tier, policies
            )
            target.stage = stage_of(target.decision)
    else:  # a corrupt entry (only the router can write there): fail closed
        mark_replay(item, record.seq)
    item.resolved = True


def _reused(
    target: Target | None, address: str, reason: Reason, item: IngressItem, policies: PolicySet
) -> Target:
    if target is None:  # a subscriber then but not now: it still gets what it was given
        try:
            agent: AgentAddress | None = AgentAddress.parse(address)
        except EnvelopeError:
            agent = None
        if agent is None:
            target = Target(None, EVENT_TIER, None, Decision(reason), "final")
        else:
            target = Target(
                address, agent.tier, inbox_subject(agent.tier, agent.id), Decision(reason), "final"
            )
        target.decision = _decision(reason, target.decision, item, target.dst_tier, policies)
    elif target.decision.reason != reason:
        target.decision = _decision(reason, target.decision, item, target.dst_tier, policies)
    target.stage = stage_of(target.decision)
    return target


def _decision(
    reason: Reason, fresh: Decision, item: IngressItem, dst_tier: str, policies: PolicySet
) -> Decision:
    policy = None
    if reason not in _NO_POLICY_REASONS:
        policy = fresh.policy or policies.lookup(item.src_tier, dst_tier)
    return Decision(reason, policy, REUSED_DETAIL)


class NonceStore:
    """Creates and reads nonce entries, a whole batch at a time."""

    def __init__(self, io: JetStreamIO, bucket: str = NONCE_BUCKET) -> None:
        self.io = io
        self.bucket = bucket

    async def recall(self, keys: Sequence[str]) -> list[NonceRecord | BrokerError | None]:
        """The current entry of each key (None if absent), read concurrently."""
        results = await asyncio.gather(
            *(self.io.kv_get(self.bucket, key) for key in keys), return_exceptions=True
        )
        out: list[NonceRecord | BrokerError | None] = []
        for result in results:
            if isinstance(result, BrokerError):
                out.append(result)
            elif isinstance(result, BaseException):
                raise result  # a bug, not a broker failure: let the batch fail loudly
            else:
                out.append(None if result is None else decode(result.value))
        return out

    async def claim(
        self, entries: Sequence[tuple[str, bytes]]
    ) -> list[NonceRecord | BrokerError | None]:
        """Create each key with its value; None where created, else the existing entry.

        A key that exists at create time but has expired by the time it is
        read is simply created again (up to a few rounds).
        """
        out: list[NonceRecord | BrokerError | None] = [None] * len(entries)
        todo = list(range(len(entries)))
        for _ in range(_CLAIM_ROUNDS):
            writes = [
                self.io.kv_write_request(self.bucket, entries[i][0], entries[i][1], 0) for i in todo
            ]
            results = await self.io.publish_all(writes)
            conflicts = []
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, RevisionConflict):
                    conflicts.append(i)
                elif isinstance(result, BrokerError):
                    out[i] = result
            if not conflicts:
                return out
            existing = await self.recall([entries[i][0] for i in conflicts])
            todo = []
            for i, record in zip(conflicts, existing, strict=True):
                if record is None:
                    todo.append(i)  # expired meanwhile: create again
                else:
                    out[i] = record
            if not todo:
                return out
        for i in todo:
            out[i] = BrokerError(f"nonce {entries[i][0]} keeps appearing and expiring")
        return out
