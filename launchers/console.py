"""The output of sandboxes whose backend keeps no log: a console file.

Micro-VMs write their serial console to ``console.log``; bubblewrap agents
their stdout and stderr. ``sandbox_init.py`` marks the start of the command
(``symbi-init: started``), a failure to run it (``symbi-init: cannot run``)
and the command's exit status (``symbi-exit-status: N``) in that file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agent_sdk.errors import SandboxError
from launchers import sandbox_init
from launchers.backend import Sandbox, SandboxStatus
from launchers.processes import process_alive

START_TIMEOUT_S = 180.0
_EXIT_RE = re.compile(rf"{sandbox_init.EXIT_STATUS} (-?\d+)")


def console_text(console: Path) -> str:
    try:
        return console.read_bytes().replace(b"\r\n", b"\n").decode(errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise SandboxError(f"cannot read {console}: {exc.strerror}") from exc


def exit_status(console: Path) -> int | None:
    found = _EXIT_RE.findall(console_text(console))
    return int(found[-1]) if found else None


def wait_started(console: Path, alive: Callable[[], bool], name: str) -> None:
    """Until ``sandbox_init`` in the sandbox started the command; else :class:`SandboxError`."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = console_text(console)
        if sandbox_init.STARTED in text:
            return
        if sandbox_init.CANNOT_RUN in text:
            line = text[text.index(sandbox_init.CANNOT_RUN) :].splitlines()[0]
            raise SandboxError(f"{name}: {line.removeprefix('symbi-init: ')}")
        if not alive():
            tail = "\n".join(text.strip().splitlines()[-5:]) or "no output"
            raise SandboxError(f"{name} ended before starting its command: {tail}")
        time.sleep(0.1)
    raise SandboxError(f"{name} did not start its command within {START_TIMEOUT_S:.0f} s")


def console_status(sandbox: Sandbox, marker: str) -> SandboxStatus:
    pid = int(sandbox.details.get("pid", "0"))
    if pid and process_alive(pid, marker):
        return SandboxStatus("running")
    code = exit_status(sandbox.dirs.console)
    if code is None and not sandbox.dirs.console.exists():
        return SandboxStatus("missing")
    return SandboxStatus("exited", code, "" if code is not None else "killed")


def follow_console(sandbox: Sandbox, marker: str, follow: bool) -> Iterator[bytes]:
    console = sandbox.dirs.console
    pid = int(sandbox.details.get("pid", "0"))
    try:
        with console.open("rb") as f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    yield chunk.replace(b"\r\n", b"\n")
                    continue
                if not follow or not process_alive(pid, marker):
                    rest = f.read()
                    if rest:
                        yield rest.replace(b"\r\n", b"\n")
                    return
                time.sleep(0.2)
    except FileNotFoundError as exc:
        raise SandboxError(f"sandbox {sandbox.name} has no console log") from exc
    except OSError as exc:
        raise SandboxError(f"cannot read {console}: {exc.strerror}") from exc


def wait_exit(sandbox: Sandbox, marker: str, timeout: float | None) -> int:
    pid = int(sandbox.details.get("pid", "0"))
    deadline = None if timeout is None else time.monotonic() + timeout
    while process_alive(pid, marker):
        if deadline is not None and time.monotonic() > deadline:
            raise SandboxError(f"{sandbox.name} still runs after {timeout} s")
        time.sleep(0.1)
    code = exit_status(sandbox.dirs.console)
    if code is None:
        raise SandboxError(f"{sandbox.name} ended without an exit status (killed?)")
    return code
