"""Percentiles and the join of what was sent with what was received.

Percentiles use the nearest-rank method (the smallest sample with at least
``p`` % of the samples at or below it): every reported figure is a latency
that some message really had, and p99 of 1,000 samples is the 990th.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank ``p``-th percentile of already sorted, non-empty ``ordered``."""
    if not ordered:
        raise ValueError("percentile of no samples")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    """A latency distribution in milliseconds."""

    count: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(values: Iterable[float]) -> Summary:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples to summarize")
    return Summary(
        count=len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        max=ordered[-1],
        mean=sum(ordered) / len(ordered),
    )


@dataclass(frozen=True, slots=True)
class Sample:
    """One delivered message: which stream and route it was sent on, when, and its latency."""

    stream: int
    route: int
    send_ns: int
    recv_ns: int

    @property
    def latency_ms(self) -> float:
        return (self.recv_ns - self.send_ns) / 1e6


def join(
    messages: Sequence[Sequence[Any]], receipts: Sequence[Sequence[Any]]
) -> tuple[list[Sample], int]:
    """Match the sender's ``[id, stream, route, send_ns]`` with ``[id, recv_ns, ...]`` receipts.

    Returns the samples (in send order) and how many sent messages were never
    received live.
    """
    received = {str(r[0]): int(r[1]) for r in receipts}
    samples: list[Sample] = []
    missing = 0
    for msg_id, stream, route, send_ns in messages:
        recv_ns = received.get(str(msg_id))
        if recv_ns is None:
            missing += 1
            continue
        samples.append(Sample(int(stream), int(route), int(send_ns), recv_ns))
    samples.sort(key=lambda s: s.send_ns)
    return samples, missing
