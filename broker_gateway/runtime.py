"""Everything ``symbi up`` runs on one machine, as one async context manager.

Start order: check the state directory and both ports (nothing starts if one
fails), the NATS server, the account JWTs, the streams and buckets, the HTTP
endpoint, then the child services (policy workers, launchers). Stop order is
the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.errors import Error as NatsError
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import multiprocess as prom_multiprocess

from agent_sdk.errors import ConfigError
from agent_sdk.names import TIERS
from broker_gateway.accounts import build_trust, inbox_stream
from broker_gateway.gateway import Gateway
from broker_gateway.http import HttpEndpoint
from broker_gateway.keys import route_signer_seed
from broker_gateway.restarts import RestartBook
from broker_gateway.revoke_service import RevokeService
from broker_gateway.server import NatsServer, ServerConfig, port_free
from broker_gateway.state import StateDir
from broker_gateway.streams import AUDIT, INGRESS, StreamSettings

log = logging.getLogger(__name__)

_SUPERVISE_TICK_S = 0.25


@dataclass(frozen=True)
class RuntimeConfig:
    state_dir: Path
    nats_port: int = 4222
    http_port: int | None = 8080
    workers: int = 2
    policies: Path | None = None
    # A NATS server or cluster of the user's own, already configured with this
    # state directory's trust (`symbi nats-config`); None runs the embedded one.
    external_url: str | None = None
    streams: StreamSettings = field(default_factory=StreamSettings)


@dataclass(frozen=True)
class ChildSpec:
    """A supervised child service, restarted if it dies (see :mod:`broker_gateway.restarts`)."""

    name: str
    argv: Sequence[str]


class Runtime:
    def __init__(
        self, config: RuntimeConfig, children: Callable[[Runtime], list[ChildSpec]] | None = None
    ) -> None:
        self.config = config
        self.state = StateDir.open(config.state_dir)
        self._children_factory = children
        self.server: NatsServer | None = None
        self.gateway: Gateway | None = None
        self.http: HttpEndpoint | None = None
        self.revoke_service: RevokeService | None = None
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._restarts = RestartBook()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock_fd: int | None = None
        self.metrics_dir = self.state.root / "metrics"

    @property
    def url(self) -> str:
        if self.config.external_url is not None:
            return self.config.external_url
        return f"nats://127.0.0.1:{self.config.nats_port}"

    def preflight(self) -> None:
        """Fail before anything starts: ports in use."""
        cfg = self.config
        check_ports(None if cfg.external_url else cfg.nats_port, cfg.http_port)

    async def start(self) -> None:
        self.preflight()
        self._lock_fd = self.state.lock()
        if self.config.external_url is None:
            trust = build_trust(self.state.keys, {})
            self.server = NatsServer(ServerConfig(self.state.root, self.config.nats_port), trust)
            await self.server.start()
        try:
            self.gateway = await Gateway.connect(self.state, self.url)
            # Streams first: the tier accounts carry revocations kept in a bucket.
            await self.gateway.ensure_streams(self.config.streams)
            await self.gateway.push_accounts(list(TIERS))
            # Before any worker starts: a worker refuses to mint a route key of its own.
            route_signer_seed(self.state.keys)
            # Launchers revoke through the gateway: they never hold the operator key.
            self.revoke_service = RevokeService(self.gateway)
            await self.revoke_service.start()
            self._reset_metrics_dir()
            if self.config.http_port is not None:
                self.http = HttpEndpoint(
                    self.health, self.metrics_registry, port=self.config.http_port
                )
                await self.http.start()
            self.state.write_runtime(
                {
                    "nats_url": self.url,
                    "http_port": self.config.http_port,
                    "pid": os.getpid(),
                    "started": int(time.time()),
                }
            )
            if self._children_factory is not None:
                for spec in self._children_factory(self):
                    await self._spawn(spec)
                self._supervisor = asyncio.create_task(self._supervise())
        except BaseException:
            await self.stop()
            raise

    def _reset_metrics_dir(self) -> None:
        self.metrics_dir.mkdir(mode=0o700, exist_ok=True)
        for stale in self.metrics_dir.glob("*.db"):
            stale.unlink()

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        env["SYMBIONT_STATE_DIR"] = str(self.state.root)
        env["SYMBIONT_NATS_URL"] = self.url
        return env

    async def _spawn(self, spec: ChildSpec) -> None:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            env=self.child_env(),
            stdin=asyncio.subprocess.DEVNULL,
        )
        self._procs[spec.name] = proc
        self._restarts.started(spec.name, time.monotonic())
        log.info("started %s (pid %d)", spec.name, proc.pid)

    async def _supervise(self) -> None:
        specs = {
            s.name: s for s in (self._children_factory(self) if self._children_factory else [])
        }
        book = self._restarts
        while not self._stopping:
            await asyncio.sleep(_SUPERVISE_TICK_S)
            now = time.monotonic()
            for name, proc in list(self._procs.items()):
                if proc.returncode is None or self._stopping:
                    continue
                if book.children[name].restart_at is None:
                    delay = book.exited(name, now)
                    log.warning(
                        "%s exited with %s; restarting in %.1f s", name, proc.returncode, delay
                    )
                    with contextlib.suppress(KeyError):
                        prom_multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                            proc.pid, str(self.metrics_dir)
                        )
            for name in book.due(now):
                if not self._stopping:
                    await self._spawn(specs[name])

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._procs.clear()
        if self.http is not None:
            await self.http.stop()
        if self.revoke_service is not None:
            await self.revoke_service.stop()
        if self.gateway is not None:
            with contextlib.suppress(NatsError, OSError):
                await self.gateway.close()
        if self.server is not None:
            await self.server.stop()
        self.state.clear_runtime()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- health and metrics --------------------------------------------------

    async def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {"ok": False, "nats": False, "streams": {}, "workers": {}}
        gw = self.gateway
        if gw is None or not gw.router.is_connected:
            return report
        report["nats"] = True
        names = [INGRESS, AUDIT, *(inbox_stream(t) for t in TIERS)]
        for name in names:
            try:
                info = await gw.js.stream_info(name)
                report["streams"][name] = {"messages": info.state.messages}
            except NatsError:
                report["streams"][name] = None
        report["workers"] = {n: p.returncode is None for n, p in self._procs.items()}
        report["restarts"] = {n: r.restarts for n, r in self._restarts.children.items()}
        report["ok"] = all(report["streams"].values()) and all(report["workers"].values())
        return report

    def metrics_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        if any(self.metrics_dir.glob("*.db")):
            prom_multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                registry, path=str(self.metrics_dir)
            )
        up = Gauge("symbi_up", "1 while the broker accepts traffic", registry=registry)
        up.set(1 if self.gateway is not None and self.gateway.router.is_connected else 0)
        procs = Gauge(
            "symbi_child_processes", "running child services", ["kind"], registry=registry
        )
        for name in self._procs:
            procs.labels(kind=name.split("-")[0]).set(0)
        for name, proc in self._procs.items():
            if proc.returncode is None:
                procs.labels(kind=name.split("-")[0]).inc()
        return registry


def check_ports(nats_port: int | None, http_port: int | None) -> None:
    """Refuse ports that are in use (None: not ours to open), with one clear line."""
    if nats_port is not None and nats_port == http_port:
        raise ConfigError(f"--nats-port and --http-port are both {nats_port}")
    for name, port in (("NATS", nats_port), ("HTTP", http_port)):
        if port is not None and not port_free(port):
            raise ConfigError(f"{name} port 127.0.0.1:{port} is already in use")


def python_module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
