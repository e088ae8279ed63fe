"""Sandbox launchers: Docker, gVisor, micro-VM, Firecracker and bubblewrap backends.

:class:`Launcher` registers an agent, hands it its credentials and starts it
in a :class:`SandboxBackend`; ``launchers.cli`` holds the ``symbi agent
launch | stop | logs`` commands, ``launchers.service`` the per-tier launcher
service behind ``host.launcher`` (``python -m launchers --tier T``).
Backends are imported on first use, so that the Docker SDK is needed only by
the Docker-based ones.
"""

from launchers.backend import (
    BACKENDS,
    BackendName,
    Limits,
    Sandbox,
    SandboxBackend,
    SandboxDir,
    SandboxSpec,
    SandboxStatus,
)
from launchers.control import ServicePolicy
from launchers.launch import BusAdmin, Launcher, LaunchRequest
from launchers.revocation_watch import watch_revocations
from launchers.selection import choose_backend, default_backend, make_backend
from launchers.tier_bus import TierBus

__all__ = [
    "BACKENDS",
    "BackendName",
    "BusAdmin",
    "LaunchRequest",
    "Launcher",
    "Limits",
    "Sandbox",
    "SandboxBackend",
    "SandboxDir",
    "SandboxSpec",
    "SandboxStatus",
    "ServicePolicy",
    "TierBus",
    "choose_backend",
    "default_backend",
    "make_backend",
    "watch_revocations",
]
