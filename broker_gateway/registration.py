"""Registering an agent: mint its credentials, record it, create its durable inbox consumer.

Shared by the gateway (which holds every key) and the per-tier launcher
services (which hold only their tier's scoped signing key and the public keys
they name), so that ``agent.json`` has one definition. Everything here needs
only: a scoped signing key, the public key of the tier's account and of the
router's route key, and a JetStream context allowed to write the tier's
registry records and create its inbox consumers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

import nkeys
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from agent_sdk.errors import BrokerError, RegistryError
from agent_sdk.names import Level, check_agent_id, check_tier, inbox_subject, outbox_subject
from agent_sdk.sealing import EncryptionKeyPair
from broker_gateway import jwt
from broker_gateway.accounts import agent_inbox_prefix, inbox_stream
from broker_gateway.records import AgentRecord
from broker_gateway.registry import Registry
from broker_gateway.streams import inbox_consumer_config
from broker_gateway.users import DEFAULT_AGENT_TTL_S, mint_agent

#: Ids that only symbi's own services register (``<tier>.launcher`` answers
#: control messages): an agent holding one could pose as that service.
RESERVED_IDS: Final = frozenset({"launcher"})


@dataclass(frozen=True)
class AgentCredentials:
    """What an agent needs to connect: the creds file text and its ``agent.json``."""

    creds: str
    info: dict[str, Any]


@dataclass(frozen=True)
class TierSigner:
    """What minting a tier's agents takes: its scoped key and two public keys."""

    tier: str
    scope_key: nkeys.KeyPair
    account_public_key: str
    router_public_key: str


async def register(
    js: JetStreamContext,
    registry: Registry,
    signer: TierSigner,
    url: str,
    agent_id: str,
    *,
    clearance: Level = "restricted",
    capabilities: tuple[str, ...] = (),
    subscriptions: tuple[str, ...] = (),
    ttl_s: int = DEFAULT_AGENT_TTL_S,
    reserved_ok: bool = False,
) -> AgentCredentials:
    """Mint, record and give an inbox to ``<tier>.<agent_id>``; its files' contents."""
    tier = check_tier(signer.tier)
    check_agent_id(agent_id)
    if agent_id in RESERVED_IDS and not reserved_ok:
        raise RegistryError(f"agent id {agent_id!r} is reserved for symbi's own services")
    token, seed = mint_agent(
        tier, agent_id, signer.account_public_key, signer.scope_key, ttl_s=ttl_s
    )
    claims = jwt.decode(token, verify=False)
    enc = EncryptionKeyPair.generate()
    record = AgentRecord(
        tier=tier,
        id=agent_id,
        public_key=claims["sub"],
        encryption_public_key=enc.public_key,
        clearance=clearance,
        capabilities=tuple(sorted(set(capabilities))),
        subscriptions=subscriptions,
        created_ms=int(time.time() * 1000),
    )
    await registry.create(record)
    try:
        await js.add_consumer(inbox_stream(tier), inbox_consumer_config(tier, agent_id))
    except NatsError as exc:
        raise BrokerError(f"cannot create the inbox consumer of {record.address}: {exc}") from exc
    info = {
        "address": record.address,
        "tier": tier,
        "id": agent_id,
        "nats_url": url,
        "outbox": outbox_subject(tier, agent_id),
        "inbox": inbox_subject(tier, agent_id),
        "public_key": record.public_key,
        "clearance": clearance,
        "capabilities": list(record.capabilities),
        "subscriptions": list(subscriptions),
        "encryption_public_key": enc.public_key,
        "encryption_secret_key": enc.secret_key,
        "inbox_prefix": agent_inbox_prefix(agent_id),
        "inbox_stream": inbox_stream(tier),
        "inbox_consumer": agent_id,
        "router_public_key": signer.router_public_key,
        "expires": claims["exp"],
    }
    return AgentCredentials(jwt.creds_file(token, seed), info)
