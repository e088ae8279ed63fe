"""Child processes: relays (policy workers or the bare relay), the sender, the receivers.

Every child runs from the repository root with the interpreter running the
bench, so ``python -m bench...`` and ``python -m policy_worker`` resolve the
same code whether or not the project is installed. A child's stderr goes to
a log file in the bench's directory, and its last lines are quoted when it
fails, so a broken worker shows why instead of a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from bench.bus import BenchError, Bus

REPO = Path(__file__).resolve().parent.parent
RelayKind = Literal["router", "bare"]
READY_TIMEOUT_S = 60.0


def _env(bus: Bus) -> dict[str, str]:
    env = bus.child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _open_log(path: Path) -> BinaryIO:
    # The child inherits the descriptor; the parent closes its copy right after spawning.
    return open(path, "wb")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Relay:
    """One relay process: ``python -m policy_worker`` or ``python -m bench.bare_relay``."""

    kind: RelayKind
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the process logs that it is ready (both kinds log ``<name> ready``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"{self.name} ready" in self.log_path.read_text(errors="replace"):
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.kind} relay {self.name} did not start:\n{_tail(self.log_path)}")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def spawn_relay(
    bus: Bus, kind: RelayKind, name: str, workdir: Path, policies: Path | None = None
) -> Relay:
    if kind == "router":
        argv = [sys.executable, "-m", "policy_worker", "--name", name]
        if policies is not None:
            argv += ["--policies", str(policies)]
    else:
        argv = [sys.executable, "-m", "bench.bare_relay", "--name", name]
    log_path = workdir / f"{name}.log"
    with _open_log(log_path) as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env=_env(bus), stdin=asyncio.subprocess.DEVNULL, stderr=log
        )
    relay = Relay(kind, name, proc, log_path)
    try:
        await relay.wait_ready()
    except BaseException:
        await relay.stop()
        raise
    return relay


class Child:
    """The sender or the receiver process, driven by lines on its stdin and stdout."""

    def __init__(self, module: str, proc: asyncio.subprocess.Process, out: Path, log: Path):
        self.module = module
        self.proc = proc
        self.out = out
        self.log = log

    @classmethod
    async def start(cls, bus: Bus, module: str, plan: Path, workdir: Path, tag: str) -> Child:
        out = workdir / f"{tag}.out.json"
        log_path = workdir / f"{tag}.log"
        with _open_log(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                str(plan),
                str(out),
                cwd=REPO,
                env=_env(bus),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        return cls(module, proc, out, log_path)

    async def wait_line(self, expected: str, timeout: float) -> None:
        """Until the child prints ``expected`` on a line of its own."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.0, remaining))
            except TimeoutError:
                line = b""
                remaining = 0
            if line.strip() == expected.encode():
                return
            if not line or remaining <= 0:
                await self.kill()
                raise BenchError(f"{self.module} never said {expected!r}:\n{_tail(self.log)}")

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def result(self, timeout: float) -> dict[str, Any]:
        """Wait for the child to exit and read what it wrote."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise BenchError(f"{self.module} did not finish in {timeout:g} s") from None
        if code != 0:
            raise BenchError(f"{self.module} exited with {code}:\n{_tail(self.log)}")
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class RelayPool:
    """The relays running now, all of one kind; :meth:`use` switches kind or count.

    Switching stops the old relays while the new ones start (a stopping relay
    asks the consumer for nothing more), so only one kind ever consumes.
    """

    def __init__(self, bus: Bus, workdir: Path, policies: Path | None) -> None:
        self.bus = bus
        self.workdir = workdir
        self.policies = policies
        self.kind: RelayKind | None = None
        self.running: list[Relay] = []
        self.spawned = 0

    async def _spawn(self, kind: RelayKind) -> Relay:
        self.spawned += 1
        name = f"{kind}-{self.spawned}"
        return await spawn_relay(self.bus, kind, name, self.workdir, self.policies)

    async def use(self, kind: RelayKind, n: int) -> list[Relay]:
        """``n`` relays of ``kind``, reusing those already running."""
        keep = self.running if kind == self.kind else []
        retire = [r for r in self.running if r not in keep] + keep[n:]
        keep = keep[:n]
        results = await asyncio.gather(
            *(r.stop() for r in retire),
            *(self._spawn(kind) for _ in range(n - len(keep))),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, Relay)]
        self.kind, self.running = kind, keep + started
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        return list(self.running)

    async def close(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.running))
        self.running = []
