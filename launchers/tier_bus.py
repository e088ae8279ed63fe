"""The launcher service's handle on the bus: one tier, no operator key.

:class:`TierBus` offers what :class:`launchers.launch.Launcher` needs of a
gateway (register, revoke, the registry), with only the files that
:mod:`launchers.service_files` names: it mints agents of its tier with the
tier's scoped signing key, writes their registry records and inbox consumers
as a restricted router-account user, and asks the gateway of ``symbi up`` to
revoke them (re-signing the tier's account takes the operator key, which it
never holds).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from agent_sdk.errors import AgentNotFoundError, BrokerError, ConfigError, SandboxError
from agent_sdk.names import Level, check_agent_id, check_tier
from broker_gateway.keys import keypair
from broker_gateway.registration import AgentCredentials, TierSigner, register
from broker_gateway.registry import Registry
from broker_gateway.revoke_service import revoke_subject
from broker_gateway.state import StateDir
from launchers.service_files import ServiceFiles, inbox_prefix

log = logging.getLogger(__name__)

REVOKE_TIMEOUT_S = 10.0


async def _log_nats_error(exc: Exception) -> None:
    # Permission violations, lost connections: subjects at most, never a payload.
    log.warning("nats: %s", exc)


class TierBus:
    """Registration and revocation of one tier's agents, for a launcher service."""

    def __init__(self, files: ServiceFiles, url: str, nc: Client) -> None:
        self.files = files
        self.tier = check_tier(files.tier)
        self.url = url
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self._registry: Registry | None = None

    @classmethod
    async def connect(cls, state: StateDir, tier: str, url: str) -> TierBus:
        files = ServiceFiles.read(state, tier)
        try:
            nc = await nats.connect(
                url,
                user_credentials=str(files.creds),
                inbox_prefix=inbox_prefix(tier).encode(),
                name=f"symbi-launcher-{tier}",
                error_cb=_log_nats_error,
                max_reconnect_attempts=-1,
                connect_timeout=5,
            )
        except (NatsError, OSError) as exc:
            raise BrokerError(f"cannot connect to NATS at {url}: {exc}") from exc
        return cls(files, url, nc)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()

    async def registry(self) -> Registry:
        if self._registry is None:
            try:
                self._registry = await Registry.open(self.js)
            except NatsError as exc:
                raise BrokerError(f"cannot open the registry: {exc}") from exc
        return self._registry

    def _signer(self) -> TierSigner:
        try:
            seed = self.files.scope_key_path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the {self.tier} tier's signing key "
                f"{self.files.scope_key_path}: {exc.strerror}"
            ) from exc
        return TierSigner(
            self.tier, keypair(seed), self.files.account_public_key, self.files.router_public_key
        )

    def _own(self, tier: str) -> None:
        if check_tier(tier) != self.tier:
            raise SandboxError(f"the {self.tier} launcher cannot act on {tier} agents")

    async def register_agent(
        self,
        tier: str,
        agent_id: str,
        clearance: Level = "restricted",
        capabilities: tuple[str, ...] = (),
        subscriptions: tuple[str, ...] = (),
        reserved_ok: bool = False,
    ) -> AgentCredentials:
        self._own(tier)
        try:
            return await register(
                self.js,
                await self.registry(),
                self._signer(),
                self.url,
                agent_id,
                clearance=clearance,
                capabilities=capabilities,
                subscriptions=subscriptions,
                reserved_ok=reserved_ok,
            )
        except NatsError as exc:
            raise BrokerError(f"registering {tier}.{agent_id} failed: {exc}") from exc

    async def revoke_agent(self, tier: str, agent_id: str) -> None:
        """Ask the gateway to revoke ``<tier>.<agent_id>`` (registry and account JWT)."""
        self._own(tier)
        check_agent_id(agent_id)
        try:
            reply = await self.nc.request(
                revoke_subject(tier),
                json.dumps({"id": agent_id}).encode(),
                timeout=REVOKE_TIMEOUT_S,
            )
            answer: dict[str, Any] = json.loads(reply.data)
        except (NatsError, ValueError) as exc:
            raise BrokerError(
                f"the gateway did not revoke {tier}.{agent_id} ({exc}): is `symbi up` running?"
            ) from exc
        if answer.get("ok") is True:
            return
        detail = str(answer.get("detail") or answer.get("error"))
        if answer.get("error") == "not_found":
            raise AgentNotFoundError(detail)
        raise BrokerError(f"the gateway refused to revoke {tier}.{agent_id}: {detail}")
