"""Which backend runs a tier's agents, and which ones a tier may use.

A tier names a promise about isolation: a backend may be at least as strong
as its tier's default, never weaker. ``process`` (bubblewrap) is no isolation
boundary at all and is refused unless explicitly allowed, for development.

==============  ==================  =================================
tier            default backend     also allowed
==============  ==================  =================================
``docker``      ``docker``          gvisor, microvm, firecracker
``gvisor``      ``gvisor``          microvm, firecracker
``firecracker`` ``firecracker`` if  microvm (QEMU ``-M microvm``, the same
                its binary exists,  guest image)
                else ``microvm``
==============  ==================  =================================
"""

from __future__ import annotations

import shutil

from agent_sdk.errors import SandboxError
from agent_sdk.names import Tier, check_tier
from launchers.backend import BACKENDS, BackendName, SandboxBackend

STRENGTH: dict[BackendName, int] = {
    "process": 0,
    "docker": 1,
    "gvisor": 2,
    "microvm": 3,
    "firecracker": 3,
}
TIER_MINIMUM: dict[Tier, int] = {"docker": 1, "gvisor": 2, "firecracker": 3}


def default_backend(tier: str) -> BackendName:
    tier = check_tier(tier)
    if tier == "firecracker":
        return "firecracker" if shutil.which("firecracker") else "microvm"
    return tier


def choose_backend(tier: str, backend: str | None, allow_unsandboxed: bool = False) -> BackendName:
    """``backend`` (or the tier's default) if it may run that tier's agents; else raise."""
    tier = check_tier(tier)
    if backend is None:
        return default_backend(tier)
    if backend not in BACKENDS:
        raise SandboxError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")
    name: BackendName = backend
    if name == "process":
        if not allow_unsandboxed:
            raise SandboxError(
                "the process backend (bubblewrap) is not an isolation boundary: "
                "it runs only with --allow-unsandboxed, for development"
            )
        return name
    if STRENGTH[name] < TIER_MINIMUM[tier]:
        raise SandboxError(f"backend {name!r} is weaker than the {tier} tier requires")
    return name


def make_backend(name: BackendName) -> SandboxBackend:
    """A backend instance with default settings (imports only what it needs)."""
    if name == "docker":
        from launchers.docker_backend import DockerBackend

        return DockerBackend()
    if name == "gvisor":
        from launchers.gvisor_backend import GVisorBackend

        return GVisorBackend()
    if name == "microvm":
        from launchers.microvm_backend import MicroVmBackend

        return MicroVmBackend()
    if name == "firecracker":
        from launchers.firecracker_backend import FirecrackerBackend

        return FirecrackerBackend()
    from launchers.process_backend import ProcessBackend

    return ProcessBackend()
