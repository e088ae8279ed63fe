"""A NATS relay as a host process, for backends without Docker to run it.

``sandbox_init.py relay`` listens on the sandbox's Unix socket (the process
backend's bind mount, Firecracker's vsock socket) and dials the host's NATS.
It runs detached, in its own session, so that ``symbi agent launch`` can
return; ``stop`` finds it again by pid *and* command line.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from agent_sdk.errors import SandboxError
from launchers import sandbox_init
from launchers.console import wait_started
from launchers.processes import kill_process, process_alive


def spawn_relay(listen_socket: Path, connect: str, log: Path, timeout: float = 10.0) -> int:
    """Start the relay; return its pid once the socket exists."""
    listen = f"unix:{listen_socket}"
    argv = [sys.executable, "-I", sandbox_init.__file__, "relay", "--listen", listen]
    argv += ["--connect", connect]
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as exc:
        raise SandboxError(f"cannot start the NATS relay: {exc.strerror}") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listen_socket.exists():
            return proc.pid
        if proc.poll() is not None:
            output = log.read_text(errors="replace").strip()[-300:]
            raise SandboxError(f"the NATS relay exited: {output}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise SandboxError(f"the NATS relay did not come up within {timeout:.0f} s")


def relay_marker(listen_socket: Path) -> str:
    """The argument that identifies this relay's process in ``/proc/<pid>/cmdline``."""
    return f"unix:{listen_socket}"


def stop_relay(pid: int, listen_socket: Path, timeout: float = 5.0) -> None:
    kill_process(pid, relay_marker(listen_socket), timeout)
    # A relay we started is our child only within one process; reap it if so.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def relay_alive(pid: int, listen_socket: Path) -> bool:
    return process_alive(pid, relay_marker(listen_socket))


def start_behind_relay(
    argv: list[str],
    relay_socket: Path,
    nats_host: str,
    nats_port: int,
    root: Path,
    console: Path,
    name: str,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the relay to NATS, then the sandbox process ``argv`` with its console.

    Returns ``(process, relay pid)`` once the sandbox has started; on any
    failure both are stopped again, so nothing is left behind.
    """
    relay = spawn_relay(relay_socket, f"tcp:{nats_host}:{nats_port}", root / "relay.log")
    try:
        with console.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
    except OSError as exc:
        stop_relay(relay, relay_socket)
        raise SandboxError(f"cannot start {name}: {exc.strerror}") from exc
    try:
        wait_started(console, lambda: proc.poll() is None, name)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stop_relay(relay, relay_socket)
        raise
    return proc, relay
