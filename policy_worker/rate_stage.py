"""The rate stage of a batch: one admission per (sender, policy), all in flight together.

:func:`start_rate` schedules the compare-and-sets of
:class:`~policy_worker.rate_store.RateStore` without waiting, so that the
pipeline can send them in the same flush as the batch's nonce creates;
:func:`rated` collects which messages went over their rate, and
:func:`limit` denies those as ``rate_limited``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agent_sdk.errors import BrokerError
from policy_worker.decision import Decision
from policy_worker.ingress import IngressItem
from policy_worker.policy import Policy
from policy_worker.rate_store import RateStore, rate_key

Over = tuple[IngressItem, Policy, Decision]


@dataclass(slots=True)
class Rating:
    """Admissions under way: (policy, its messages) per rate key, and their results."""

    groups: list[tuple[Policy, list[IngressItem]]]
    admissions: asyncio.Future[list[int | BaseException]] | None


def start_rate(rates: RateStore, items: list[IngressItem]) -> Rating:
    """Start one admission per (sender, policy) of ``items`` (scheduled, not yet sent)."""
    groups: dict[str, tuple[Policy, list[IngressItem]]] = {}
    for item in items:
        if item.error is not None or item.arrived_from is None:
            continue
        sender = str(item.arrived_from)
        seen: set[str] = set()
        for target in item.targets:
            policy = target.policy
            if target.stage != "rated" or policy is None or policy.name in seen:
                continue
            seen.add(policy.name)
            groups.setdefault(rate_key(sender, policy.name), (policy, []))[1].append(item)
    if not groups:
        return Rating([], None)
    admissions = asyncio.gather(
        *(
            rates.admit(
                key,
                now_ms=max(i.stored_ms for i in members),
                rate=policy.rate,
                burst=policy.burst,
                n=len(members),
            )
            for key, (policy, members) in groups.items()
        ),
        return_exceptions=True,
    )
    return Rating(list(groups.values()), admissions)


async def rated(rating: Rating) -> list[Over]:
    """The messages over their rate, once the admissions are done."""
    if rating.admissions is None:
        return []
    results = await rating.admissions
    over: list[Over] = []
    for (policy, members), result in zip(rating.groups, results, strict=True):
        if isinstance(result, BrokerError):
            for item in members:
                item.fail(f"rate limiter: {result}")
            continue
        if isinstance(result, BaseException):
            raise result
        if result < len(members):
            limited = Decision(
                "rate_limited",
                policy,
                f"over {policy.rate:g} messages/s (burst {policy.burst})",
            )
            over.extend((item, policy, limited) for item in members[result:])
    return over


def limit(over: list[Over]) -> None:
    """Deny as ``rate_limited`` the targets that the rate check did not admit."""
    for item, policy, limited in over:
        for target in item.targets:
            if target.stage == "rated" and target.policy is policy:
                target.decision = limited
