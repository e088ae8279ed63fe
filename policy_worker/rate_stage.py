"""The rate stage of a batch: one admission per (sender, policy), all in flight together.

:func:`start_rate` first admits what this worker's local reserves cover
(:meth:`~policy_worker.rate_store.RateStore.admit_local`, no I/O, no task), then
schedules the compare-and-sets of :class:`~policy_worker.rate_store.RateStore`
for the rest without waiting, so that the pipeline can send them in the same
flush as the batch's nonce creates; :func:`rated` collects which messages went
over their rate, and :func:`limit` denies those as ``rate_limited``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass

from agent_sdk.errors import BrokerError
from policy_worker.decision import Decision
from policy_worker.ingress import IngressItem
from policy_worker.policy import Policy
from policy_worker.rate_store import RateStore, rate_key

Over = tuple[IngressItem, Policy, Decision]


@dataclass(slots=True)
class Pending:
    """A group that its reserve did not cover: its first ``local`` members are admitted."""

    policy: Policy
    members: list[IngressItem]
    local: int


@dataclass(slots=True)
class Rating:
    """Admissions under way: the groups that needed the shared state, and their results.

    ``admissions`` is None when there was nothing to send: no rated message, or
    every group admitted in full from the local reserves.
    """

    groups: list[Pending]
    admissions: asyncio.Future[list[int | BaseException]] | None


def _groups(items: list[IngressItem]) -> dict[str, tuple[Policy, list[IngressItem]]]:
    """The rated messages of ``items`` by rate key (sender, policy), in arrival order."""
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
    return groups


def start_rate(rates: RateStore, items: list[IngressItem]) -> Rating:
    """Admit ``items`` from the local reserves, and start one admission per other group.

    The shared admissions are scheduled, not yet sent.
    """
    pending: list[Pending] = []
    calls: list[Awaitable[int]] = []
    for key, (policy, members) in _groups(items).items():
        now_ms = max(i.stored_ms for i in members)
        local = rates.admit_local(key, now_ms, len(members))
        if local == len(members):
            continue
        pending.append(Pending(policy, members, local))
        calls.append(
            rates.admit(
                key,
                now_ms=now_ms,
                rate=policy.rate,
                burst=policy.burst,
                n=len(members) - local,
            )
        )
    if not calls:
        return Rating([], None)
    return Rating(pending, asyncio.gather(*calls, return_exceptions=True))


async def rated(rating: Rating) -> list[Over]:
    """The messages over their rate, once the admissions are done."""
    if rating.admissions is None:
        return []
    results = await rating.admissions
    over: list[Over] = []
    for group, result in zip(rating.groups, results, strict=True):
        policy, members = group.policy, group.members
        if isinstance(result, BrokerError):
            for item in members[group.local :]:  # the reserve's are decided already
                item.fail(f"rate limiter: {result}")
            continue
        if isinstance(result, BaseException):
            raise result
        admitted = group.local + result
        if admitted < len(members):
            limited = Decision(
                "rate_limited",
                policy,
                f"over {policy.rate:g} messages/s (burst {policy.burst})",
            )
            over.extend((item, policy, limited) for item in members[admitted:])
    return over


def limit(over: list[Over]) -> None:
    """Deny as ``rate_limited`` the targets that the rate check did not admit."""
    for item, policy, limited in over:
        for target in item.targets:
            if target.stage == "rated" and target.policy is policy:
                target.decision = limited
