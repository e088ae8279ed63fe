"""Revocation on request, for services that must not hold the operator key.

Revoking an agent re-signs its tier's account JWT, which takes the operator
key; only the gateway of ``symbi up`` holds it. A per-tier launcher service
asks instead, with a core NATS request in the router account::

    symbi.admin.revoke.<tier>   {"id": "<agent id>"}
    -> {"ok": true, "address": "<tier>.<id>"}
     | {"ok": false, "error": "not_found" | "invalid" | "failed", "detail": "..."}

Only router-account users can publish there (tier accounts import nothing
of the kind), and each launcher's service user only to its own tier's
subject, so a launcher can revoke the agents of its tier and no others.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from agent_sdk.errors import AgentNotFoundError, SymbiError
from agent_sdk.names import check_agent_id, check_tier
from broker_gateway.gateway import Gateway

log = logging.getLogger(__name__)

REVOKE_PREFIX: Final = "symbi.admin.revoke"
QUEUE: Final = "symbi-gateway"


def revoke_subject(tier: str) -> str:
    return f"{REVOKE_PREFIX}.{check_tier(tier)}"


def _answer(ok: bool, **fields: Any) -> bytes:
    return json.dumps({"ok": ok, **fields}).encode()


class RevokeService:
    """Answers revocation requests with the gateway's :meth:`Gateway.revoke_agent`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.gateway.router.subscribe(
            f"{REVOKE_PREFIX}.*", queue=QUEUE, cb=self._handle
        )

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except NatsError:
                log.debug("revocation service: the connection is already closed")
            self._sub = None

    async def _handle(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            tier = check_tier(msg.subject.rsplit(".", 1)[-1])
            body = json.loads(msg.data)
            agent_id = check_agent_id(body["id"] if isinstance(body, dict) else "")
        except (SymbiError, ValueError, KeyError, TypeError) as exc:
            await msg.respond(_answer(False, error="invalid", detail=str(exc)[:200]))
            return
        try:
            record = await self.gateway.revoke_agent(tier, agent_id)
        except AgentNotFoundError as exc:
            await msg.respond(_answer(False, error="not_found", detail=str(exc)))
            return
        except (SymbiError, NatsError) as exc:
            log.warning("revoking %s.%s on request failed: %s", tier, agent_id, exc)
            await msg.respond(_answer(False, error="failed", detail=str(exc)[:200]))
            return
        log.info("revoked %s on request", record.address)
        await msg.respond(_answer(True, address=record.address))
