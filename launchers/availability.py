"""Which tiers can have a launcher on this host: a quick look for ``symbi up``.

It must not slow ``symbi up`` down nor fail it, so it only looks: whether
the Docker socket accepts a connection (without importing the Docker SDK),
whether ``runsc``, QEMU or Firecracker are installed, whether the micro-VM
image was built. Whatever it finds missing is reported, not raised; a launch
checks its runtime properly again (:meth:`SandboxBackend.check`).
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from agent_sdk.names import TIERS, Tier
from launchers.paths import SETUP_HINT, MicroVmImage

DEFAULT_DOCKER_HOST: Final = "unix:///var/run/docker.sock"
QEMU: Final = "qemu-system-x86_64"


@dataclass(frozen=True)
class TierRuntime:
    """The runtime a tier's launcher would use, and why it cannot, if it cannot."""

    tier: Tier
    runtime: str
    missing: str | None = None

    @property
    def available(self) -> bool:
        return self.missing is None


def _docker(env: Mapping[str, str]) -> str | None:
    """Why Docker is unusable, or None (a remote daemon is taken on trust)."""
    host = env.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    url = urllib.parse.urlsplit(host)
    if url.scheme != "unix":
        return None
    path = url.path or "/var/run/docker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
        except OSError as exc:
            return f"Docker not reachable at {host} ({exc.strerror or exc})"
    return None


def _microvm() -> TierRuntime:
    if shutil.which("firecracker") is not None:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return TierRuntime(
                "firecracker", "firecracker", "micro-VM runtime unusable (no /dev/kvm)"
            )
        runtime = "firecracker"
    elif shutil.which(QEMU) is not None:
        runtime = QEMU
    else:
        return TierRuntime("firecracker", QEMU, f"micro-VM runtime missing ({QEMU} not found)")
    image = MicroVmImage.default()
    if not all(p.is_file() for p in (image.kernel, image.initrd, image.rootfs)):
        return TierRuntime("firecracker", runtime, f"micro-VM image missing ({SETUP_HINT} microvm)")
    return TierRuntime("firecracker", runtime)


def probe(env: Mapping[str, str] | None = None) -> list[TierRuntime]:
    """Every tier, in order, with its runtime or what is missing for it."""
    env = os.environ if env is None else env
    if os.geteuid() != 0:
        why = "launchers need root (credential files belong to the sandbox user)"
        return [
            TierRuntime(t, r, why) for t, r in zip(TIERS, ("docker", "runsc", QEMU), strict=True)
        ]
    docker = _docker(env)
    gvisor = docker
    if gvisor is None and shutil.which("runsc") is None:
        gvisor = "gVisor runtime missing (runsc not found)"
    return [
        TierRuntime("docker", "docker", docker),
        TierRuntime("gvisor", "runsc", gvisor),
        _microvm(),
    ]


def summary(runtimes: list[TierRuntime]) -> str:
    """``docker (docker), gvisor (runsc); firecracker: micro-VM runtime missing (...)``."""
    running = ", ".join(f"{r.tier} ({r.runtime})" for r in runtimes if r.available)
    missing = "; ".join(f"{r.tier}: {r.missing}" for r in runtimes if not r.available)
    return "; ".join(part for part in (running or "none", missing) if part)
