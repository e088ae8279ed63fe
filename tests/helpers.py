"""Shared test helpers: a real ``symbi up`` process, agents connected from their files."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    # Port 0 lets the kernel pick; nats-server itself has no "any port" for our config.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def symbi(
    *args: str,
    state_dir: Path | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m symbi ARGS`` to completion."""
    argv = [sys.executable, "-m", "symbi", *args]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


@dataclass
class SymbiUp:
    """A ``symbi up`` process on random ports."""

    state_dir: Path
    workers: int = 0
    policies: Path | None = None
    nats_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    # Launcher services start only where a test asks for them: they reap and
    # stop sandboxes, which would race the tests that drive a Launcher directly.
    launchers: bool = False
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def start(self, timeout: float = 60) -> None:
        argv = [
            sys.executable,
            "-m",
            "symbi",
            "up",
            "--state-dir",
            str(self.state_dir),
            "--nats-port",
            str(self.nats_port),
            "--http-port",
            str(self.http_port),
            "--workers",
            str(self.workers),
        ]
        if self.policies is not None:
            argv += ["--policies", str(self.policies)]
        if not self.launchers:
            argv.append("--no-launchers")
        argv += list(self.extra)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.startswith("symbi: ready on"):
                return
        self.proc.kill()
        raise RuntimeError("symbi up did not become ready:\n" + "".join(self.output))

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.output.append(rest)
        return self.proc.returncode

    async def connect_router(self) -> Client:
        """The router's service user, as the policy workers connect (close it when done)."""
        from broker_gateway.state import StateDir

        state = StateDir.open(self.state_dir, create=False)
        return await nats.connect(self.url, user_credentials=str(state.service_creds("router")))

    def register(self, tier: str, agent_id: str, out: Path, *extra: str) -> dict[str, Any]:
        res = symbi(
            "agent",
            "register",
            "--tier",
            tier,
            "--id",
            agent_id,
            "--out",
            str(out),
            *extra,
            state_dir=self.state_dir,
        )
        assert res.returncode == 0, res.stderr
        info: dict[str, Any] = json.loads((out / "agent.json").read_text())
        return info


def bus_with_policies(root: Path, policies: str, workers: int) -> Iterator[SymbiUp]:
    """A module fixture's body: ``symbi up`` in ``root`` with ``policies`` (YAML text).

    Yields the running bus; afterwards it must stop cleanly.
    """
    (root / "policies.yaml").write_text(policies)
    bus = SymbiUp(root / "state", workers=workers, policies=root / "policies.yaml")
    bus.start()
    yield bus
    assert bus.stop() == 0, "".join(bus.output)


@dataclass
class Agent:
    """An agent connected with plain nats.py from its ``agent.json`` and ``agent.creds``."""

    nc: Client
    info: dict[str, Any]
    errors: list[str]

    async def wait_error(self, needle: str, timeout: float = 3.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for err in self.errors:
                if needle in err:
                    return err
            await asyncio.sleep(0.02)
        raise AssertionError(f"no error containing {needle!r}; got {self.errors}")


async def connect_agent(directory: Path, **kwargs: Any) -> Agent:
    info = json.loads((directory / "agent.json").read_text())
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        info["nats_url"],
        user_credentials=str(directory / "agent.creds"),
        inbox_prefix=info["inbox_prefix"].encode(),
        error_cb=on_error,
        **kwargs,
    )
    return Agent(nc, info, errors)


async def close_all(*agents: Agent) -> None:
    for agent in agents:
        with contextlib.suppress(Exception):
            await agent.nc.close()


async def connect_refused(url: str, creds: Path) -> str:
    """Try to connect with ``creds``; return the server's refusal.

    nats.py leaves the socket of a refused connection to the garbage collector;
    it is collected here, where its ResourceWarning is expected.
    """
    try:
        nc = await nats.connect(
            url,
            user_credentials=str(creds),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
        )
    except Exception as exc:  # nats.py raises several unrelated types for this
        refusal = str(exc)
    else:
        await nc.close()
        raise AssertionError("the server accepted the connection")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return refusal


# -- policy-worker tests: agents that craft envelopes with plain nats.py -------


@dataclass
class Sender:
    """A registered agent on plain nats.py that signs its own envelopes (no client SDK)."""

    address: str
    info: dict[str, Any]
    signer: Any  # agent_sdk.signing.Signer
    nc: Client
    creds: Path | None = None
    inbox_sub: Any = None

    @property
    def outbox(self) -> str:
        return str(self.info["outbox"])

    def envelope(self, to: str, payload: bytes = b"", **fields: Any) -> Any:
        """A signed envelope from this agent (type data, level public unless given)."""
        from agent_sdk.envelope import build, sign

        fields.setdefault("type", "data")
        fields.setdefault("level", "public")
        return sign(build(sender=self.address, to=to, payload=payload, **fields), self.signer)

    async def send(self, env: Any, headers: dict[str, str] | None = None) -> int:
        """Publish on the outbox; the ingress stream sequence of the stored message."""
        from agent_sdk.envelope import to_headers

        ack = await self.nc.jetstream().publish(
            self.outbox, env.payload, headers=headers if headers is not None else to_headers(env)
        )
        return int(ack.seq)

    async def receive(self, msg_id: str, timeout: float = 20.0) -> Any:
        """Pull the durable inbox (acking as it goes) until the delivery of ``msg_id``."""
        if self.inbox_sub is None:
            self.inbox_sub = await self.nc.jetstream().pull_subscribe_bind(
                self.info["inbox_consumer"], stream=self.info["inbox_stream"]
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msgs = await self.inbox_sub.fetch(16, timeout=0.5)
            except TimeoutError:  # nats.py raises its own subclass, or asyncio's
                continue
            found = None
            for msg in msgs:
                await msg.ack()
                if (msg.headers or {}).get("Symbi-Id") == msg_id:
                    found = msg
            if found is not None:
                return found
        raise AssertionError(f"{self.address} never received {msg_id}")


async def register_sender(gateway: Any, tier: str, agent_id: str, **kwargs: Any) -> Sender:
    """Register with ``broker_gateway.Gateway`` (fast: no subprocess) and connect."""
    import tempfile

    from agent_sdk.signing import Signer
    from broker_gateway import jwt

    creds = await gateway.register_agent(tier, agent_id, **kwargs)
    directory = Path(tempfile.mkdtemp(prefix=f"{tier}-{agent_id}-"))
    (directory / "agent.creds").write_text(creds.creds)
    _, seed = jwt.parse_creds(creds.creds)
    nc = await nats.connect(
        creds.info["nats_url"],
        user_credentials=str(directory / "agent.creds"),
        inbox_prefix=creds.info["inbox_prefix"].encode(),
    )
    return Sender(
        creds.info["address"], creds.info, Signer.from_seed(seed), nc, directory / "agent.creds"
    )


class AuditLog:
    """Every record of the AUDIT stream, followed live with an ordered consumer."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.subjects: list[str] = []
        self._sub: Any = None

    async def start(self, nc: Client) -> AuditLog:
        async def on_msg(msg: Any) -> None:
            self.records.append(json.loads(msg.data))
            self.subjects.append(msg.subject)

        self._sub = await nc.jetstream().subscribe(
            "audit.>", stream="AUDIT", ordered_consumer=True, cb=on_msg
        )
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if all(r.get(k) == v for k, v in match.items())]

    async def wait(
        self, count: int = 1, timeout: float = 20.0, **match: Any
    ) -> list[dict[str, Any]]:
        """The records with these field values, once there are at least ``count``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(**match)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"expected {count} audit records {match}, got {self.find(**match)}")
