"""Creation and storage of nkeys (seeds) in the state directory.

Every seed is a file of mode 0600 under ``<state>/keys``; a seed never appears
in argv, the environment, a log line or an exception message.
"""

from __future__ import annotations

import os
from pathlib import Path

import nacl.signing
import nkeys

from agent_sdk.errors import ConfigError

PREFIXES = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}


def new_seed(kind: str) -> bytes:
    """A fresh random seed for an operator, account or user nkey."""
    raw = bytes(nacl.signing.SigningKey.generate())
    seed: bytes = nkeys.encode_seed(raw, PREFIXES[kind])
    return seed


def keypair(seed: bytes) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(seed))


def public_key(seed: bytes) -> str:
    key: bytes = keypair(seed).public_key
    return key.decode()


def write_secret(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically, creating parents 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class KeyStore:
    """Named seeds under ``<state>/keys``, created on first use and reused after."""

    def __init__(self, root: Path) -> None:
        self.root = root / "keys"

    def path(self, name: str) -> Path:
        return self.root / f"{name}.nk"

    def seed(self, name: str, kind: str) -> bytes:
        path = self.path(name)
        if path.exists():
            try:
                return path.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read key {path}: {exc.strerror}") from exc
        seed = new_seed(kind)
        write_secret(path, seed)
        return seed

    def keypair(self, name: str, kind: str) -> nkeys.KeyPair:
        return keypair(self.seed(name, kind))


ROUTE_KEY = "router-signing"


def route_signer_seed(store: KeyStore) -> bytes:
    """Seed of the key with which policy workers sign each delivery's route tag."""
    return store.seed(ROUTE_KEY, "user")
