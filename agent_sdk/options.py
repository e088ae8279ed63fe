"""Tunables of :class:`~agent_sdk.client.AgentClient`, validated once at start-up.

Defaults suit one agent on one machine; :meth:`ClientOptions.from_env` applies
the ``SYMBIONT_*`` variables that the runtime documents (retry attempts and
the circuit breaker), so an operator can tune agents without code changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent_sdk.circuit import CircuitBreakerConfig
from agent_sdk.errors import ConfigError
from agent_sdk.retry import RetryPolicy


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How the client publishes, reads its inbox and waits for answers.

    - ``publish_timeout_s``: wait for one PubAck before the attempt counts as failed.
    - ``request_timeout_s``: default wait for an rpc answer.
    - ``prefetch``: deliveries taken from the durable inbox ahead of the user;
      each is acknowledged only once handled, so keep it small next to the
      consumer's ``max_ack_pending`` (1000).
    - ``fetch_timeout_s``: how long one pull waits on an empty inbox; also the
      longest :meth:`close` waits for the reader to stop.
    - ``progress_interval_s``: how often a delivery still being handled is
      reported in progress, so the server does not redeliver it after its
      ack wait (30 s).
    - ``dedup_window``: how many handled (sender, id) pairs are remembered.
    - ``max_deliveries``: handler failures after which :meth:`handle` gives up
      on a message (terminates it) instead of retrying for ever.
    - ``nak_delay_max_s``: cap of the redelivery backoff after a handler failure.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    publish_timeout_s: float = 2.0
    request_timeout_s: float = 10.0
    prefetch: int = 16
    fetch_timeout_s: float = 1.0
    progress_interval_s: float = 10.0
    dedup_window: int = 10_000
    max_deliveries: int = 5
    nak_delay_max_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("publish_timeout_s", "request_timeout_s", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if not self.progress_interval_s > 0 or not self.nak_delay_max_s >= 0:
            raise ConfigError("progress_interval_s must be positive, nak_delay_max_s not negative")
        for name in ("prefetch", "dedup_window", "max_deliveries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientOptions:
        """Defaults with ``SYMBIONT_RETRY_*`` and ``SYMBIONT_CIRCUIT_BREAKER_*`` applied.

        Change anything else with :func:`dataclasses.replace` on the result.
        """
        return cls(retry=RetryPolicy.from_env(env), circuit=CircuitBreakerConfig.from_env(env))
