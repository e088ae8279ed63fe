"""The state directory: keys, service credentials, server config and data.

Layout::

    <state>/keys/*.nk            seeds (0600)
    <state>/creds/*.creds        service users' credentials (0600)
    <state>/nats/                server.conf, server.log, jwt/ (resolver), jetstream/
    <state>/runtime.json         written by ``symbi up`` while it runs: URLs, pid
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_sdk.errors import ConfigError
from broker_gateway import jwt
from broker_gateway.accounts import ROUTER, SYS
from broker_gateway.keys import KeyStore, write_secret
from broker_gateway.users import mint_service

ENV_STATE_DIR = "SYMBIONT_STATE_DIR"


def default_state_dir() -> Path:
    return Path(os.environ.get(ENV_STATE_DIR, "./.symbi"))


@dataclass(frozen=True)
class StateDir:
    root: Path

    @classmethod
    def open(cls, root: Path | str | None = None, create: bool = True) -> StateDir:
        """Check that the directory is usable (creating it 0700 if asked) before anything."""
        path = Path(root) if root is not None else default_state_dir()
        path = path.expanduser().absolute()
        try:
            if create:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            elif not path.is_dir():
                raise ConfigError(f"state directory {path} does not exist (is `symbi up` running?)")
            probe = path / f".write-test-{os.getpid()}"  # processes open it concurrently
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"state directory {path} is unusable: {exc.strerror}") from exc
        return cls(path)

    @property
    def keys(self) -> KeyStore:
        return KeyStore(self.root)

    @property
    def runtime_path(self) -> Path:
        return self.root / "runtime.json"

    def service_creds(self, name: str) -> Path:
        """Credentials of a service user (``router`` or ``sys``), minted once and kept."""
        path = self.root / "creds" / f"{name}.creds"
        if not path.exists():
            account = {"router": ROUTER, "sys": SYS}[name]
            token, seed = mint_service(name, self.keys.keypair(f"account-{account}", "account"))
            write_secret(path, jwt.creds_file(token, seed))
        return path

    def lock(self) -> int:
        """Hold the directory for one ``symbi up``: two servers must never share a store.

        Returns the descriptor that holds the lock; it is released when closed
        (or when the process dies).
        """
        fd = os.open(self.root / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"state directory {self.root} is in use by another `symbi up`"
            ) from exc
        return fd

    def write_runtime(self, info: dict[str, Any]) -> None:
        write_secret(self.runtime_path, json.dumps(info, indent=2))

    def read_runtime(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = json.loads(self.runtime_path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no running broker for state directory {self.root}: start `symbi up` first"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable {self.runtime_path}") from exc
        return info

    def clear_runtime(self) -> None:
        self.runtime_path.unlink(missing_ok=True)
