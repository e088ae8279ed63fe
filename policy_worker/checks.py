"""The stateless checks of one ingress message: parse, sender, signature, policy.

Everything here is CPU only (the registry is a live in-memory cache), and runs
the contract's checks in its order up to the two that need shared state
(``replay`` and ``rate_limited``, done per batch by the pipeline):

1. ``malformed`` / ``unsigned``: :func:`agent_sdk.envelope.parse`;
2. ``bad_signature``: verified with the key that the registry holds for the
   agent whose outbox the message arrived on. The ingress subject is the only
   proof of who sent a message (JetStream strips the request info), so the
   key is looked up by the subject, never by ``Symbi-From``. A sender that is
   not registered at all has no key to verify with; it is denied
   ``unknown_sender`` (or ``from_mismatch``) by the next step;
3. ``from_mismatch`` ... ``stale`` and the policy checks: per recipient, by
   :func:`~policy_worker.decision.decide`, whose "now" is the ingress
   stream's storage time of the message (see :class:`~policy_worker.ingress.IngressItem`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from nats.aio.msg import Msg

from agent_sdk.envelope import Envelope, parse, verify
from agent_sdk.errors import ContractError, EnvelopeError, SignatureError
from agent_sdk.names import AgentAddress, Destination, parse_outbox_subject
from agent_sdk.signing import Verifier
from policy_worker.decision import Decision, Reason, decide
from policy_worker.ingress import MAX_DETAIL, AuditFields, IngressItem, Target, stage_of
from policy_worker.policy import HOST_TIER, PolicySet
from policy_worker.recipients import EVENT_TIER, NO_TIER, RecipientResolver, RegistryView

_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Checker:
    """Runs the stateless checks; one per worker, shared by every batch."""

    def __init__(
        self,
        *,
        policies: PolicySet,
        registry: RegistryView,
        resolver: RecipientResolver,
        max_skew_ms: int,
        verifier: Verifier | None = None,
    ) -> None:
        self.policies = policies
        self.registry = registry
        self.resolver = resolver
        self.max_skew_ms = max_skew_ms
        self.verifier = verifier or Verifier()

    def inspect(self, msg: Msg, received_at: float) -> IngressItem:
        """An item with one decided target per recipient (or one message-level target)."""
        meta = msg.metadata
        headers = msg.headers
        env: Envelope | None = None
        problem: ContractError | None = None
        try:
            env = _parse(headers, msg.data)
        except ContractError as exc:  # EnvelopeError: malformed; SignatureError: unsigned
            problem = exc
        item = IngressItem(
            msg=msg,
            seq=meta.sequence.stream,
            attempt=meta.num_delivered,
            stored_ms=int(meta.timestamp.timestamp() * 1000),
            received_at=received_at,
            arrived_from=_outbox(msg.subject),
            fields=AuditFields.of(env) if env else AuditFields.read(headers, msg.data),
            env=env,
        )
        if env is None:
            assert problem is not None
            return _message_level(item, problem.reason, str(problem))
        if item.arrived_from is None:
            return _message_level(item, "malformed", "not received on an agent's outbox subject")
        sender = self.registry.get(str(item.arrived_from))
        item.sender = sender
        if sender is not None:
            try:
                verify(env, sender.public_key, verifier=self.verifier)
            except SignatureError as exc:
                return _message_level(item, "bad_signature", str(exc))
        for r in self.resolver.resolve(env.to, env.sender):
            decision = decide(
                env,
                arrived_from=item.arrived_from,
                sender=sender,
                recipient=r.record,
                dst_tier=r.decide_tier,
                policies=self.policies,
                now_ms=item.stored_ms,
                max_skew_ms=self.max_skew_ms,
            )
            if r.address is not None and r.decide_tier == NO_TIER and r.audit_tier == HOST_TIER:
                decision = _unknown_host(decision)
            item.targets.append(
                Target(r.address, r.audit_tier, r.subject, decision, stage_of(decision))
            )
        return item


def _parse(headers: Mapping[str, str] | None, payload: bytes) -> Envelope:
    """:func:`agent_sdk.envelope.parse`, and every header name a valid token.

    nats-py accepts odd header names when it reads a message but refuses to
    send them, so a name that is not an RFC 7230 token would make every
    delivery of the message fail: it is malformed here instead.
    """
    for name in headers or ():
        if not _TOKEN_RE.fullmatch(name):
            raise EnvelopeError(f"header name {name[:64]!r} is not a token")
    return parse(headers, payload)


def _outbox(subject: str) -> AgentAddress | None:
    try:
        return parse_outbox_subject(subject)
    except EnvelopeError:
        return None


def _unknown_host(decision: Decision) -> Decision:
    if decision.reason == "unknown_destination":
        return Decision("unknown_destination", detail="not a known host service")
    return decision


def _message_level(item: IngressItem, reason: str, detail: str) -> IngressItem:
    """Deny the whole message before it has recipients: one record, recipient null."""
    item.targets = [
        Target(
            None,
            _audit_tier(item.fields.to),
            None,
            Decision(_reason(reason), detail=detail[:MAX_DETAIL]),
            "final",
        )
    ]
    return item


def _reason(reason: str) -> Reason:
    if reason in ("malformed", "unsigned", "bad_signature"):
        return reason  # type: ignore[return-value]  # narrowed by the test above
    return "malformed"


def _audit_tier(to: str | None) -> str:
    """The audit subject's destination token for a message denied before resolution."""
    if to is None:
        return NO_TIER
    dest = Destination.parse(to)  # AuditFields only keeps a valid Symbi-To
    if dest.kind == "agent" and dest.agent is not None:
        return dest.agent.tier
    return HOST_TIER if dest.kind == "host" else EVENT_TIER
