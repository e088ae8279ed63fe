"""Stop a sandbox as soon as its agent's credentials are revoked.

The launcher follows the registry bucket (a KV watch, like the policy
workers' cache): when a record of an agent that has a sandbox on this host
turns ``revoked`` (``symbi agent revoke``, an operator's tool, the gateway),
the sandbox is stopped and its files removed. NATS has already closed the
agent's connections by then; this ends the program and its sandbox too.

The launcher service of each tier runs :func:`watch_revocations` for its
tier (:mod:`launchers.service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection

from nats.js.kv import KeyValue
from pydantic import ValidationError

from agent_sdk.errors import SymbiError
from broker_gateway.records import AgentRecord
from broker_gateway.streams import REGISTRY_BUCKET
from launchers.launch import Launcher

log = logging.getLogger(__name__)

#: A revoked agent gets little grace: its connections are already closed.
STOP_TIMEOUT_S = 2.0


async def watch_revocations(
    launcher: Launcher,
    tiers: Collection[str] | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run until cancelled: stop the local sandbox of every agent that gets revoked."""
    gateway = launcher.require_gateway()
    kv: KeyValue = await gateway.js.key_value(REGISTRY_BUCKET)
    watcher = await kv.watchall()
    try:
        async for entry in watcher:
            if entry is None:  # the end of the initial values
                if ready is not None:
                    ready.set()
                continue
            if entry.operation is not None or not entry.value:
                continue
            try:
                record = AgentRecord.model_validate_json(entry.value)
            except ValidationError:
                continue
            if record.active or (tiers is not None and record.tier not in tiers):
                continue
            if not launcher.root(record.tier, record.id).exists():
                continue
            log.info("credentials of %s revoked: stopping its sandbox", record.address)
            try:
                # Already revoked: only the sandbox and its files remain to go.
                await launcher.stop(record.tier, record.id, timeout=STOP_TIMEOUT_S, revoke=False)
            except SymbiError as exc:
                log.warning("cannot stop the sandbox of %s: %s", record.address, exc)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
