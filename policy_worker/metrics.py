"""The worker's Prometheus metrics, on an injected registry, all prefixed ``symbi_``.

``symbi up`` sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers, so
prometheus_client keeps these values in per-process files there and ``symbi
up``'s ``/metrics`` endpoint adds up every worker's (those of workers that
died included, so counters never go backwards on a restart). Nothing here
depends on that mode: without the variable the values live in memory, which
is what the unit tests use.

- ``symbi_messages_total{src_tier,dst_tier,type,decision,reason}``: decisions,
  one per recipient, counted when the ingress message is acknowledged;
- ``symbi_decision_seconds{src_tier,dst_tier}``: from the worker receiving a
  message to its final decision (after the replay and rate checks);
- ``symbi_end_to_end_seconds{src_tier,dst_tier}``: from the sender's
  ``Symbi-Time`` to the delivery's PubAck (clock skew between sender and
  worker included; negative values count as zero);
- ``symbi_deadletter_total{src_tier}``: messages parked in the dead-letter stream;
- ``symbi_worker_batch_messages``: ingress messages per batch.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class WorkerMetrics:
    """The metric families of one worker process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "symbi_messages",
            "Policy decisions, one per recipient",
            ["src_tier", "dst_tier", "type", "decision", "reason"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "symbi_decision_seconds",
            "Time from receiving a message to its final decision",
            ["src_tier", "dst_tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "symbi_end_to_end_seconds",
            "Time from the sender's Symbi-Time to the delivery's PubAck",
            ["src_tier", "dst_tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.deadletter = Counter(
            "symbi_deadletter",
            "Ingress messages parked in the dead-letter stream",
            ["src_tier"],
            registry=registry,
        )
        # Labelled children, kept: looking one up costs more than updating it.
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}
        self.batch_messages = Histogram(
            "symbi_worker_batch_messages",
            "Ingress messages per batch",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

    def decision(
        self, src_tier: str, dst_tier: str, msg_type: str, decision: str, reason: str
    ) -> Counter:
        key = ("m", src_tier, dst_tier, msg_type, decision, reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.messages.labels(
                src_tier, dst_tier, msg_type, decision, reason
            )
        assert isinstance(child, Counter)
        return child

    def latency(self, which: str, src_tier: str, dst_tier: str) -> Histogram:
        """``which`` is ``decision`` or ``end_to_end``."""
        key = (which, src_tier, dst_tier)
        child = self._children.get(key)
        if child is None:
            family = self.decision_seconds if which == "decision" else self.end_to_end_seconds
            child = self._children[key] = family.labels(src_tier, dst_tier)
        assert isinstance(child, Histogram)
        return child
