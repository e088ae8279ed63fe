"""The agent identity a tier's launcher answers as: ``<tier>.launcher``.

An answer to a control message is an ordinary signed envelope, sent through
the answering launcher's outbox and checked, audited and route-tagged by the
policy workers like any message, so that the requester's SDK verifies it as
it verifies everything else. That takes an agent identity: ``launcher`` is a
reserved id (:data:`broker_gateway.registration.RESERVED_IDS`), registered
in each tier by the first launcher of that tier, with clearance ``secret``
(it answers at the level it was asked) and the ``rpc`` capability. Its files
live in ``<state>/launchers/<tier>/identity/`` (0600) and are shared by
every instance of that tier's launcher; the first one creates them, under a
lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from pathlib import Path
from typing import Final

from agent_sdk.credentials import AgentConfig
from agent_sdk.errors import AgentExistsError, SandboxError
from agent_sdk.names import check_tier
from broker_gateway.keys import write_secret
from launchers.service_files import service_dir
from launchers.tier_bus import TierBus

LAUNCHER_ID: Final = "launcher"


def identity_dir(state_root: Path, tier: str) -> Path:
    return service_dir(state_root, tier) / "identity"


def launcher_address(tier: str) -> str:
    return f"{check_tier(tier)}.{LAUNCHER_ID}"


class _Lock:
    """An exclusive lock file, held across processes (several launcher instances)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


async def ensure_identity(bus: TierBus, state_root: Path) -> AgentConfig:
    """The launcher's identity of ``bus.tier``, registered now if it never was."""
    directory = identity_dir(state_root, bus.tier)
    lock = _Lock(directory.with_name("identity.lock"))
    await asyncio.to_thread(lock.__enter__)
    try:
        if not (directory / "agent.json").exists():
            try:
                creds = await bus.register_agent(
                    bus.tier,
                    LAUNCHER_ID,
                    clearance="secret",
                    capabilities=("rpc",),
                    reserved_ok=True,
                )
            except AgentExistsError as exc:
                raise SandboxError(
                    f"{launcher_address(bus.tier)} is registered but its files are missing "
                    f"from {directory}: the launcher cannot answer control messages"
                ) from exc
            write_secret(directory / "agent.creds", creds.creds)
            write_secret(directory / "agent.json", json.dumps(creds.info, indent=2) + "\n")
    finally:
        lock.__exit__()
    return AgentConfig.load(directory)
