"""The ``docker`` backend: a hardened container per agent, through the Docker Engine API.

Two containers per agent, both labelled ``org.symbi.sandbox=<name>``:

``symbi-<tier>-<id>`` (the agent)
    read-only root filesystem, ``/tmp`` on tmpfs, every capability dropped,
    ``no-new-privileges``, memory/CPU/pids limits, the image's unprivileged
    user (uid 10001), a private IPC namespace and **no network at all**
    (``network_mode=none``: only loopback). Its mounts, all read-only: the
    credentials at ``/run/symbi``, the relay's socket directory at
    ``/run/symbi-net``, ``sandbox_init.py`` and, if given, the agent's own
    files at ``/app``.
``symbi-<tier>-<id>-relay``
    our own code, equally confined but on the host network: it listens on the
    Unix socket in ``/run/symbi-net`` and dials the host's NATS and nothing
    else. Inside the agent's container, ``sandbox_init.py`` relays
    ``127.0.0.1:4222`` to that socket.

So the agent reaches NATS and only NATS, with no iptables rules: this works
on a dockerd started with ``--iptables=false``. On your own hosts, keep the
agent's ``network_mode=none``; the relay needs a host path to NATS (host
networking, or a user-defined network where NATS is the only other member).
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import docker.types
import requests.exceptions

from agent_sdk.errors import SandboxError
from launchers import sandbox_init
from launchers.backend import (
    AGENT_GID,
    AGENT_UID,
    SANDBOX_APP_DIR,
    SANDBOX_LAUNCH_DIR,
    SANDBOX_NATS_LISTEN,
    SANDBOX_NET_DIR,
    BackendName,
    Sandbox,
    SandboxSpec,
    SandboxStatus,
)
from launchers.paths import DEFAULT_IMAGE

INIT_IN_SANDBOX = "/opt/symbi/sandbox_init.py"
RELAY_SOCKET = "nats.sock"
LABEL = "org.symbi.sandbox"
START_TIMEOUT_S = 60.0
_DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


@contextlib.contextmanager
def docker_errors(action: str) -> Iterator[None]:
    """Map Docker SDK, HTTP and OS errors to :class:`SandboxError`."""
    try:
        yield
    except SandboxError:
        raise
    except docker.errors.ImageNotFound as exc:
        raise SandboxError(f"{action}: image not found ({_explain(exc)})") from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"{action}: {_explain(exc)}") from exc
    except _DOCKER_ERRORS as exc:
        raise SandboxError(f"{action}: Docker is not reachable ({exc})") from exc


def _explain(exc: Any) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


def nats_host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise SandboxError(f"unusable NATS URL {url!r}: expected nats://HOST:PORT")
    return parts.hostname, parts.port or 4222


class DockerBackend:
    """Agents in hardened Docker containers (runc)."""

    name: ClassVar[BackendName] = "docker"
    runtime: ClassVar[str | None] = None
    sandbox_uid = AGENT_UID
    sandbox_gid = AGENT_GID

    def __init__(self, base_url: str | None = None, relay_image: str = DEFAULT_IMAGE) -> None:
        self.base_url = base_url
        self.relay_image = relay_image
        self._client: Any = None

    # -- connection -----------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            with docker_errors("connecting to Docker"):
                if self.base_url is None:
                    client = docker.from_env(timeout=60)
                else:
                    client = docker.DockerClient(base_url=self.base_url, timeout=60)
                client.ping()
            self._client = client
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def pids_limit(self, pids: int) -> int:
        """The cgroup's pids limit for an agent allowed ``pids`` processes and threads."""
        return pids

    # -- checks ---------------------------------------------------------------

    def check(self, spec: SandboxSpec) -> None:
        client = self.client()
        image = spec.image or DEFAULT_IMAGE
        for wanted in sorted({image, self.relay_image}):
            with docker_errors(f"looking up image {wanted!r}"):
                try:
                    client.images.get(wanted)
                except docker.errors.ImageNotFound as exc:
                    raise SandboxError(
                        f"image {wanted!r} not found: build the agent image with "
                        "`scripts/setup-sandboxes docker`, or `docker build`/`docker import` "
                        "your own (it needs python3)"
                    ) from exc
        for name in (spec.name, f"{spec.name}-relay"):
            if self._container(name) is not None:
                raise SandboxError(
                    f"a container named {name} already exists: stop that agent first "
                    f"(symbi agent stop --tier {spec.tier} --id {spec.agent_id})"
                )
        if spec.app_dir is not None and not spec.app_dir.is_dir():
            raise SandboxError(f"--app {spec.app_dir}: not a directory")

    def _container(self, name_or_id: str) -> Any:
        with docker_errors(f"inspecting {name_or_id}"):
            try:
                return self.client().containers.get(name_or_id)
            except docker.errors.NotFound:
                return None

    # -- start ----------------------------------------------------------------

    def _hardening(self, limits_memory_mb: int) -> dict[str, Any]:
        return {
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "ipc_mode": "private",
            "privileged": False,
            "mem_limit": f"{limits_memory_mb}m",
            "memswap_limit": f"{limits_memory_mb}m",
            "log_config": docker.types.LogConfig(
                type="json-file", config={"max-size": "10m", "max-file": "2"}
            ),
        }

    def _labels(self, spec: SandboxSpec, role: str) -> dict[str, str]:
        return {
            LABEL: spec.name,
            "org.symbi.tier": spec.tier,
            "org.symbi.agent": spec.agent_id,
            "org.symbi.role": role,
            "org.symbi.backend": self.name,
        }

    def _create_relay(self, spec: SandboxSpec) -> Any:
        host, port = nats_host_port(spec.nats_url)
        net = spec.dirs.net
        try:
            net.mkdir(mode=0o700, exist_ok=True)
            os.chown(net, self.sandbox_uid, self.sandbox_gid)
        except OSError as exc:
            raise SandboxError(f"cannot prepare {net}: {exc.strerror}") from exc
        with docker_errors("creating the NATS relay container"):
            return self.client().containers.create(
                self.relay_image,
                name=f"{spec.name}-relay",
                entrypoint=["python3", "-I", INIT_IN_SANDBOX],
                command=[
                    "relay",
                    "--listen",
                    f"unix:{SANDBOX_NET_DIR}/{RELAY_SOCKET}",
                    "--connect",
                    f"tcp:{host}:{port}",
                ],
                user=f"{self.sandbox_uid}:{self.sandbox_gid}",
                runtime="runc",  # our own code, on the host network to reach NATS
                network_mode="host",
                pids_limit=32,
                nano_cpus=500_000_000,
                mounts=[
                    _bind(Path(sandbox_init.__file__), INIT_IN_SANDBOX),
                    _bind(net, SANDBOX_NET_DIR, read_only=False),
                ],
                labels=self._labels(spec, "relay"),
                **self._hardening(64),
            )

    def _create_agent(self, spec: SandboxSpec) -> Any:
        mounts = [
            _bind(spec.dirs.launch, SANDBOX_LAUNCH_DIR),
            _bind(spec.dirs.net, SANDBOX_NET_DIR),
            _bind(Path(sandbox_init.__file__), INIT_IN_SANDBOX),
        ]
        if spec.app_dir is not None:
            mounts.append(_bind(spec.app_dir.absolute(), SANDBOX_APP_DIR))
        limits = spec.limits
        with docker_errors(f"creating container {spec.name}"):
            return self.client().containers.create(
                spec.image or DEFAULT_IMAGE,
                name=spec.name,
                hostname=spec.agent_id,
                entrypoint=[
                    "python3",
                    "-I",
                    INIT_IN_SANDBOX,
                    "run",
                    "--listen",
                    SANDBOX_NATS_LISTEN,
                    "--connect",
                    f"unix:{SANDBOX_NET_DIR}/{RELAY_SOCKET}",
                    "--",
                ],
                command=list(spec.command),
                user=f"{self.sandbox_uid}:{self.sandbox_gid}",
                environment=spec.sandbox_env(),
                working_dir=SANDBOX_APP_DIR if spec.app_dir is not None else None,
                runtime=self.runtime,
                network_mode="none",
                # The sandbox's own /tmp: a tmpfs inside its mount namespace.
                tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={limits.tmp_mb}m,mode=1777"},  # noqa: S108
                nano_cpus=int(limits.cpus * 1_000_000_000),
                pids_limit=self.pids_limit(limits.pids),
                mounts=mounts,
                labels=self._labels(spec, "agent"),
                **self._hardening(limits.memory_mb),
            )

    def start(self, spec: SandboxSpec) -> Sandbox:
        self.check(spec)
        created: list[Any] = []
        try:
            relay = self._create_relay(spec)
            created.append(relay)
            with docker_errors("starting the NATS relay"):
                relay.start()
            self._wait_for_socket(relay, spec.dirs.net / RELAY_SOCKET)
            agent = self._create_agent(spec)
            created.append(agent)
            with docker_errors(f"starting {spec.name}"):
                agent.start()
            self._wait_started(agent, spec)
        except BaseException:
            for container in reversed(created):
                with contextlib.suppress(*_DOCKER_ERRORS):
                    container.remove(force=True)
            raise
        return Sandbox(
            self.name,
            spec.tier,
            spec.agent_id,
            spec.root,
            details={"container": agent.id, "relay": relay.id},
            started_ms=int(time.time() * 1000),
        )

    def _wait_for_socket(self, relay: Any, socket_path: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if socket_path.exists():
                return
            with docker_errors("waiting for the NATS relay"):
                relay.reload()
                if relay.status not in ("created", "running"):
                    output = relay.logs().decode(errors="replace").strip()
                    raise SandboxError(f"the NATS relay exited: {output[-500:]}")
            time.sleep(0.05)
        raise SandboxError(f"the NATS relay did not come up within {START_TIMEOUT_S:.0f} s")

    def _wait_started(self, agent: Any, spec: SandboxSpec) -> None:
        """Until ``sandbox_init`` says it started the command, or could not."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with docker_errors(f"starting {spec.name}"):
                output = agent.logs().decode(errors="replace")
                if sandbox_init.STARTED in output:
                    return
                if sandbox_init.CANNOT_RUN in output:
                    line = output[output.index(sandbox_init.CANNOT_RUN) :].splitlines()[0]
                    raise SandboxError(
                        f"{spec.name}: {line.removeprefix('symbi-init: ')} "
                        f"in image {spec.image or DEFAULT_IMAGE}"
                    )
                agent.reload()
                if agent.status not in ("created", "running"):
                    code = agent.attrs["State"].get("ExitCode")
                    raise SandboxError(
                        f"{spec.name} exited with status {code} before starting its command: "
                        f"{output.strip()[-500:] or 'no output'} (does the image have python3?)"
                    )
            time.sleep(0.05)
        raise SandboxError(f"{spec.name} did not start its command within {START_TIMEOUT_S:.0f} s")

    # -- the rest of the protocol ---------------------------------------------

    def _containers(self, sandbox: Sandbox) -> list[Any]:
        """The agent's container first, then the relay; found by label, so never stale."""
        with docker_errors(f"listing the containers of {sandbox.name}"):
            found = self.client().containers.list(
                all=True, filters={"label": f"{LABEL}={sandbox.name}"}
            )
        return sorted(found, key=lambda c: c.labels.get("org.symbi.role") != "agent")

    def stop(self, sandbox: Sandbox, timeout: float = 10.0) -> None:
        for container in self._containers(sandbox):
            with docker_errors(f"stopping {container.name}"):
                try:
                    if container.status == "running":
                        container.stop(timeout=int(timeout))
                    container.remove(force=True)
                except docker.errors.NotFound:
                    pass

    def _agent(self, sandbox: Sandbox) -> Any:
        container = self._container(sandbox.details.get("container", sandbox.name))
        if container is None:
            raise SandboxError(f"sandbox {sandbox.name} does not exist (any more)")
        return container

    def status(self, sandbox: Sandbox) -> SandboxStatus:
        container = self._container(sandbox.details.get("container", sandbox.name))
        if container is None:
            return SandboxStatus("missing")
        state = container.attrs["State"]
        status = state.get("Status", "")
        if status in ("running", "paused", "restarting"):
            return SandboxStatus("running", detail=status)
        if status == "created":
            return SandboxStatus("created")
        return SandboxStatus("exited", state.get("ExitCode"), state.get("Error") or status)

    def logs(self, sandbox: Sandbox, *, follow: bool = False) -> Iterator[bytes]:
        container = self._agent(sandbox)
        with docker_errors(f"reading the logs of {sandbox.name}"):
            if not follow:
                yield container.logs(stdout=True, stderr=True)
                return
            yield from container.logs(stdout=True, stderr=True, stream=True, follow=True)

    def wait(self, sandbox: Sandbox, timeout: float | None = None) -> int:
        container = self._agent(sandbox)
        try:
            result = container.wait(timeout=timeout)
        except _DOCKER_ERRORS as exc:
            # A timeout surfaces as a read timeout or a connection error, by version.
            if timeout is not None and self.status(sandbox).state == "running":
                raise SandboxError(f"{sandbox.name} still runs after {timeout} s") from exc
            raise SandboxError(f"waiting for {sandbox.name}: {exc}") from exc
        return int(result["StatusCode"])


def _bind(source: Path, target: str, read_only: bool = True) -> Any:
    return docker.types.Mount(target, str(source), type="bind", read_only=read_only)
