"""Names and subjects of the wire contract ``symbi/1``.

Everything that turns an agent id into a NATS subject goes through here, and
every id is validated first: the NATS server inserts a user's name verbatim
into its permission template, so an id such as ``*`` or ``a.>`` must never
reach a JWT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

from agent_sdk.errors import EnvelopeError

Tier = Literal["docker", "gvisor", "firecracker"]
TIERS: Final[tuple[Tier, ...]] = get_args(Tier)

MessageType = Literal["control", "data", "event", "rpc"]
MESSAGE_TYPES: Final[tuple[MessageType, ...]] = get_args(MessageType)

Level = Literal["public", "restricted", "confidential", "secret"]
LEVELS: Final[tuple[Level, ...]] = get_args(Level)
LEVEL_RANK: Final[dict[str, int]] = {level: rank for rank, level in enumerate(LEVELS)}

AGENT_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TOPIC_TOKEN_RE: Final = re.compile(r"^[a-z0-9_-]+$")
HOST_NAME_RE: Final = AGENT_ID_RE
MAX_TOPIC_TOKENS: Final = 8

CONTRACT: Final = "symbi/1"


def check_tier(tier: str) -> Tier:
    """Return ``tier`` if it is one of the contract's tiers, else raise."""
    if tier not in TIERS:
        raise EnvelopeError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)}")
    return tier


def check_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` if it matches ``^[a-z0-9][a-z0-9_-]{0,62}$``, else raise."""
    if not AGENT_ID_RE.fullmatch(agent_id):
        raise EnvelopeError(
            f"invalid agent id {agent_id!r}: expected 1-63 of [a-z0-9_-], starting with [a-z0-9]"
        )
    return agent_id


def check_topic(topic: str) -> str:
    """Return ``topic`` if it is one to eight dot-separated ``[a-z0-9_-]+`` tokens."""
    tokens = topic.split(".")
    if not 1 <= len(tokens) <= MAX_TOPIC_TOKENS or not all(
        TOPIC_TOKEN_RE.fullmatch(t) for t in tokens
    ):
        raise EnvelopeError(f"invalid event topic {topic!r}")
    return topic


@dataclass(frozen=True, slots=True)
class AgentAddress:
    """``<tier>.<agent id>``, e.g. ``docker.a1``."""

    tier: Tier
    id: str

    @classmethod
    def parse(cls, address: str) -> AgentAddress:
        tier, sep, agent_id = address.partition(".")
        if not sep:
            raise EnvelopeError(f"invalid agent address {address!r}: expected <tier>.<id>")
        return cls(check_tier(tier), check_agent_id(agent_id))

    def __str__(self) -> str:
        return f"{self.tier}.{self.id}"

    @property
    def outbox(self) -> str:
        return outbox_subject(self.tier, self.id)

    @property
    def inbox(self) -> str:
        return inbox_subject(self.tier, self.id)


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed ``Symbi-To``: an agent, an event topic or a host service."""

    kind: Literal["agent", "event", "host"]
    value: str
    agent: AgentAddress | None = None

    @classmethod
    def parse(cls, to: str) -> Destination:
        head, sep, rest = to.partition(".")
        if not sep:
            raise EnvelopeError(f"invalid destination {to!r}")
        if head == "event":
            return cls("event", check_topic(rest))
        if head == "host":
            if not HOST_NAME_RE.fullmatch(rest):
                raise EnvelopeError(f"invalid host service {to!r}")
            return cls("host", rest)
        agent = AgentAddress.parse(to)
        return cls("agent", str(agent), agent)


def outbox_subject(tier: str, agent_id: str) -> str:
    return f"tier.{check_tier(tier)}.agent.{check_agent_id(agent_id)}.out"


def inbox_subject(tier: str, agent_id: str) -> str:
    return f"tier.{check_tier(tier)}.agent.{check_agent_id(agent_id)}.in"


def audit_subject(decision: str, src_tier: str, dst_tier: str) -> str:
    return f"audit.{decision}.{src_tier}.{dst_tier}"


def parse_outbox_subject(subject: str) -> AgentAddress:
    """The sender that a message's ingress subject proves (``tier.<t>.agent.<id>.out``)."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != "tier" or parts[2] != "agent" or parts[4] != "out":
        raise EnvelopeError(f"not an outbox subject: {subject!r}")
    return AgentAddress(check_tier(parts[1]), check_agent_id(parts[3]))
