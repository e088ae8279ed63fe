"""The replay check: a (sender, nonce) pair seen by one worker is a replay for every other.

The shared state is the KV bucket ``symbi_nonces`` (TTL = the deduplication
window, at least twice the allowed clock skew, so an entry outlives the time
in which its message could pass the ``stale`` check). Each message that gets
past the pre-replay checks costs ONE ``create`` of the key
``<tier>.<id>.<nonce>`` (the sender proven by the ingress subject), whose
value records only which ingress message claimed it::

    <ingress stream seq>                                 a message to one recipient
    <ingress stream seq>|<address>,<address>,...         an event, its recipients then

The value does not depend on the rate check, so the create goes out in the
same flush as the rate limiter's compare-and-set (:mod:`policy_worker.pipeline`).
A replay therefore spends a token of its sender's rate before it is denied:
only the owner of an outbox can publish on it, so those tokens are its own.

If the create fails because the key exists, the entry is read:

- same ingress sequence: a redelivery of the very message whose earlier
  attempt died before acknowledging. The outcome of that attempt is in its
  audit records, which the pipeline treats as authoritative (see there); the
  recorded recipients of an event are kept, so a subscriber that left in
  between still gets what its first attempt may have promised it;
- another sequence: a replay.

Entries written by earlier versions (``<seq>|<reason>`` and
``<seq>|<address>=<reason>,...``) are read too: only their sequence and
recipients count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent_sdk.errors import BrokerError, EnvelopeError
from agent_sdk.names import AgentAddress, inbox_subject
from broker_gateway.streams import NONCE_BUCKET
from policy_worker.broker import JetStreamIO, RevisionConflict
from policy_worker.decision import REASONS, Decision
from policy_worker.ingress import IngressItem, Target
from policy_worker.policy import PolicySet

_CLAIM_ROUNDS: Final = 3
# Reasons decided before a policy is looked up: a reused one carries no policy.
_NO_POLICY_REASONS: Final = frozenset(
    {"malformed", "unsigned", "bad_signature", "from_mismatch", "unknown_sender",
     "unknown_destination", "stale", "replay"}
)  # fmt: skip
REUSED_DETAIL: Final = "decided at an earlier delivery of this ingress message"
NO_LONGER_SUBSCRIBED: Final = "a recipient at an earlier delivery, no longer subscribed"


@dataclass(frozen=True, slots=True)
class NonceRecord:
    """A decoded entry: the ingress sequence that claimed it, and an event's recipients."""

    seq: int | None
    recipients: tuple[str, ...] | None = None


def encode(item: IngressItem) -> bytes:
    """The entry value for ``item``."""
    assert item.env is not None
    if item.env.type == "event":
        listed = ",".join(t.recipient for t in item.targets if t.recipient is not None)
        return f"{item.seq}|{listed}".encode("ascii")
    return str(item.seq).encode("ascii")


def decode(raw: bytes) -> NonceRecord:
    """Read an entry; an unreadable one decodes with ``seq`` None (then: a replay)."""
    try:
        text = raw.decode("ascii")
        seq_text, sep, body = text.partition("|")
        seq = int(seq_text)
    except (UnicodeDecodeError, ValueError):
        return NonceRecord(None)
    if not sep:
        return NonceRecord(seq)
    if body in REASONS:  # an earlier version's single outcome
        return NonceRecord(seq)
    recipients = tuple(part.partition("=")[0] for part in body.split(",") if part)
    return NonceRecord(seq, recipients)


def mark_replay(item: IngressItem, first_seq: int | None) -> None:
    """Deny every target that reached the replay check as ``replay``."""
    where = f" by ingress message {first_seq}" if first_seq is not None else ""
    for target in item.targets:
        if target.stage != "final":
            target.decision = Decision(
                "replay", detail=f"nonce {item.env.nonce if item.env else '?'} already used{where}"
            )
            target.stage = "final"


def keep_recipients(item: IngressItem, record: NonceRecord) -> None:
    """Add the recorded recipients of an event that it no longer resolves to.

    Each gets a denial for now; if its earlier attempt audited an outcome, the
    pipeline adopts that outcome instead (and delivers if it was ``ok``).
    """
    if not record.recipients:
        return
    present = {t.recipient for t in item.targets}
    for address in record.recipients:
        if address in present:
            continue
        try:
            agent = AgentAddress.parse(address)
        except EnvelopeError:
            continue  # only the router writes there; an odd entry adds nobody
        item.targets.append(
            Target(
                address,
                agent.tier,
                inbox_subject(agent.tier, agent.id),
                Decision("unknown_destination", detail=NO_LONGER_SUBSCRIBED),
                "final",
            )
        )


def adopted(
    record: Mapping[str, Any], target: Target, src_tier: str, policies: PolicySet
) -> Decision | None:
    """The decision of an earlier attempt, from its audit record (None if unreadable).

    The policy is the one now in force for the pair, if it still has the
    recorded name (a reused decision is only ever delivered or counted).
    """
    reason = record.get("reason")
    if reason not in REASONS or record.get("recipient") != target.recipient:
        return None
    if (record.get("decision") == "allow") != (reason == "ok"):
        return None
    policy = None
    name = record.get("policy")
    if isinstance(name, str) and reason not in _NO_POLICY_REASONS:
        policy = policies.lookup(src_tier, target.dst_tier)
        if policy is None or policy.name != name:
            policy = policies.get(name)
    if reason == "ok" and policy is None:
        return None  # nothing governs the pair any more: cannot vouch for the delivery
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
