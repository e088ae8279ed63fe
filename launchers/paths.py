"""Where the launchers find what ``scripts/setup-sandboxes`` built, and keep their sandboxes.

- the cache: ``$SYMBIONT_CACHE_DIR``, else ``/var/cache/symbi`` as root, else
  ``~/.cache/symbi``: the agent rootfs and, under ``microvm/``, the kernel,
  initramfs and root disk of the micro-VMs;
- the agent image: ``$SYMBIONT_AGENT_IMAGE``, else ``symbi/agent:latest``;
- the sandboxes: ``<state dir>/sandboxes/<tier>.<id>/`` (see
  :class:`launchers.backend.SandboxDir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent_sdk.errors import SandboxError
from agent_sdk.names import check_agent_id, check_tier

ENV_CACHE_DIR = "SYMBIONT_CACHE_DIR"
ENV_AGENT_IMAGE = "SYMBIONT_AGENT_IMAGE"
DEFAULT_IMAGE = os.environ.get(ENV_AGENT_IMAGE) or "symbi/agent:latest"
SETUP_HINT = "run scripts/setup-sandboxes"


def cache_dir() -> Path:
    configured = os.environ.get(ENV_CACHE_DIR)
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/cache/symbi")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "symbi"


@dataclass(frozen=True)
class MicroVmImage:
    """The kernel, initramfs and read-only root disk that every micro-VM boots."""

    kernel: Path
    initrd: Path
    rootfs: Path

    @classmethod
    def default(cls) -> MicroVmImage:
        root = cache_dir() / "microvm"
        # The uncompressed kernel boots through PVH, skipping the decompression
        # that takes seconds under software emulation; vmlinuz works too.
        kernel = root / "vmlinux"
        if not kernel.is_file():
            kernel = root / "vmlinuz"
        return cls(kernel, root / "initrd.img", root / "rootfs.ext4")

    def check(self) -> None:
        for what, path in (
            ("kernel", self.kernel),
            ("initramfs", self.initrd),
            ("root disk", self.rootfs),
        ):
            if not path.is_file():
                raise SandboxError(
                    f"micro-VM {what} {path} not found: {SETUP_HINT} microvm "
                    f"(or set {ENV_CACHE_DIR})"
                )


def sandboxes_dir(state_root: Path) -> Path:
    return state_root / "sandboxes"


def sandbox_root(state_root: Path, tier: str, agent_id: str) -> Path:
    return sandboxes_dir(state_root) / f"{check_tier(tier)}.{check_agent_id(agent_id)}"
