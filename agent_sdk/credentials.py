"""An agent's identity on disk: ``agent.creds`` (NATS credentials) and ``agent.json``.

``symbi agent register --out DIR`` writes both files. The credentials file is
the standard NATS one (user JWT plus nkey seed): nats-py reads it itself to
connect, and the SDK reads it once more for the seed, because the same key
signs every envelope. The seed is a secret even when malformed, so no message,
``repr`` or log line here ever contains it, nor the JWT (style: never log a
seed, a JWT or a creds file).

``agent.json`` is validated once, at start-up, into a frozen
:class:`AgentConfig`: a hand-edited or mismatched file fails here with a
message naming the field, instead of later as a confusing refusal by the
server or as messages silently dropped. Unknown fields are accepted, because
the command-line contract promises "at least" the listed ones and a newer
gateway may add more.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent_sdk.errors import ConfigError, CryptoError, EnvelopeError
from agent_sdk.names import LEVELS, AgentAddress, Level
from agent_sdk.sealing import EncryptionKeyPair, decode_key
from agent_sdk.signing import Signer, decode_user_public_key

log = logging.getLogger(__name__)

ENV_AGENT_DIR: Final = "SYMBIONT_AGENT_DIR"
CONFIG_FILE: Final = "agent.json"
CREDS_FILE: Final = "agent.creds"

# The block markers as nsc and nats-py write and read them: three or more dashes
# on each side, with either 5 or 6 dashes in practice ("------END ...------").
_BLOCK_RE: Final = re.compile(r"^-{3,}\s*(BEGIN|END) (NATS USER JWT|USER NKEY SEED)\s*-{3,}$")
_JWT_RE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# A subject prefix without wildcards or whitespace: it becomes part of every reply inbox.
_SUBJECT_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,255}")
_URL_SCHEMES: Final = ("nats://", "tls://", "ws://", "wss://")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A parsed NATS credentials file: the user JWT and a :class:`Signer` for its seed.

    ``jwt`` is excluded from ``repr``; the seed is not kept at all, only the
    signing key derived from it inside ``signer`` (whose ``repr`` shows the
    public key only).
    """

    path: Path
    jwt: str = field(repr=False)
    signer: Signer
    expires: int | None = None

    @property
    def public_key(self) -> str:
        """The user public key ``U...``: the JWT's ``sub`` and the envelope signing key."""
        return self.signer.public_key


def read_credentials(path: str | os.PathLike[str]) -> Credentials:
    """Read and check a NATS credentials file; raise :class:`ConfigError` naming only the path.

    Checks that the JWT is a user JWT whose ``sub`` is the seed's public key
    (so that a JWT from one agent and a seed from another fail here rather than
    as a signature that no worker accepts), and that it has not expired.
    """
    creds_path = Path(path)
    try:
        text = creds_path.read_text(encoding="utf-8")
        mode = creds_path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read credentials {creds_path}: {reason}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("credentials %s are accessible to other users (mode %o)", creds_path, mode)
    blocks = _blocks(text)
    token = blocks.get("NATS USER JWT")
    seed = blocks.get("USER NKEY SEED")
    if token is None or seed is None:
        raise ConfigError(f"{creds_path} is not a NATS credentials file (JWT and seed blocks)")
    try:
        signer = Signer.from_seed(seed)
    except ConfigError as exc:  # from_seed never echoes the seed; add where it is
        raise ConfigError(f"{creds_path}: {exc}") from exc
    claims = _jwt_claims(token, creds_path)
    if claims.get("sub") != signer.public_key:
        raise ConfigError(f"{creds_path}: the user JWT does not belong to the seed beside it")
    nats_claims = claims.get("nats")
    if not isinstance(nats_claims, dict) or nats_claims.get("type") != "user":
        raise ConfigError(f"{creds_path}: not a NATS user JWT")
    expires = claims.get("exp")
    if expires is not None:
        if not isinstance(expires, int) or isinstance(expires, bool):
            raise ConfigError(f"{creds_path}: the JWT's exp is not a Unix time")
        if expires <= time.time():
            raise ConfigError(f"{creds_path}: the credentials expired at Unix time {expires}")
    return Credentials(creds_path, token, signer, expires)


def _blocks(text: str) -> dict[str, str]:
    """``{block name: first non-empty line inside it}`` for the two blocks of a creds file."""
    blocks: dict[str, str] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        marker = _BLOCK_RE.fullmatch(line)
        if marker:
            kind, name = marker.groups()
            current = name if kind == "BEGIN" else None
            continue
        if current is not None and line and current not in blocks:
            blocks[current] = line
    return blocks


