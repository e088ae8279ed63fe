"""How often and how patiently the client retries a publish that was not acknowledged.

A retry is safe because every attempt carries the same ``Nats-Msg-Id`` (the
``Symbi-Id``): the ingress stream stores a retried message once. The delays
grow exponentially with "full jitter" (a uniform draw between zero and the
exponential cap), so that many agents that lost the server at the same moment
do not all come back in lock-step when it returns.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from agent_sdk.errors import ConfigError

ENV_MAX_ATTEMPTS: Final = "SYMBIONT_RETRY_MAX_ATTEMPTS"

_RANDOM: Final = secrets.SystemRandom()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts per publish and the backoff between them.

    ``max_attempts`` counts the first attempt (1 means no retry). The wait
    before attempt ``n + 1`` is uniform in ``[0, min(max_delay_s, base_delay_s *
    multiplier ** (n - 1))]``.
    """

    max_attempts: int = 5
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ConfigError("retry delays must not be negative")
        if self.multiplier < 1:
            raise ConfigError(f"multiplier must be at least 1, got {self.multiplier}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetryPolicy:
        """The defaults, with ``SYMBIONT_RETRY_MAX_ATTEMPTS`` applied if set."""
        source = os.environ if env is None else env
        raw = source.get(ENV_MAX_ATTEMPTS)
        if raw is None or not raw.strip():
            return cls()
        return cls(max_attempts=env_int(ENV_MAX_ATTEMPTS, raw, minimum=1))

    def backoff_cap(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 64)  # keep the float finite
        return float(min(self.max_delay_s, self.base_delay_s * self.multiplier**exponent))

    def delay(self, attempt: int) -> float:
        """A jittered wait after failed attempt number ``attempt`` (1-based)."""
        return _RANDOM.uniform(0.0, self.backoff_cap(attempt))


def env_int(name: str, raw: str, *, minimum: int) -> int:
    """``raw`` (the value of environment variable ``name``) as an int of at least ``minimum``."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, raw: str, *, minimum: float) -> float:
    """``raw`` (the value of environment variable ``name``) as a float of at least ``minimum``."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):  # also rejects NaN
        raise ConfigError(f"{name} must be a finite number of at least {minimum}, got {raw!r}")
    return value
