"""The launcher services as child processes of ``symbi up``.

``symbi up`` looks (quickly, :mod:`launchers.availability`) which tiers'
runtimes are present and runs ``python -m launchers --tier T`` for each,
supervised like the policy workers. Whatever the answer, it prepares every
tier's service files (:mod:`launchers.service_files`) and creates the shared
``launcher-<tier>`` consumers before it reports ready, so that a control
message sent from then on waits for a launcher instead of being missed.
A launcher process connects in the background: ``symbi up`` never waits for
one, and never fails because a runtime is missing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from agent_sdk.errors import BrokerError
from agent_sdk.names import TIERS
from broker_gateway.accounts import build_trust
from broker_gateway.runtime import ChildSpec, Runtime
from launchers.availability import TierRuntime, probe, summary
from launchers.service_files import ensure_control_consumer, prepare


@dataclass
class LauncherChildren:
    """What ``symbi up`` runs for the launchers, and the line that says so."""

    enabled: bool
    runtimes: list[TierRuntime] = field(default_factory=list)
    _prepared: bool = False

    @classmethod
    def plan(cls, enabled: bool) -> LauncherChildren:
        return cls(enabled, probe() if enabled else [])

    def children(self, runtime: Runtime) -> list[ChildSpec]:
        """The child specs; on the first call, the service files of every tier too."""
        if not self._prepared:
            trust = build_trust(runtime.state.keys, {})  # public keys only are used
            for tier in TIERS:
                prepare(runtime.state, trust, tier)
            self._prepared = True
        return [
            ChildSpec(f"launcher-{r.tier}", [sys.executable, "-m", "launchers", "--tier", r.tier])
            for r in self.runtimes
            if r.available
        ]

    async def ensure_consumers(self, js: JetStreamContext) -> None:
        try:
            for tier in TIERS:
                await ensure_control_consumer(js, tier)
        except NatsError as exc:
            raise BrokerError(f"cannot create the launchers' consumers: {exc}") from exc

    def summary(self) -> str:
        if not self.enabled:
            return "launchers: off (--no-launchers)"
        return f"launchers: {summary(self.runtimes)}"
