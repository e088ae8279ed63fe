"""Launching an agent: register it, hand it its credentials, start its sandbox; and back.

:class:`Launcher` is what ``symbi agent launch/stop/logs`` use (with the
gateway) and what each tier's launcher service holds (with a
:class:`~launchers.tier_bus.TierBus`: its tier's signing key only). The
order matters for what is left behind when something fails:

launch
    check the backend (runtime up, image present) before anything exists;
    register the agent (mint its credentials with the tier's scoped key);
    write the credential files; start the sandbox; record it. Any failure
    after registering removes the files and revokes the credentials.
stop
    stop the sandbox and remove what the backend made, remove the sandbox's
    host directory (the credentials with it), then revoke the credentials,
    so that a copy that left the sandbox is worthless too. If the backend
    fails, the record stays for another ``stop``, but the credential files
    are removed and revoked all the same.

Revoked ids stay in the registry: a stopped agent's id cannot be launched
again in that tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nats.js import JetStreamContext

from agent_sdk.errors import AgentNotFoundError, SandboxError, SymbiError
from agent_sdk.names import Level, Tier, check_agent_id, check_tier
from broker_gateway.keys import write_secret
from broker_gateway.registration import AgentCredentials
from broker_gateway.registry import Registry
from broker_gateway.state import StateDir
from launchers.backend import (
    SANDBOX_NATS_URL,
    BackendName,
    Limits,
    Sandbox,
    SandboxBackend,
    SandboxDir,
    SandboxSpec,
    SandboxStatus,
)
from launchers.credentials import remove_tree, write_launch_files
from launchers.paths import sandbox_root, sandboxes_dir
from launchers.selection import make_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchRequest:
    """An agent to start: identity and permissions, then what runs and where."""

    tier: Tier
    agent_id: str
    command: tuple[str, ...]
    backend: BackendName
    image: str | None = None
    rootfs: Path | None = None
    app_dir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    clearance: Level = "restricted"
    capabilities: tuple[str, ...] = ()
    subscriptions: tuple[str, ...] = ()
    #: The agent on whose request it runs (see :mod:`launchers.control`), if any.
    owner: str = ""


class BusAdmin(Protocol):
    """What launching needs of the bus: :class:`Gateway` (every key) or a
    :class:`~launchers.tier_bus.TierBus` (one tier's signing key)."""

    url: str
    js: JetStreamContext

    async def registry(self) -> Registry: ...

    async def register_agent(
        self,
        tier: str,
        agent_id: str,
        clearance: Level = "restricted",
        capabilities: tuple[str, ...] = (),
        subscriptions: tuple[str, ...] = (),
    ) -> AgentCredentials: ...

    async def revoke_agent(self, tier: str, agent_id: str) -> object: ...


class Launcher:
    """Starts and stops the sandboxes of agents on one symbi bus (one state directory)."""

    def __init__(
        self,
        state: StateDir,
        gateway: BusAdmin | None,
        backends: Callable[[BackendName], SandboxBackend] = make_backend,
    ) -> None:
        self.state = state
        self.gateway = gateway
        self._make_backend = backends
        self._backends: dict[BackendName, SandboxBackend] = {}

    def backend(self, name: BackendName) -> SandboxBackend:
        if name not in self._backends:
            self._backends[name] = self._make_backend(name)
        return self._backends[name]

    def require_gateway(self) -> BusAdmin:
        if self.gateway is None:
            raise SandboxError("not connected to the bus: start `symbi up` first")
        return self.gateway

    # -- records --------------------------------------------------------------

    def root(self, tier: str, agent_id: str) -> Path:
        return sandbox_root(self.state.root, tier, agent_id)

    def sandbox(self, tier: str, agent_id: str) -> Sandbox:
        """The recorded sandbox of ``<tier>.<id>``; :class:`SandboxError` if there is none."""
        root = self.root(tier, agent_id)
        try:
            text = (root / "sandbox.json").read_text()
        except FileNotFoundError as exc:
            raise SandboxError(f"no sandbox for {tier}.{agent_id} on this host") from exc
        except OSError as exc:
            raise SandboxError(f"cannot read {root / 'sandbox.json'}: {exc.strerror}") from exc
        return Sandbox.from_json(text)

    def sandboxes(self) -> list[Sandbox]:
        found = []
        for record in sorted(sandboxes_dir(self.state.root).glob("*/sandbox.json")):
            try:
                found.append(Sandbox.from_json(record.read_text()))
            except (SandboxError, OSError):
                log.warning("ignoring unreadable sandbox record %s", record)
        return found

    # -- launch ---------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> Sandbox:
        tier, agent_id = check_tier(request.tier), check_agent_id(request.agent_id)
        root = self.root(tier, agent_id)
        if root.exists():
            raise SandboxError(
                f"{tier}.{agent_id} already has a sandbox on this host: "
                f"symbi agent stop --tier {tier} --id {agent_id}"
            )
        backend = self.backend(request.backend)
        gateway = self.require_gateway()
        spec = SandboxSpec(
            tier=tier,
            agent_id=agent_id,
            command=request.command,
            root=root,
            nats_url=gateway.url,
            image=request.image,
            rootfs=request.rootfs,
            app_dir=request.app_dir,
            env=dict(request.env),
            limits=request.limits,
        )
        await asyncio.to_thread(backend.check, spec)
        creds = await gateway.register_agent(
            tier,
            agent_id,
            clearance=request.clearance,
            capabilities=request.capabilities,
            subscriptions=request.subscriptions,
        )
        try:
            root.mkdir(mode=0o700, parents=True)
            write_launch_files(
                spec.dirs.launch, creds, SANDBOX_NATS_URL, backend.sandbox_uid, backend.sandbox_gid
            )
            # Recorded before it starts, so that `stop` knows the backend even if
            # this process dies half-way; completed once it runs.
            pending = Sandbox(backend.name, tier, agent_id, root, owner=request.owner)
            write_secret(pending.dirs.record, pending.to_json())
            sandbox = await asyncio.to_thread(backend.start, spec)
            sandbox = dataclasses.replace(sandbox, owner=request.owner)
            write_secret(sandbox.dirs.record, sandbox.to_json())
        except BaseException:
            remove_tree(root)
            with contextlib.suppress(SymbiError):
                await self._revoke(tier, agent_id)
            raise
        log.info("launched %s.%s with the %s backend", tier, agent_id, backend.name)
        return sandbox

    # -- stop -----------------------------------------------------------------

    async def stop(
        self, tier: str, agent_id: str, timeout: float = 10.0, revoke: bool = True
    ) -> None:
        """Stop and remove the sandbox and its files; then revoke its credentials."""
        root = self.root(tier, agent_id)
        if not root.exists():
            raise SandboxError(f"no sandbox for {tier}.{agent_id} on this host")
        try:
            sandbox = self.sandbox(tier, agent_id)
        except SandboxError:
            sandbox = None  # a launch that died half-way: just clean up
        try:
            if sandbox is not None:
                await asyncio.to_thread(self.backend(sandbox.backend).stop, sandbox, timeout)
            remove_tree(root)
        finally:
            # Even if the backend failed (and the record stays for another try),
            # the credentials leave the host and become worthless.
            try:
                remove_tree(SandboxDir(root).launch)
            finally:
                if revoke:
                    await self._revoke(tier, agent_id)
        log.info("stopped %s.%s", tier, agent_id)

    async def _revoke(self, tier: str, agent_id: str) -> None:
        gateway = self.require_gateway()
        with contextlib.suppress(AgentNotFoundError):
            await gateway.revoke_agent(tier, agent_id)

    async def reap(self, tiers: Collection[str] | None = None) -> list[Sandbox]:
        """Stop (clean up and revoke) every sandbox (of ``tiers``) whose agent has exited."""
        reaped = []
        for sandbox in self.sandboxes():
            if tiers is not None and sandbox.tier not in tiers:
                continue
            if not sandbox.started_ms:  # still starting (or a launch died: `stop` it)
                continue
            status = await asyncio.to_thread(self.status, sandbox)
            if status.state in ("exited", "missing"):
                try:
                    await self.stop(sandbox.tier, sandbox.agent_id)
                except SymbiError as exc:
                    log.warning("cannot reap %s: %s", sandbox.name, exc)
                    continue
                reaped.append(sandbox)
        return reaped

    # -- inspection -----------------------------------------------------------

    def status(self, sandbox: Sandbox) -> SandboxStatus:
        return self.backend(sandbox.backend).status(sandbox)

    def logs(self, tier: str, agent_id: str, follow: bool = False) -> Iterator[bytes]:
        sandbox = self.sandbox(tier, agent_id)
        return self.backend(sandbox.backend).logs(sandbox, follow=follow)

    async def wait(self, tier: str, agent_id: str, timeout: float | None = None) -> int:
        sandbox = self.sandbox(tier, agent_id)
        backend = self.backend(sandbox.backend)
        return await asyncio.to_thread(backend.wait, sandbox, timeout)
