"""Who a message goes to: an agent, a host service, or every subscriber of a topic.

Resolution reads only the live registry cache (no I/O). For ``Symbi-To``:

- ``<tier>.<id>``: that agent, delivered to ``tier.<tier>.agent.<id>.in``;
- ``host.<name>``: a known host service, delivered to ``host.<name>.in``
  (the HOST stream);
- ``event.<topic>``: every active agent, other than the sender, one of whose
  ``subscriptions`` patterns matches the topic, in address order.

An unknown agent, an unknown host service or a topic without subscribers
resolves to a single :class:`Recipient` without a record, for which
:func:`~policy_worker.decision.decide` answers ``unknown_destination`` (after
the sender checks, as the contract orders them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from agent_sdk.names import Destination, inbox_subject
from broker_gateway.records import AgentRecord
from policy_worker.policy import HOST_TIER
from policy_worker.topics import pattern_matches

# A destination tier that no policy governs and that is not "host": decide()
# then reports unknown_destination for a recipient without a record.
NO_TIER: Final = "unknown"
EVENT_TIER: Final = "event"


class RegistryView(Protocol):
    """What resolution reads of the registry (``broker_gateway.RegistryCache`` fits)."""

    records: dict[str, AgentRecord]

    def get(self, address: str) -> AgentRecord | None: ...


@dataclass(slots=True)
class Recipient:
    """One resolved recipient.

    ``address`` is None for a message-level outcome (no recipient exists);
    ``decide_tier`` is what to pass to ``decide`` as ``dst_tier`` and
    ``audit_tier`` the last token of the audit subject.
    """

    address: str | None
    record: AgentRecord | None
    subject: str | None
    decide_tier: str
    audit_tier: str


def host_subject(name: str) -> str:
    return f"host.{name}.in"


class RecipientResolver:
    """Turns a parsed destination into recipients, from the registry cache."""

    def __init__(self, registry: RegistryView, host_services: frozenset[str]) -> None:
        self.registry = registry
        self.host_services = host_services

    def resolve(self, to: str, sender: str) -> list[Recipient]:
        dest = Destination.parse(to)  # already validated by the envelope parser
        if dest.kind == "agent":
            assert dest.agent is not None
            tier = dest.agent.tier
            record = self.registry.get(dest.value)
            return [Recipient(dest.value, record, inbox_subject(tier, dest.agent.id), tier, tier)]
        if dest.kind == "host":
            if dest.value in self.host_services:
                return [Recipient(to, None, host_subject(dest.value), HOST_TIER, HOST_TIER)]
            return [Recipient(to, None, None, NO_TIER, HOST_TIER)]
        subscribers = self.subscribers(dest.value, sender)
        if not subscribers:
            return [Recipient(None, None, None, NO_TIER, EVENT_TIER)]
        return [
            Recipient(r.address, r, inbox_subject(r.tier, r.id), r.tier, r.tier)
            for r in subscribers
        ]

    def subscribers(self, topic: str, sender: str) -> list[AgentRecord]:
        """Active agents other than ``sender`` subscribed to ``topic``, by address."""
        records: Mapping[str, AgentRecord] = self.registry.records
        found = [
            r
            for r in records.values()
            if r.subscriptions
            and r.active
            and r.address != sender
            and any(pattern_matches(p, topic) for p in r.subscriptions)
        ]
        found.sort(key=lambda r: r.address)
        return found
