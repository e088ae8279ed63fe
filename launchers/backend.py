"""The sandbox backend protocol and the values that cross it.

A backend turns a :class:`SandboxSpec` (who, what command, which files) into
a running sandbox and back. Every backend gives the agent the same view:

- its credentials as read-only files in ``/run/symbi`` (``agent.creds`` and
  ``agent.json``, mode 0600, owned by the sandbox user), never in argv or the
  environment;
- NATS at ``nats://127.0.0.1:4222`` inside the sandbox, relayed to the host's
  NATS and nowhere else (see :mod:`launchers.sandbox_init`);
- its own files, if any, read-only in ``/app``.

Backends are synchronous (the Docker SDK and subprocesses are); async callers
use ``asyncio.to_thread``. Every method raises :class:`SandboxError` for
failures, with the Docker or OS error chained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from agent_sdk.errors import SandboxError
from agent_sdk.names import Tier, check_agent_id, check_tier

BackendName = Literal["docker", "gvisor", "microvm", "firecracker", "process"]
BACKENDS: tuple[BackendName, ...] = ("docker", "gvisor", "microvm", "firecracker", "process")

SandboxState = Literal["created", "running", "exited", "missing"]

#: Where the agent finds NATS inside every sandbox.
SANDBOX_NATS_URL = "nats://127.0.0.1:4222"
SANDBOX_NATS_LISTEN = "tcp:127.0.0.1:4222"
#: Inside the sandbox: the credentials directory, the relay socket, the agent's files.
SANDBOX_LAUNCH_DIR = "/run/symbi"
SANDBOX_NET_DIR = "/run/symbi-net"
SANDBOX_APP_DIR = "/app"
#: The unprivileged user of the agent image (scripts/setup-sandboxes creates it).
AGENT_UID = 10001
AGENT_GID = 10001


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox."""

    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 256
    tmp_mb: int = 64

    def __post_init__(self) -> None:
        if self.memory_mb < 64 or self.cpus <= 0 or self.pids < 8 or self.tmp_mb < 1:
            raise SandboxError(
                "limits too small: memory >= 64 MiB, cpus > 0, pids >= 8, /tmp >= 1 MiB"
            )


@dataclass(frozen=True)
class SandboxSpec:
    """What to start: the agent, its command and the host files prepared for it.

    ``root`` is the sandbox's host directory (see :class:`SandboxDir`); its
    ``launch`` subdirectory already holds the credentials when a backend
    starts. ``nats_url`` is the host's NATS, which only the relay dials.
    ``image`` is a Docker image (docker, gvisor), ``rootfs`` an ext4 root
    disk (microvm, firecracker); ``None`` means the one setup-sandboxes built.
    """

    tier: Tier
    agent_id: str
    command: tuple[str, ...]
    root: Path
    nats_url: str
    image: str | None = None
    rootfs: Path | None = None
    app_dir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        check_tier(self.tier)
        check_agent_id(self.agent_id)
        if not self.command or not self.command[0]:
            raise SandboxError("no command given: the sandbox needs a program to run")

    @property
    def name(self) -> str:
        return sandbox_name(self.tier, self.agent_id)

    @property
    def dirs(self) -> SandboxDir:
        return SandboxDir(self.root)

    def sandbox_env(self) -> dict[str, str]:
        """The agent's environment: the user's, plus where to find NATS and the files."""
        env = dict(self.env)
        env.update(
            {
                "SYMBIONT_AGENT_ADDRESS": f"{self.tier}.{self.agent_id}",
                "SYMBIONT_AGENT_DIR": SANDBOX_LAUNCH_DIR,
                "SYMBIONT_NATS_URL": SANDBOX_NATS_URL,
            }
        )
        return env


def sandbox_name(tier: str, agent_id: str) -> str:
    return f"symbi-{tier}-{agent_id}"


@dataclass(frozen=True)
class SandboxDir:
    """The host directory of one sandbox: ``<state>/sandboxes/<tier>.<id>``."""

    root: Path

    @property
    def launch(self) -> Path:
        """Credentials and ``agent.json``: read-only at ``/run/symbi`` in the sandbox."""
        return self.root / "launch"

    @property
    def net(self) -> Path:
        """The relay's Unix socket (or vsock socket): the sandbox's only way out."""
        return self.root / "net"

    @property
    def record(self) -> Path:
        return self.root / "sandbox.json"

    @property
    def console(self) -> Path:
        """The agent's output, for backends without a log driver of their own."""
        return self.root / "console.log"


@dataclass(frozen=True)
class Sandbox:
    """A started sandbox, as recorded in ``sandbox.json`` so that any process can stop it."""

    backend: BackendName
    tier: Tier
    agent_id: str
    root: Path
    details: dict[str, str] = field(default_factory=dict)
    started_ms: int = 0
    #: The agent that asked a launcher service for it (``host.launcher``), if one did.
    owner: str = ""

    @property
    def name(self) -> str:
        return sandbox_name(self.tier, self.agent_id)

    @property
    def dirs(self) -> SandboxDir:
        return SandboxDir(self.root)

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["root"] = str(self.root)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Sandbox:
        try:
            data = json.loads(text)
            backend = data["backend"]
            if backend not in BACKENDS:
                raise ValueError(backend)
            return cls(
                backend=backend,
                tier=check_tier(data["tier"]),
                agent_id=check_agent_id(data["agent_id"]),
                root=Path(data["root"]),
                details={str(k): str(v) for k, v in data.get("details", {}).items()},
                started_ms=int(data.get("started_ms", 0)),
                owner=str(data.get("owner", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SandboxError("unreadable sandbox record") from exc


@dataclass(frozen=True)
class SandboxStatus:
    state: SandboxState
    exit_code: int | None = None
    detail: str = ""


class SandboxBackend(Protocol):
    """Starts, stops and inspects sandboxes of one kind."""

    @property
    def name(self) -> BackendName: ...

    @property
    def sandbox_uid(self) -> int:
        """The uid that must own the credential files: the agent's user in the sandbox."""

    @property
    def sandbox_gid(self) -> int: ...

    def check(self, spec: SandboxSpec) -> None:
        """Raise :class:`SandboxError` now if ``start`` cannot work (runtime down, no image)."""

    def start(self, spec: SandboxSpec) -> Sandbox:
        """Start the sandbox; return once its command runs (not when it finishes).

        Raises :class:`SandboxError`, leaving nothing behind, if the command
        cannot be started.
        """

    def stop(self, sandbox: Sandbox, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, then SIGKILL after ``timeout``) and remove what the backend made.

        Idempotent: stopping a sandbox that is gone is not an error.
        """

    def status(self, sandbox: Sandbox) -> SandboxStatus: ...

    def logs(self, sandbox: Sandbox, *, follow: bool = False) -> Iterator[bytes]:
        """The agent's output so far (and then as it comes, with ``follow``)."""

    def wait(self, sandbox: Sandbox, timeout: float | None = None) -> int:
        """The command's exit status once it exits; :class:`SandboxError` on timeout."""
