"""One ingress message as it moves through a batch, and its per-recipient targets.

A message has one :class:`Target` per recipient (one for an agent or a host
service, one per subscriber for an event), or a single message-level target
(``recipient`` None) when it is denied before it has recipients: malformed,
unsigned, a bad signature, an event nobody subscribes to. Each target carries
the :class:`~policy_worker.decision.Decision` for it and the :data:`Stage`
that the decision reached in the contract's order of checks, which says what
the two stateful checks still have to do:

- ``final``: denied before the replay check (``malformed`` ... ``stale``):
  nothing stateful applies, and the same input always decides the same way;
- ``pre_rate``: denied after the replay check but before the rate check
  (``no_policy`` for a missing pair, ``type_not_allowed``): the nonce is
  recorded, no rate token is spent;
- ``rated``: everything else (allowed, or denied by a later check): the
  message spends one token of the policy's rate, and is ``rate_limited`` if
  none is left.

:class:`AuditFields` are read once per message, best effort, so that even a
malformed message is audited with whatever fields can be read (null for the
rest) and never with its payload.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from nats.aio.msg import Msg

from agent_sdk.envelope import Envelope
from agent_sdk.errors import EnvelopeError
from agent_sdk.headers import H_FROM, H_ID, H_LEVEL, H_TIME, H_TO, H_TYPE, ID_RE
from agent_sdk.names import LEVELS, MESSAGE_TYPES, AgentAddress, Destination
from broker_gateway.records import AgentRecord
from policy_worker.decision import Decision
from policy_worker.policy import Policy

Stage = Literal["final", "pre_rate", "rated"]
PRE_REPLAY_REASONS: Final = frozenset(
    {"from_mismatch", "unknown_sender", "unknown_destination", "stale"}
)
_TIME_RE: Final = re.compile(r"0|[1-9][0-9]{0,14}")
MAX_DETAIL: Final = 300


def stage_of(decision: Decision) -> Stage:
    """Where ``decision`` stands relative to the replay and rate checks (see module doc)."""
    if decision.reason in PRE_REPLAY_REASONS:
        return "final"
    if decision.reason == "type_not_allowed" or (
        decision.reason == "no_policy" and decision.policy is None
    ):
        return "pre_rate"
    return "rated"


@dataclass(slots=True)
class Target:
    """One recipient of a message (or the message itself, when ``recipient`` is None).

    ``dst_tier`` is the audit subject's last token: the recipient's tier,
    ``host``, or for a message-level record ``event`` / ``unknown`` when no
    single tier applies. ``subject`` is where an allowed delivery goes.
    """

    recipient: str | None
    dst_tier: str
    subject: str | None
    decision: Decision
    stage: Stage

    @property
    def policy(self) -> Policy | None:
        return self.decision.policy


@dataclass(slots=True)
class AuditFields:
    """The message fields an audit record shows, each None where it cannot be read."""

    id: str | None
    sender: str | None
    to: str | None
    type: str | None
    level: str | None
    sent_time: int | None
    size: int
    payload_sha256: str

    @classmethod
    def of(cls, env: Envelope) -> AuditFields:
        """The fields of a parsed envelope (all valid by then)."""
        return cls(
            id=env.id,
            sender=env.sender,
            to=env.to,
            type=env.type,
            level=env.level,
            sent_time=env.time_ms,
            size=len(env.payload),
            payload_sha256=hashlib.sha256(env.payload).hexdigest(),
        )

    @classmethod
    def read(cls, headers: Mapping[str, str] | None, payload: bytes) -> AuditFields:
        """Read each field on its own, so one bad header does not hide the others."""
        h = headers or {}
        return cls(
            id=_valid(h.get(H_ID), lambda v: ID_RE.fullmatch(v) is not None),
            sender=_valid(h.get(H_FROM), _is_address),
            to=_valid(h.get(H_TO), _is_destination),
            type=_valid(h.get(H_TYPE), lambda v: v in MESSAGE_TYPES),
            level=_valid(h.get(H_LEVEL), lambda v: v in LEVELS),
            sent_time=_time(h.get(H_TIME)),
            size=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
        )


@dataclass(slots=True)
class IngressItem:
    """One ingress message and everything the batch learns about it.

    ``stored_ms`` is the ingress stream's storage time of the message: it is
    the "now" of the freshness and rate checks, so that a redelivery of the
    same message (after a worker died) decides exactly as the first delivery
    did, however late it comes. ``error`` is set when an internal failure
    (never the message's content) prevents finishing it; such a message is
    retried, then dead-lettered. ``redelivered`` is set for a message that an
    earlier attempt may have decided already (see :mod:`policy_worker.pipeline`).
    """

    msg: Msg
    seq: int
    attempt: int
    stored_ms: int
    received_at: float
    arrived_from: AgentAddress | None
    fields: AuditFields
    env: Envelope | None = None
    sender: AgentRecord | None = None
    targets: list[Target] = field(default_factory=list)
    redelivered: bool = False
    bus_detail: str | None = None
    error: str | None = None

    @property
    def src_tier(self) -> str:
        return self.arrived_from.tier if self.arrived_from is not None else "unknown"

    @property
    def needs_nonce(self) -> bool:
        """Whether the replay check applies: some target got past the pre-replay checks."""
        return self.env is not None and any(t.stage != "final" for t in self.targets)

    @property
    def nonce_key(self) -> str:
        """``<tier>.<id>.<nonce>`` of the sender that the ingress subject proves."""
        assert self.env is not None and self.arrived_from is not None
        return f"{self.arrived_from.tier}.{self.arrived_from.id}.{self.env.nonce}"

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why[:MAX_DETAIL]


def _valid(value: str | None, check: Callable[[str], bool]) -> str | None:
    if value is None or len(value) > 256:
        return None
    return value if check(value) else None


def _is_address(value: str) -> bool:
    try:
        AgentAddress.parse(value)
    except EnvelopeError:
        return False
    return True


def _is_destination(value: str) -> bool:
    try:
        Destination.parse(value)
    except EnvelopeError:
        return False
    return True


def _time(value: str | None) -> int | None:
    if value is None or not _TIME_RE.fullmatch(value):
        return None
    return int(value)
