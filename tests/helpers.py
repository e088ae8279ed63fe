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
            if "ready" in line:
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
