"""A circuit breaker in front of publishing, so that a dead bus fails fast.

Without it, every ``send`` against an unreachable server would spend its whole
retry budget (timeouts plus backoff) before failing, and an agent with a
backlog would stall for minutes. After ``threshold`` consecutive failed
attempts the breaker *opens*: publishes fail at once with
:class:`~agent_sdk.errors.CircuitOpenError`, without touching the network.
After ``reset_s`` it lets exactly one *probe* through (*half-open*); the
probe's success closes it, its failure opens it for another cool-down.

Only transport failures count (timeouts, no responders, lost connection). A
definite answer from the server, even a refusal, proves that the bus is
reachable and counts as a success here; the publisher still reports it.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from agent_sdk.errors import CircuitOpenError, ConfigError
from agent_sdk.retry import env_float, env_int

ENV_THRESHOLD: Final = "SYMBIONT_CIRCUIT_BREAKER_THRESHOLD"
ENV_RESET_S: Final = "SYMBIONT_CIRCUIT_BREAKER_RESET_S"


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """``threshold`` consecutive failures open the circuit for ``reset_s`` seconds."""

    threshold: int = 5
    reset_s: float = 10.0

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ConfigError(f"circuit breaker threshold must be at least 1, got {self.threshold}")
        if not self.reset_s >= 0:
            raise ConfigError(f"circuit breaker reset must not be negative, got {self.reset_s}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CircuitBreakerConfig:
        """The defaults, with ``SYMBIONT_CIRCUIT_BREAKER_THRESHOLD`` / ``_RESET_S`` applied."""
        source = os.environ if env is None else env
        defaults = cls()
        threshold, reset_s = defaults.threshold, defaults.reset_s
        if (raw := source.get(ENV_THRESHOLD, "")).strip():
            threshold = env_int(ENV_THRESHOLD, raw, minimum=1)
        if (raw := source.get(ENV_RESET_S, "")).strip():
            reset_s = env_float(ENV_RESET_S, raw, minimum=0.0)
        return cls(threshold=threshold, reset_s=reset_s)


class CircuitBreaker:
    """Counts consecutive failures and decides whether the next attempt may go out.

    Not thread-safe; one breaker serves one event loop. ``clock`` is injectable
    so that tests need not sleep through a cool-down.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CircuitBreakerConfig()
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._probe_in_flight or self._clock() - self._opened_at >= self.config.reset_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def acquire(self) -> None:
        """Allow one attempt, or raise :class:`CircuitOpenError` at once.

        In the half-open state the first caller becomes the probe; others fail
        fast until the probe reports back.
        """
        if self._opened_at is None:
            return
        if self._probe_in_flight:
            raise CircuitOpenError("publishing is paused: a probe publish is in flight")
        remaining = self.config.reset_s - (self._clock() - self._opened_at)
        if remaining > 0:
            raise CircuitOpenError(
                f"publishing is paused after {self._failures} consecutive failures; "
                f"next attempt allowed in {remaining:.1f} s"
            )
        self._probe_in_flight = True

    def record_success(self) -> None:
        """The attempt reached the server: close the circuit and forget past failures."""
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        """The attempt did not reach the server; open at the threshold or after a failed probe."""
        self._failures += 1
        if self._probe_in_flight or self._failures >= self.config.threshold:
            self._opened_at = self._clock()
        self._probe_in_flight = False

    def release(self) -> None:
        """The attempt ended without an outcome either way (e.g. it was cancelled)."""
        self._probe_in_flight = False
