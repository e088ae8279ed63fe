"""Who sends to whom in each phase, sized so that no sender hits its rate limit.

The router enforces each policy's per-sender rate and burst. A benchmark
that ran into them would measure denials, not routing, so traffic is spread
over enough sender agents that each stays at or below half of its policy's
rate (open-loop phases) or half of its burst (backlog phases). The limiter
still runs for every message (one compare-and-set per sender and policy per
batch, as in production); it just never says no. Every phase gets fresh
agents, so no rate state, inbox or consumer carries over between phases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from agent_sdk.names import TIERS, Tier
from bench.bus import AgentRef, Bus
from bench.spec import Route
from policy_worker.policy import Policy, PolicySet

HEADROOM = 0.5


@dataclass(frozen=True, slots=True)
class Pair:
    """A (source tier, destination tier) pair and the policy that governs it."""

    src: Tier
    dst: Tier
    policy: Policy

    @property
    def label(self) -> str:
        return f"{self.src}->{self.dst}"


def tier_pairs(policies: PolicySet) -> list[Pair]:
    """Every agent-to-agent pair of the policies in use that allows ``data``."""
    pairs = []
    for src in TIERS:
        for dst in TIERS:
            policy = policies.lookup(src, dst)
            if policy is not None and "data" in policy.allowed_types:
                pairs.append(Pair(src, dst, policy))
    return pairs


def pair(policies: PolicySet, src: Tier, dst: Tier) -> Pair:
    policy = policies.lookup(src, dst)
    if policy is None or "data" not in policy.allowed_types:
        raise ValueError(f"the policies in use allow no data from {src} to {dst}")
    return Pair(src, dst, policy)


def senders_for_rate(rate: float, policy: Policy) -> int:
    return max(1, math.ceil(rate / (policy.rate * HEADROOM)))


def senders_for_count(count: int, policy: Policy) -> int:
    return max(1, math.ceil(count / max(1.0, policy.burst * HEADROOM)))


@dataclass
class Cast:
    """The agents of one phase and the routes between them."""

    senders: list[AgentRef]
    receivers: list[AgentRef]
    routes: list[Route]


async def cast(bus: Bus, prefix: str, pairs: Sequence[tuple[Pair, int]], *, sealed: bool) -> Cast:
    """Register ``n`` senders per pair and one receiver per destination tier.

    Routes are interleaved across pairs (sender 0 of every pair, then sender 1
    ...), so that a stream cycling over them mixes the pairs evenly in time.
    """
    receivers: dict[str, AgentRef] = {}
    per_pair: list[list[Route]] = []
    senders: list[AgentRef] = []
    for index, (p, n) in enumerate(pairs):
        if p.dst not in receivers:
            receivers[p.dst] = await bus.register(p.dst, f"{prefix}-r{len(receivers)}")
        receiver = receivers[p.dst]
        routes = []
        for i in range(n):
            sender = await bus.register(p.src, f"{prefix}-p{index}s{i}")
            senders.append(sender)
            routes.append(
                Route(
                    str(sender.directory),
                    receiver.address,
                    receiver.encryption_public_key,
                    sealed,
                    p.label,
                )
            )
        per_pair.append(routes)
    interleaved = [
        routes[i] for i in range(max(map(len, per_pair))) for routes in per_pair if i < len(routes)
    ]
    return Cast(senders, list(receivers.values()), interleaved)
