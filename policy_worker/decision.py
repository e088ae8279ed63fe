"""The policy decision for one message and one recipient: pure, no I/O.

:func:`decide` runs after the envelope has been parsed (``malformed``,
``unsigned``) and its signature verified (``bad_signature``), and before the
two stateful checks that the worker does against JetStream KV: ``replay``
(the nonce store) and ``rate_limited`` (:mod:`policy_worker.rate_limit`, with
the returned policy's ``rate`` and ``burst``). For an event, the worker calls
it once per subscriber. The checks run in this order, and the first failure
names the denial:

1. ``from_mismatch``: ``Symbi-From`` is not the address of the outbox it came from;
2. ``unknown_sender``: the sender is not registered, or is revoked;
3. ``unknown_destination``: the recipient agent is not registered, or is revoked;
4. ``stale``: ``Symbi-Time`` is more than ``max_skew_ms`` from the worker's clock;
5. ``no_policy``: no policy for (sender tier, destination tier);
6. ``type_not_allowed``: the policy does not allow the message type;
7. ``malformed``: ``Symbi-Level`` is not a contract level (parsing catches it first);
8. ``clearance``: the level is above the sender's or the recipient's clearance;
9. ``capability``: the sender lacks a capability that the type requires
   (``control`` needs ``control``, ``rpc`` needs ``rpc``, plus the policy's own);
10. ``no_policy``: the policy's allow/deny lists exclude the sender or the
    recipient, so it does not govern these two parties (``detail`` says which);
11. ``malformed``: the payload exceeds the policy's ``max_payload_bytes``;
12. ``encryption_required``: the policy requires a sealed payload at this level;
13. ``content_filtered``: a content-filter rule matches, or the payload is
    sealed and cannot be inspected where the policy has rules.

Recipient lists are matched against both the delivered-to agent's address and
``Symbi-To`` (so ``event.metrics.*`` and ``gvisor.*`` both work for events).
The contract's reason codes are the only ones used, so audit consumers see a
closed set; ``Decision.detail`` says more, for operators' eyes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args

from agent_sdk.names import LEVEL_RANK, AgentAddress
from broker_gateway.records import AgentRecord
from policy_worker.policy import HOST_TIER, AddressMatcher, Policy, PolicySet

Reason = Literal[
    "ok",
    "malformed",
    "unsigned",
    "bad_signature",
    "from_mismatch",
    "unknown_sender",
    "unknown_destination",
    "stale",
    "replay",
    "no_policy",
    "type_not_allowed",
    "rate_limited",
    "clearance",
    "capability",
    "encryption_required",
    "content_filtered",
]
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)

SealedOpener = Callable[[bytes], bytes]


class EnvelopeLike(Protocol):
    """What :func:`decide` reads of an envelope (``agent_sdk.envelope.Envelope`` fits)."""

    @property
    def sender(self) -> str: ...
    @property
    def to(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def time_ms(self) -> int: ...
    @property
    def level(self) -> str: ...
    @property
    def enc(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one recipient: ``reason`` is ``ok`` or the contract's code."""

    reason: Reason
    policy: Policy | None = None
    detail: str = ""

    @property
    def allowed(self) -> bool:
        return self.reason == "ok"

    def __repr__(self) -> str:
        return f"Decision({self.reason!r}, policy={self.policy_name!r}, detail={self.detail!r})"

    @property
    def policy_name(self) -> str | None:
        return None if self.policy is None else self.policy.name

    @property
    def audited(self) -> bool:
        """Whether an audit record is due: always for a denial, else as the policy says."""
        return self.reason != "ok" or self.policy is None or self.policy.audit_logging


