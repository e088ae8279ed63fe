"""Small ext4 images built from a directory (``mke2fs -d``), without mounting anything.

The micro-VM backends hand a guest its launch files and its app as read-only
disks: ownership and modes are copied from the host files, so credentials
owned by uid 10001 with mode 0600 stay exactly that inside the guest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from agent_sdk.errors import SandboxError

MKE2FS = "mke2fs"


def directory_size(path: Path) -> int:
    total = 0
    for sub in path.rglob("*"):
        if sub.is_file() and not sub.is_symlink():
            total += sub.stat().st_size
    return total


def make_ext4(source: Path, image: Path, label: str, slack_mb: int = 8) -> None:
    """Write ``image`` (mode 0600): an ext4 filesystem labelled ``label`` holding ``source``."""
    mke2fs = shutil.which(MKE2FS) or shutil.which(MKE2FS, path="/usr/sbin:/sbin")
    if mke2fs is None:
        raise SandboxError("mke2fs not found: apt-get install e2fsprogs")
    size_mb = directory_size(source) * 5 // 4 // (1024 * 1024) + slack_mb
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, size_mb * 1024 * 1024)
        os.close(fd)
    except OSError as exc:
        raise SandboxError(f"cannot create {image}: {exc.strerror}") from exc
    # No journal: the guest mounts it read-only. root_owner from the source directory.
    st = source.stat()
    result = subprocess.run(
        [
            mke2fs,
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^has_journal",
            "-L",
            label,
            "-E",
            f"root_owner={st.st_uid}:{st.st_gid}",
            "-d",
            str(source),
            str(image),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        image.unlink(missing_ok=True)
        raise SandboxError(f"mke2fs could not build {image}: {result.stderr.strip()[-300:]}")
