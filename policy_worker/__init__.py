"""Policy workers: check every message against the wire contract and the policies, then route it."""

from policy_worker.config import WorkerConfig
from policy_worker.content_filter import ContentFilter, FilterRule
from policy_worker.decision import REASONS, Decision, EnvelopeLike, Reason, decide
from policy_worker.metrics import WorkerMetrics
from policy_worker.policy import (
    Policy,
    PolicySet,
    default_policies,
    load_policies,
    parse_policies,
)
from policy_worker.rate_limit import take
from policy_worker.worker import Worker

__all__ = [
    "REASONS",
    "ContentFilter",
    "Decision",
    "EnvelopeLike",
    "FilterRule",
    "Policy",
    "PolicySet",
    "Reason",
    "Worker",
    "WorkerConfig",
    "WorkerMetrics",
    "decide",
    "default_policies",
    "load_policies",
    "parse_policies",
    "take",
]
