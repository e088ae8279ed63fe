"""The ``gvisor`` backend: the Docker backend with ``--runtime=runsc``.

gVisor runs the agent on its own user-space kernel (the Sentry), so a kernel
exploit inside the agent meets gVisor, not the host's kernel. On this kind of
host only the ``ptrace`` platform works, and the sandbox has no network
(``--network=none``: loopback in gVisor's own stack); the agent reaches the
relay's Unix socket on a bind mount, which runsc allows with
``--host-uds=open``. ``scripts/setup-sandboxes gvisor`` registers the runtime
in ``/etc/docker/daemon.json`` as::

    "runtimes": {"runsc": {"path": "/usr/bin/runsc",
                           "runtimeArgs": ["--platform=ptrace", "--network=none",
                                           "--host-uds=open"]}}

On hosts where KVM works, ``--platform=kvm`` is faster; keep ``--network=none``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from agent_sdk.errors import SandboxError
from launchers.backend import BackendName, SandboxSpec
from launchers.docker_backend import DockerBackend, docker_errors
from launchers.paths import SETUP_HINT

RUNTIME = "runsc"
#: Host processes and threads of gVisor itself in the container's cgroup: the
#: Sentry's threads and, on the ptrace platform, a stub process per address
#: space and a host thread per guest thread (an idle python3 uses 38). Below
#: that, the Sentry panics ("error initializing first thread").
PIDS_OVERHEAD = 128


class GVisorBackend(DockerBackend):
    """Agents in Docker containers under gVisor (``runsc``)."""

    name: ClassVar[BackendName] = "gvisor"
    runtime: ClassVar[str | None] = RUNTIME

    def pids_limit(self, pids: int) -> int:
        return pids + PIDS_OVERHEAD

    def check(self, spec: SandboxSpec) -> None:
        with docker_errors("asking Docker for its runtimes"):
            runtimes: dict[str, Any] = self.client().info().get("Runtimes") or {}
        if RUNTIME not in runtimes:
            raise SandboxError(
                f"Docker has no {RUNTIME!r} runtime (it has {', '.join(sorted(runtimes))}): "
                f"{SETUP_HINT} gvisor"
            )
        args = runtimes[RUNTIME].get("runtimeArgs") or []
        if not any(a in args for a in ("--host-uds=open", "--host-uds=all")):
            raise SandboxError(
                f"the {RUNTIME!r} runtime lacks --host-uds=open, so agents could not reach "
                f"the NATS relay: {SETUP_HINT} gvisor"
            )
        if "--network=host" in args:
            raise SandboxError(
                f"the {RUNTIME!r} runtime uses --network=host, which would give agents the "
                f"host's network: use --network=none ({SETUP_HINT} gvisor)"
            )
        super().check(spec)
