"""Minting of NATS user credentials.

Agents are minted only with their tier's scoped signing key, so the server
applies the tier's permission template and nothing the issuer writes into the
JWT can widen it. Service users (gateway, workers, launchers' registry writes)
live in the router account; the system user only pushes account updates.
"""

from __future__ import annotations

import time
from typing import Any

import nkeys

from agent_sdk.errors import ConfigError
from agent_sdk.names import check_agent_id, check_tier
from broker_gateway import jwt
from broker_gateway.keys import new_seed

DEFAULT_AGENT_TTL_S = 30 * 24 * 3600
# No agent JWT lives longer: a revocation older than this can be dropped from
# the account, since every JWT it was meant to stop has expired by then.
MAX_AGENT_TTL_S = DEFAULT_AGENT_TTL_S


def mint_agent(
    tier: str,
    agent_id: str,
    account_public_key: str,
    scope_key: nkeys.KeyPair,
    ttl_s: int = DEFAULT_AGENT_TTL_S,
    user_seed: bytes | None = None,
) -> tuple[str, bytes]:
    """``(jwt, seed)`` of a new agent user; a fresh nkey unless ``user_seed`` renews one."""
    seed = user_seed if user_seed is not None else new_seed("user")
    user = nkeys.from_seed(bytearray(seed))
    token = agent_jwt(
        tier, agent_id, user.public_key.decode(), account_public_key, scope_key, ttl_s
    )
    return token, seed


def agent_jwt(
    tier: str,
    agent_id: str,
    user_public_key: str,
    account_public_key: str,
    scope_key: nkeys.KeyPair,
    ttl_s: int = DEFAULT_AGENT_TTL_S,
) -> str:
    """The user JWT of an agent's key: minted at registration, re-minted to renew.

    Renewal needs only the public key, so the agent's seed never leaves it.
    """
    check_tier(tier)
    check_agent_id(agent_id)  # the server pastes the name into the template verbatim
    if ttl_s > MAX_AGENT_TTL_S:  # (a negative ttl mints expired credentials, for tests)
        raise ConfigError(f"agent credentials live at most {MAX_AGENT_TTL_S} s, not {ttl_s}")
    now = int(time.time())
    return jwt.encode(
        {
            "sub": user_public_key,
            "name": agent_id,
            "iat": now,
            "exp": now + ttl_s,
            "nats": {"type": "user", "version": 2, "issuer_account": account_public_key},
        },
        scope_key,
    )


def mint_service(
    name: str, account_key: nkeys.KeyPair, permissions: dict[str, Any] | None = None
) -> tuple[str, bytes]:
    """``(jwt, seed)`` of a service user signed by the account key itself."""
    seed = new_seed("user")
    user = nkeys.from_seed(bytearray(seed))
    body: dict[str, Any] = {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1}
    if permissions:
        body.update(permissions)
    token = jwt.encode({"sub": user.public_key.decode(), "name": name, "nats": body}, account_key)
    return token, seed
