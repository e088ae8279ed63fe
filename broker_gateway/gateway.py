"""The gateway: the host side's administrative operations on the bus.

It connects to NATS as the router's service user (streams, registry, inbox
consumers) and as the system user (pushing account JWTs), and is what
``symbi up``, ``symbi agent register/revoke/list`` and the launchers call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError, ServiceUnavailableError

from agent_sdk.errors import BrokerError, RegistryError
from agent_sdk.names import Level, check_agent_id, check_tier
from broker_gateway.accounts import Trust, build_trust, inbox_stream
from broker_gateway.keys import public_key, route_signer_seed
from broker_gateway.records import AgentRecord
from broker_gateway.registration import AgentCredentials, TierSigner, register
from broker_gateway.registry import Registry
from broker_gateway.state import StateDir
from broker_gateway.streams import REVOCATIONS_BUCKET, StreamSettings, ensure_all
from broker_gateway.users import DEFAULT_AGENT_TTL_S, MAX_AGENT_TTL_S, agent_jwt

log = logging.getLogger(__name__)

__all__ = ["AgentCredentials", "Gateway"]


class Gateway:
    """Connected administrative handle on one symbi bus."""

    def __init__(self, state: StateDir, url: str, router: Client, system: Client) -> None:
        self.state = state
        self.url = url
        self.router = router
        self.system = system
        self.js: JetStreamContext = router.jetstream()
        self._registry: Registry | None = None

    @classmethod
    async def connect(cls, state: StateDir, url: str) -> Gateway:
        try:
            router = await nats.connect(
                url,
                user_credentials=str(state.service_creds("router")),
                name="symbi-gateway",
                max_reconnect_attempts=3,
                connect_timeout=5,
            )
            system = await nats.connect(
                url,
                user_credentials=str(state.service_creds("sys")),
                name="symbi-gateway-sys",
                max_reconnect_attempts=3,
                connect_timeout=5,
            )
        except (NatsError, OSError) as exc:
            raise BrokerError(f"cannot connect to NATS at {url}: {exc}") from exc
        return cls(state, url, router, system)

    async def close(self) -> None:
        for nc in (self.router, self.system):
            if not nc.is_closed:
                await nc.close()

    async def registry(self) -> Registry:
        if self._registry is None:
            self._registry = await Registry.open(self.js)
        return self._registry

    # -- accounts -----------------------------------------------------------

    async def revocations(self) -> dict[str, dict[str, int]]:
        """``{tier: {user public key: revoked at}}`` from the revocations bucket."""
        kv = await self.js.key_value(REVOCATIONS_BUCKET)
        result: dict[str, dict[str, int]] = {}
        try:
            keys = await kv.keys()
        except NoKeysError:
            return result
        oldest = int(time.time()) - MAX_AGENT_TTL_S
        for key in keys:
            tier, _, user = key.partition(".")
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            revoked_at = int((entry.value or b"0").decode())
            if revoked_at < oldest:
                # Every JWT issued before it has expired: keep the account short.
                await kv.delete(key)
                continue
            result.setdefault(tier, {})[user] = revoked_at
        return result

    async def trust(self) -> Trust:
        return build_trust(self.state.keys, await self.revocations())

    async def push_accounts(self, tiers: list[str] | None = None) -> None:
        """Send the current account JWTs to the server's resolver (applies at once)."""
        trust = await self.trust()
        for name in tiers if tiers is not None else list(trust.account_jwts):
            try:
                reply = await self.system.request(
                    "$SYS.REQ.CLAIMS.UPDATE", trust.account_jwts[name].encode(), timeout=5
                )
            except NatsError as exc:
                raise BrokerError(f"pushing account {name} failed: {exc}") from exc
            body = json.loads(reply.data)
            if "error" in body:
                raise BrokerError(f"account {name} refused: {body['error'].get('description')}")

    async def ensure_streams(self, settings: StreamSettings, wait_s: float = 60.0) -> None:
        """Create the streams; a cluster that is still electing its leader is waited for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                await ensure_all(self.js, settings)
                return
            except (ServiceUnavailableError, NatsTimeoutError) as exc:
                if loop.time() > deadline:
                    raise BrokerError(f"JetStream is not available: {exc}") from exc
                await asyncio.sleep(1.0)
            except NatsError as exc:
                raise BrokerError(f"cannot create the streams: {exc}") from exc

    # -- agents -------------------------------------------------------------

    async def register_agent(
        self,
        tier: str,
        agent_id: str,
        clearance: Level = "restricted",
        capabilities: tuple[str, ...] = (),
        subscriptions: tuple[str, ...] = (),
        ttl_s: int = DEFAULT_AGENT_TTL_S,
        reserved_ok: bool = False,
    ) -> AgentCredentials:
        """Mint credentials with the tier's scoped key and record the agent."""
        tier = check_tier(tier)
        trust = await self.trust()
        signer = TierSigner(
            tier,
            self.state.keys.keypair(f"scope-{tier}", "account"),
            trust.accounts[tier],
            public_key(route_signer_seed(self.state.keys)),
        )
        return await register(
            self.js,
            await self.registry(),
            signer,
            self.url,
            agent_id,
            clearance=clearance,
            capabilities=capabilities,
            subscriptions=subscriptions,
            ttl_s=ttl_s,
            reserved_ok=reserved_ok,
        )

    async def renew_agent(
        self, tier: str, agent_id: str, user_public_key: str, ttl_s: int = DEFAULT_AGENT_TTL_S
    ) -> str:
        """A new user JWT for the agent's registered key (its seed never leaves it)."""
        tier = check_tier(tier)
        record = await (await self.registry()).get(f"{tier}.{check_agent_id(agent_id)}")
        if not record.active:
            raise RegistryError(f"agent {record.address} is revoked: it cannot be renewed")
        if user_public_key != record.public_key:
            raise RegistryError(f"these credentials are not those of {record.address}")
        trust = await self.trust()
        return agent_jwt(
            tier,
            agent_id,
            record.public_key,
            trust.accounts[tier],
            self.state.keys.keypair(f"scope-{tier}", "account"),
            ttl_s,
        )

    async def revoke_agent(self, tier: str, agent_id: str) -> AgentRecord:
        """Revoke in the registry (workers deny it at once) and in the tier's account JWT."""
        registry = await self.registry()
        record = await registry.get(f"{check_tier(tier)}.{check_agent_id(agent_id)}")
        now = time.time()
        revoked = record.model_copy(update={"status": "revoked", "revoked_ms": int(now * 1000)})
        await registry.update(revoked)
        kv = await self.js.key_value(REVOCATIONS_BUCKET)
        # +1: a JWT issued within the current second is revoked too.
        await kv.put(f"{tier}.{record.public_key}", str(int(now) + 1).encode())
        await self.push_accounts([tier])
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(inbox_stream(tier), agent_id)
        return revoked
