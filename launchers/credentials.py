"""Credential files on the host: written for one sandbox, removed when it stops.

The launch directory of a sandbox holds ``agent.creds`` (the NATS user JWT
and seed) and ``agent.json`` (whose ``nats_url`` is the address *inside* the
sandbox). Both are created exclusively with mode 0600 and owned by the
sandbox's user; the directory becomes 0500. Nothing here logs or raises with
the contents.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from agent_sdk.errors import SandboxError
from broker_gateway.gateway import AgentCredentials

CREDS_FILE = "agent.creds"
INFO_FILE = "agent.json"


def _write_new(path: Path, data: bytes, uid: int, gid: int, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_launch_files(
    directory: Path,
    creds: AgentCredentials,
    sandbox_nats_url: str,
    uid: int,
    gid: int,
    extra: dict[str, bytes] | None = None,
) -> None:
    """Create ``directory`` with the agent's files for a sandbox user ``uid:gid``.

    ``extra`` adds more read-only files (mode 0400 for that user), e.g. a
    micro-VM's ``launch.json``. Fails if ``directory`` exists: credentials are
    never written over another sandbox's.
    """
    if (uid, gid) != (os.geteuid(), os.getegid()) and os.geteuid() != 0:
        raise SandboxError(
            f"credentials must belong to the sandbox user {uid}:{gid}: run the launcher as root"
        )
    info: dict[str, Any] = dict(creds.info)
    info["nats_url"] = sandbox_nats_url
    try:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
        _write_new(directory / CREDS_FILE, creds.creds.encode(), uid, gid)
        _write_new(directory / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode(), uid, gid)
        for name, data in (extra or {}).items():
            _write_new(directory / name, data, uid, gid, mode=0o400)
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(directory, uid, gid)
        os.chmod(directory, 0o500)
    except FileExistsError as exc:
        raise SandboxError(f"{directory} already exists: is that sandbox still there?") from exc
    except OSError as exc:
        remove_tree(directory)
        raise SandboxError(f"cannot write credentials into {directory}: {exc.strerror}") from exc


def remove_tree(directory: Path) -> None:
    """Remove ``directory`` and everything in it, read-only subdirectories included."""
    try:
        if directory.is_symlink() or directory.is_file():
            directory.unlink()
            return
        if not directory.exists():
            return
        # Credential directories are 0500: make them writable to empty them.
        for sub in [directory, *directory.rglob("*")]:
            if sub.is_dir() and not sub.is_symlink():
                os.chmod(sub, stat.S_IRWXU)
        shutil.rmtree(directory)
    except OSError as exc:
        raise SandboxError(f"cannot remove {directory}: {exc.strerror}") from exc