def decide(
    env: EnvelopeLike,
    *,
    arrived_from: AgentAddress,
    sender: AgentRecord | None,
    recipient: AgentRecord | None,
    dst_tier: str,
    policies: PolicySet,
    now_ms: int,
    max_skew_ms: int,
    open_sealed: SealedOpener | None = None,
) -> Decision:
    """Decide whether ``env``, verified and from ``arrived_from``'s outbox, may reach one recipient.

    ``recipient`` is the registry record of the receiving agent, or None for a
    host service (``dst_tier`` ``host``; the worker checks that the service
    exists). ``open_sealed`` opens an ``x25519-sealed`` payload for the
    content filter when the policy sets ``content_filter.inspect_sealed``; the
    delivered bytes are never changed.
    """
    if env.sender != f"{arrived_from.tier}.{arrived_from.id}":
        return Decision("from_mismatch", detail=f"arrived on the outbox of {arrived_from}")
    if sender is None or sender.status != "active":
        return Decision("unknown_sender", detail="not registered" if sender is None else "revoked")
    if sender.tier != arrived_from.tier or sender.id != arrived_from.id:
        return Decision("unknown_sender", detail=f"record is for {sender.tier}.{sender.id}")
    if recipient is None:
        if dst_tier != HOST_TIER:
            return Decision("unknown_destination", detail="recipient not registered")
    elif recipient.status != "active":
        return Decision("unknown_destination", detail="recipient revoked")
    elif recipient.tier != dst_tier:
        return Decision("unknown_destination", detail=f"recipient is not in tier {dst_tier}")
    skew = now_ms - env.time_ms
    if skew > max_skew_ms or -skew > max_skew_ms:
        direction = "behind" if skew > 0 else "ahead of"
        return Decision(
            "stale", detail=f"Symbi-Time is {abs(skew)} ms {direction} the worker's clock"
        )

    policy = policies.lookup(sender.tier, dst_tier)
    if policy is None:
        return Decision("no_policy", detail=f"no policy for {sender.tier} -> {dst_tier}")
    if env.type not in policy.allowed_types:
        return Decision("type_not_allowed", policy)
    rank = LEVEL_RANK.get(env.level)
    if rank is None:
        return Decision("malformed", policy, f"unknown level {env.level!r}")
    if rank > LEVEL_RANK[sender.clearance]:
        return Decision("clearance", policy, f"sender's clearance is {sender.clearance}")
    if recipient is not None and rank > LEVEL_RANK[recipient.clearance]:
        return Decision("clearance", policy, f"recipient's clearance is {recipient.clearance}")
    for capability in policy.required_capabilities.get(env.type, ()):
        if capability not in sender.capabilities:
            return Decision("capability", policy, f"{env.type} requires {capability!r}")
    excluded = _excluded_party(policy, env.sender, env.to, recipient)
    if excluded:
        return Decision("no_policy", policy, excluded)

    payload = env.payload
    if policy.max_payload_bytes is not None and len(payload) > policy.max_payload_bytes:
        return Decision("malformed", policy, f"payload over {policy.max_payload_bytes} bytes")
    sealed = env.enc != "none"
    if not sealed and policy.encryption_min_rank is not None and rank >= policy.encryption_min_rank:
        return Decision("encryption_required", policy)
    if policy.content_filtering and policy.content_filter.rules:
        problem = _filter(policy, payload, sealed, open_sealed)
        if problem:
            return Decision("content_filtered", policy, problem)
    return Decision("ok", policy)


def _excluded_party(
    policy: Policy, sender: str, to: str, recipient: AgentRecord | None
) -> str | None:
    """Why the policy's allow/deny lists exclude this sender or recipient, or None."""
    if policy.deny_senders is not None and policy.deny_senders.matches(sender):
        return "sender is in deny_senders"
    if policy.allow_senders is not None and not policy.allow_senders.matches(sender):
        return "sender is not in allow_senders"
    deny, allow = policy.deny_recipients, policy.allow_recipients
    if deny is None and allow is None:
        return None
    delivered_to = to if recipient is None else f"{recipient.tier}.{recipient.id}"
    if deny is not None and _either(deny, to, delivered_to):
        return "recipient is in deny_recipients"
    if allow is not None and not _either(allow, to, delivered_to):
        return "recipient is not in allow_recipients"
    return None


def _either(matcher: AddressMatcher, to: str, delivered_to: str) -> bool:
    return matcher.matches(to) or (delivered_to != to and matcher.matches(delivered_to))


def _filter(
    policy: Policy, payload: bytes, sealed: bool, open_sealed: SealedOpener | None
) -> str | None:
    """Why the content filter refuses the payload, or None if it passes."""
    content_filter = policy.content_filter
    if sealed:
        if not content_filter.inspect_sealed or open_sealed is None:
            return "sealed payload cannot be inspected"
        try:
            payload = open_sealed(payload)
        except Exception:  # fail closed: whatever went wrong, the filter has not run
            return "sealed payload could not be opened for inspection"
    rule = content_filter.first_match(payload)
    return None if rule is None else f"matched rule {rule!r}"
