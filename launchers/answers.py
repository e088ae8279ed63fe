"""Answering a control message: a signed envelope from ``<tier>.launcher`` to the requester.

The answer is a JSON object, ``{"request": ID, "op": OP, "ok": true, ...}``
or ``{"request": ID, "op": OP, "ok": false, "error": CODE, "detail": TEXT}``,
where ``ID`` is the request's ``Symbi-Id``:

- to an ``rpc`` request, an ``rpc`` answer with ``Symbi-Reply-To: ID``, so
  that ``AgentClient.request`` returns it;
- to a ``control`` message, a ``data`` message (control does not cross tiers
  under the default policies, and only rpc carries ``Symbi-Reply-To``), which
  the requester reads from its inbox like any message and matches by
  ``request``.

It goes out through the launcher identity's outbox like any agent's message,
at the request's level, sealed to the requester's key from the registry when
that level is ``confidential`` or above.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError

from agent_sdk.credentials import AgentConfig
from agent_sdk.envelope import build, sign, to_headers
from agent_sdk.errors import BrokerError
from agent_sdk.headers import Enc
from agent_sdk.inbox import Message
from agent_sdk.names import LEVEL_RANK
from agent_sdk.publisher import ReliablePublisher
from agent_sdk.sealing import seal
from broker_gateway.records import AgentRecord

log = logging.getLogger(__name__)

SEAL_FROM_LEVEL: Final = LEVEL_RANK["confidential"]


async def _log_nats_error(exc: Exception) -> None:
    log.warning("nats: %s", exc)


class Answerer:
    """Publishes answers as the launcher's own agent identity."""

    def __init__(self, config: AgentConfig, nc: Client) -> None:
        self.config = config
        self.address = str(config.address)
        self._nc = nc
        self._signer = config.credentials().signer
        self._publisher = ReliablePublisher(nc.jetstream(), timeout_s=5.0)

    @classmethod
    async def connect(cls, config: AgentConfig) -> Answerer:
        try:
            nc = await nats.connect(
                config.nats_url,
                user_credentials=str(config.creds_path),
                inbox_prefix=config.inbox_prefix.encode(),
                name=f"symbi {config.address}",
                error_cb=_log_nats_error,
                max_reconnect_attempts=-1,
            )
        except (NatsError, OSError) as exc:
            raise BrokerError(f"{config.address} cannot connect to NATS: {exc}") from exc
        return cls(config, nc)

    async def close(self) -> None:
        if not self._nc.is_closed:
            await self._nc.close()

    async def answer(
        self, request: Message, body: dict[str, Any], requester: AgentRecord | None
    ) -> str:
        """Send ``body`` to the sender of ``request``; the answer's ``Symbi-Id``."""
        payload = json.dumps({"request": request.id, **body}, separators=(",", ":")).encode()
        enc: Enc = "none"
        if LEVEL_RANK[request.level] >= SEAL_FROM_LEVEL and requester is not None:
            payload, enc = seal(payload, requester.encryption_public_key), "x25519-sealed"
        env = sign(
            build(
                sender=self.address,
                to=request.sender,
                type="rpc" if request.is_request else "data",
                level=request.level,
                payload=payload,
                enc=enc,
                reply_to=request.id if request.is_request else None,
            ),
            self._signer,
        )
        await self._publisher.publish(self.config.outbox, env.payload, to_headers(env))
        return env.id
