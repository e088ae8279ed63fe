"""The worker's internal configuration, validated once at start-up.

Everything that the command line and the environment can set ends up in one
frozen :class:`WorkerConfig`; the rest of the worker never reads the
environment, so a test can build a worker with any settings in-process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent_sdk.errors import ConfigError
from agent_sdk.names import HOST_NAME_RE
from policy_worker.policy import PolicySet, default_policies

DEFAULT_HOST_SERVICES: Final = frozenset({"launcher", "bus"})
DEFAULT_BATCH: Final = 256
DEFAULT_INFLIGHT: Final = 4
DEFAULT_MAX_SKEW_MS: Final = 30_000
DEFAULT_LINGER_US: Final = 0  # 500 us measured no gain on the bench machine: off
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class WorkerConfig:
    """What one policy worker process needs; see ``python -m policy_worker --help``.

    ``batch`` bounds both a batch and the messages a worker asks the server
    for ahead of time (its pull window), so a worker never holds more than
    about ``(inflight + 1) * batch`` unacknowledged messages (in bytes, a
    batch stops at 4 MiB and the pull window at two requests of 5 MiB, see
    :mod:`policy_worker.consumer`, whatever the message size); ``inflight``
    batches are processed at once (they mostly wait for the broker); while one
    is, the next starts with fewer than a few messages only once the oldest has
    waited ``linger_s`` (0: never waits). Batches of at least
    ``crypto_min_batch`` messages are checked on ``crypto_threads`` more
    threads too (0: none). ``max_attempts`` is how many deliveries of one
    ingress message may fail internally (timeouts, a broker hiccup) before it
    goes to the dead-letter stream; retries back off from ``retry_base_s`` up
    to ``retry_max_s``, so every retry of a message lands well inside the
    streams' 120 s deduplication window.
    """

    name: str
    state_dir: Path
    nats_url: str
    creds: Path
    policies: PolicySet = field(default_factory=default_policies)
    batch: int = DEFAULT_BATCH
    inflight: int = DEFAULT_INFLIGHT
    linger_s: float = DEFAULT_LINGER_US / 1e6
    crypto_threads: int = 0
    crypto_min_batch: int = 32
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    host_services: frozenset[str] = DEFAULT_HOST_SERVICES
    pull_expires_s: float = 1.0
    op_timeout_s: float = 5.0
    max_attempts: int = 5
    retry_base_s: float = 0.25
    retry_max_s: float = 4.0
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ConfigError(
                f"worker name {self.name!r}: expected 1-64 of [A-Za-z0-9_.-], starting with a"
                " letter or digit"
            )
        if not 1 <= self.batch <= 4096:
            raise ConfigError(f"batch {self.batch}: must be between 1 and 4096")
        if not 1 <= self.inflight <= 64:
            raise ConfigError(f"in-flight batches {self.inflight}: must be between 1 and 64")
        if not 0 <= self.crypto_threads <= 16 or self.crypto_min_batch < 1:
            raise ConfigError("crypto threads: 0 to 16, from batches of at least 1 message")
        if not 0 <= self.linger_s <= 0.1:
            raise ConfigError(f"linger {self.linger_s} s: must be between 0 and 0.1 s")
        if not 0 < self.max_skew_ms <= 3_600_000:
            raise ConfigError(f"max skew {self.max_skew_ms} ms: must be > 0 and at most 1 hour")
        for service in self.host_services:
            if not HOST_NAME_RE.fullmatch(service):
                raise ConfigError(f"host service {service!r}: not a valid host service name")
        if self.max_attempts < 1:
            raise ConfigError(f"max attempts {self.max_attempts}: must be >= 1")
        if self.pull_expires_s <= 0 or self.op_timeout_s <= 0:
            raise ConfigError("pull expiry and operation timeout must be positive")

    def backoff_s(self, attempt: int) -> float:
        """Delay before redelivery after the ``attempt``-th failed delivery (1-based)."""
        return float(min(self.retry_max_s, self.retry_base_s * 2 ** max(0, attempt - 1)))
