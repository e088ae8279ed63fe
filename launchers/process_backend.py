"""The ``process`` backend: bubblewrap, for development only.

**Not an isolation boundary.** bubblewrap shares the host kernel with no
seccomp filter of ours, and the agent runs as a process of the launcher's
user. It exists so that agents can be tried where Docker is not available,
and runs only when asked for explicitly (``--backend process
--allow-unsandboxed``).

What it does give the agent is the same view as the other backends: the
agent rootfs that ``scripts/setup-sandboxes process`` unpacked, read-only,
with fresh ``/proc``, ``/dev`` and ``/tmp``; every namespace unshared (so no
network but loopback), all capabilities dropped, a new session; the
credentials read-only at ``/run/symbi``; NATS at ``127.0.0.1:4222`` through
the relay socket, which a host relay process serves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from agent_sdk.errors import SandboxError
from launchers import sandbox_init
from launchers.backend import (
    AGENT_GID,
    AGENT_UID,
    SANDBOX_APP_DIR,
    SANDBOX_LAUNCH_DIR,
    SANDBOX_NATS_LISTEN,
    SANDBOX_NET_DIR,
    BackendName,
    Sandbox,
    SandboxSpec,
    SandboxStatus,
)
from launchers.console import console_status, follow_console, wait_exit
from launchers.docker_backend import RELAY_SOCKET, nats_host_port
from launchers.host_relay import start_behind_relay, stop_relay
from launchers.paths import SETUP_HINT, cache_dir
from launchers.processes import kill_process, process_alive

BWRAP = "bwrap"
INIT_IN_SANDBOX = "/run/symbi-init/sandbox_init.py"
#: The sandbox's own /tmp: a fresh tmpfs inside its mount namespace.
SANDBOX_TMP = "/tmp"  # noqa: S108


def process_rootfs() -> Path:
    return cache_dir() / "process-rootfs"


def bwrap_argv(spec: SandboxSpec, rootfs: Path, binary: str = BWRAP) -> list[str]:
    """The bubblewrap command line of one agent (pure: for tests and for ``start``)."""
    argv = [
        binary,
        "--ro-bind",
        str(rootfs),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        SANDBOX_TMP,
        "--tmpfs",
        "/run",
        "--ro-bind",
        str(spec.dirs.launch),
        SANDBOX_LAUNCH_DIR,
        "--ro-bind",
        str(spec.dirs.net),
        SANDBOX_NET_DIR,
        "--ro-bind",
        sandbox_init.__file__,
        INIT_IN_SANDBOX,
    ]
    if spec.app_dir is not None:
        argv += ["--ro-bind", str(spec.app_dir.absolute()), SANDBOX_APP_DIR]
        argv += ["--chdir", SANDBOX_APP_DIR]
    else:
        argv += ["--chdir", SANDBOX_TMP]
    argv += [
        "--unshare-all",
        "--unshare-user",
        "--as-pid-1",  # sandbox_init is the init: it reaps and forwards SIGTERM
        "--uid",
        str(AGENT_UID),
        "--gid",
        str(AGENT_GID),
        "--hostname",
        spec.agent_id,
        "--cap-drop",
        "ALL",
        "--new-session",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "HOME",
        SANDBOX_TMP,
    ]
    for key, value in spec.sandbox_env().items():
        argv += ["--setenv", key, value]
    argv += [
        "--",
        "python3",
        "-I",
        INIT_IN_SANDBOX,
        "run",
        "--listen",
        SANDBOX_NATS_LISTEN,
        "--connect",
        f"unix:{SANDBOX_NET_DIR}/{RELAY_SOCKET}",
        "--report-status",
        "--",
        *spec.command,
    ]
    return argv


class ProcessBackend:
    """Agents as bubblewrap processes (development only)."""

    name: ClassVar[BackendName] = "process"

    def __init__(self, rootfs: Path | None = None, binary: str = BWRAP) -> None:
        self.rootfs = rootfs or process_rootfs()
        self.binary = binary

    @property
    def sandbox_uid(self) -> int:
        # Inside the user namespace the launcher's uid appears as AGENT_UID.
        return os.geteuid()

    @property
    def sandbox_gid(self) -> int:
        return os.getegid()

    def check(self, spec: SandboxSpec) -> None:
        if shutil.which(self.binary) is None:
            raise SandboxError(f"{self.binary} not found: {SETUP_HINT} process")
        if not (self.rootfs / "usr" / "bin" / "python3").exists():
            raise SandboxError(f"no agent rootfs in {self.rootfs}: {SETUP_HINT} process")
        if spec.app_dir is not None and not spec.app_dir.is_dir():
            raise SandboxError(f"--app {spec.app_dir}: not a directory")
        nats_host_port(spec.nats_url)

    def _marker(self, spec_or_sandbox: SandboxSpec | Sandbox) -> str:
        return str(spec_or_sandbox.dirs.launch)

    def start(self, spec: SandboxSpec) -> Sandbox:
        self.check(spec)
        net = spec.dirs.net
        try:
            net.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SandboxError(f"cannot prepare {net}: {exc.strerror}") from exc
        host, port = nats_host_port(spec.nats_url)
        relay_socket = net / RELAY_SOCKET
        proc, relay = start_behind_relay(
            bwrap_argv(spec, self.rootfs, self.binary),
            relay_socket,
            host,
            port,
            spec.root,
            spec.dirs.console,
            spec.name,
        )
        return Sandbox(
            self.name,
            spec.tier,
            spec.agent_id,
            spec.root,
            details={
                "pid": str(proc.pid),
                "relay_pid": str(relay),
                "relay_socket": str(relay_socket),
            },
            started_ms=int(time.time() * 1000),
        )

    def stop(self, sandbox: Sandbox, timeout: float = 10.0) -> None:
        pid = int(sandbox.details.get("pid", "0"))
        marker = self._marker(sandbox)
        # The sandbox's init is bwrap's child: SIGTERM reaches the agent through
        # it; SIGKILL if it lingers, then bwrap itself.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not process_alive(pid, marker):
                break
            for child in _children(pid):
                with contextlib.suppress(OSError):
                    os.kill(child, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process_alive(pid, marker):
                time.sleep(0.05)
        kill_process(pid, marker, timeout)
        relay = sandbox.details.get("relay_pid")
        if relay:
            stop_relay(int(relay), Path(sandbox.details["relay_socket"]))

    def status(self, sandbox: Sandbox) -> SandboxStatus:
        return console_status(sandbox, self._marker(sandbox))

    def logs(self, sandbox: Sandbox, *, follow: bool = False) -> Iterator[bytes]:
        return follow_console(sandbox, self._marker(sandbox), follow)

    def wait(self, sandbox: Sandbox, timeout: float | None = None) -> int:
        return wait_exit(sandbox, self._marker(sandbox), timeout)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found
