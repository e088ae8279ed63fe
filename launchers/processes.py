"""Processes that outlive the launcher: found again by pid *and* command line.

A sandbox's VM, bubblewrap or relay process runs detached (``symbi agent
launch`` returns while it runs), so a later ``stop`` knows it only by the pid
in the sandbox record. A pid can be reused; every check therefore also looks
for a marker (the sandbox's name, its launch directory, its socket) in
``/proc/<pid>/cmdline`` before signalling anything.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agent_sdk.errors import SandboxError


def process_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and is the VM we started (its command line holds ``marker``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if marker.encode() not in cmdline.split(b"\0"):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def read_pid(pidfile: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise SandboxError(f"no pid in {pidfile}")


def kill_process(pid: int, marker: str, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it lingers; nothing if ``pid`` is not that process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not process_alive(pid, marker):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        except OSError as exc:
            raise SandboxError(f"cannot stop process {pid}: {exc.strerror}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process_alive(pid, marker):
            time.sleep(0.05)