def _jwt_claims(token: str, path: Path) -> dict[str, Any]:
    """The claims of a JWT, unverified: the server verifies it, this only cross-checks."""
    if not _JWT_RE.fullmatch(token):
        raise ConfigError(f"{path}: the user JWT is malformed")
    body = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{path}: the user JWT is malformed") from exc
    if not isinstance(claims, dict):
        raise ConfigError(f"{path}: the user JWT is malformed")
    return claims


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything an agent needs to connect, sign, seal and verify, from ``agent.json``.

    ``encryption_secret_key`` is excluded from ``repr``. ``creds_path`` is the
    credentials file beside ``agent.json`` (or the one given explicitly).
    """

    address: AgentAddress
    nats_url: str
    public_key: str
    clearance: Level
    capabilities: tuple[str, ...]
    subscriptions: tuple[str, ...]
    encryption_public_key: str
    encryption_secret_key: str = field(repr=False)
    inbox_prefix: str
    inbox_stream: str
    inbox_consumer: str
    router_public_key: str
    creds_path: Path
    expires: int | None = None

    @property
    def tier(self) -> str:
        return self.address.tier

    @property
    def id(self) -> str:
        return self.address.id

    @property
    def outbox(self) -> str:
        """The only subject this agent may publish messages on."""
        return self.address.outbox

    @property
    def inbox(self) -> str:
        """Live deliveries to this agent (also kept in :attr:`inbox_stream`)."""
        return self.address.inbox

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | None = None,
        *,
        creds_path: str | os.PathLike[str] | None = None,
    ) -> AgentConfig:
        """Load ``agent.json`` from a directory or a file path, default ``$SYMBIONT_AGENT_DIR``.

        The credentials are ``agent.creds`` beside ``agent.json`` unless
        ``creds_path`` names another file.
        """
        if source is None:
            env_dir = os.environ.get(ENV_AGENT_DIR)
            if not env_dir:
                raise ConfigError(f"no agent directory given and {ENV_AGENT_DIR} is not set")
            source = env_dir
        path = Path(source)
        json_path = path / CONFIG_FILE if path.is_dir() else path
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {json_path}: {exc.strerror}") from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{json_path} is not valid JSON") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{json_path} must hold a JSON object")
        creds = Path(creds_path) if creds_path is not None else json_path.parent / CREDS_FILE
        try:
            return cls.from_dict(data, creds_path=creds)
        except ConfigError as exc:
            raise ConfigError(f"{json_path}: {exc}") from exc

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, creds_path: str | os.PathLike[str]
    ) -> AgentConfig:
        """Validate an ``agent.json`` object; raise :class:`ConfigError` naming the bad field."""
        fields = _Fields(data)
        tier, agent_id = fields.text("tier"), fields.text("id")
        try:
            address = AgentAddress.parse(fields.text("address"))
        except EnvelopeError as exc:
            raise ConfigError(f"address: {exc}") from exc
        if (address.tier, address.id) != (tier, agent_id):
            raise ConfigError(f"address {address} does not match tier {tier!r} and id {agent_id!r}")
        for name, expected in (("outbox", address.outbox), ("inbox", address.inbox)):
            if fields.text(name) != expected:
                raise ConfigError(f"{name} must be {expected!r}")
        nats_url = fields.text("nats_url")
        if not all(u.strip().startswith(_URL_SCHEMES) for u in nats_url.split(",")):
            raise ConfigError(
                f"nats_url must be a nats:// (or tls://, ws://) URL, got {nats_url!r}"
            )
        clearance = fields.text("clearance")
        if clearance not in LEVELS:
            raise ConfigError(f"clearance must be one of {', '.join(LEVELS)}")
        public_key = fields.user_key("public_key")
        router_key = fields.user_key("router_public_key")
        enc_public = fields.text("encryption_public_key")
        enc_secret = fields.text("encryption_secret_key")
        try:
            decode_key(enc_public, "encryption_public_key")
            pair = EncryptionKeyPair.from_secret(enc_secret)
        except CryptoError as exc:
            raise ConfigError(str(exc)) from exc  # messages name the field, never the key
        if pair.public_key != enc_public:
            raise ConfigError("encryption_secret_key does not match encryption_public_key")
        inbox_prefix = fields.text("inbox_prefix")
        if not _SUBJECT_PREFIX_RE.fullmatch(inbox_prefix):
            raise ConfigError(f"inbox_prefix must be a subject without wildcards: {inbox_prefix!r}")
        expires = data.get("expires")
        if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
            raise ConfigError("expires must be a Unix time (integer) or absent")
        return cls(
            address=address,
            nats_url=nats_url,
            public_key=public_key,
            clearance=clearance,
            capabilities=fields.texts("capabilities"),
            subscriptions=fields.texts("subscriptions", default=()),
            encryption_public_key=enc_public,
            encryption_secret_key=enc_secret,
            inbox_prefix=inbox_prefix,
            inbox_stream=fields.name("inbox_stream"),
            inbox_consumer=fields.name("inbox_consumer"),
            router_public_key=router_key,
            creds_path=Path(creds_path),
            expires=expires,
        )

    def credentials(self) -> Credentials:
        """Read :attr:`creds_path` and check that it is this agent's (same ``public_key``)."""
        creds = read_credentials(self.creds_path)
        if creds.public_key != self.public_key:
            raise ConfigError(
                f"{self.creds_path} holds the key of another agent than {self.address} "
                f"({creds.public_key}, expected {self.public_key})"
            )
        return creds

    def encryption_keys(self) -> EncryptionKeyPair:
        """The agent's X25519 key pair, which opens payloads sealed to it."""
        return EncryptionKeyPair.from_secret(self.encryption_secret_key)


class _Fields:
    """Typed access to a JSON object's fields, each error naming the field (never a value
    that might be secret)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def text(self, name: str) -> str:
        value = self._data.get(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} is missing or not a non-empty string")
        return value

    def texts(self, name: str, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = self._data.get(name)
        if value is None and default is not None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings")
        return tuple(value)

    def user_key(self, name: str) -> str:
        value = self.text(name)
        try:
            decode_user_public_key(value)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
        return value

    def name(self, name: str) -> str:
        value = self.text(name)
        if not _NAME_RE.fullmatch(value):
            raise ConfigError(f"{name} must be 1 to 255 of [A-Za-z0-9_-], got {value!r}")
        return value
