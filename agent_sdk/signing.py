"""Ed25519 keys of the wire contract: the agent's NATS user nkey signs its envelopes.

An agent already holds an nkey seed (``SU...``) in its credentials file, and the
registry already knows its public half (``U...``, the ``sub`` of its user JWT),
so envelopes are signed with that key rather than a second one. Keys are
decoded here with their CRC checked (``nkeys`` 0.2 skips that check for seeds),
and verification goes straight to libsodium through a cache of decoded keys,
because a policy worker verifies thousands of messages a second from a few
hundred senders.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Any, Final

import nacl.exceptions
import nacl.signing
import nkeys

from agent_sdk.errors import ConfigError, SignatureError

SIGNATURE_BYTES: Final = 64

_SEED_CHARS: Final = 58  # 2 prefix bytes + 32 key bytes + 2 CRC bytes, base32 unpadded
_PUBLIC_KEY_CHARS: Final = 56  # 1 prefix byte + 32 key bytes + 2 CRC bytes


def _b32_decode_checked(text: str, chars: int, what: str) -> bytes:
    """Decode an nkey's base32, check its CRC-16 and return the bytes before the CRC."""
    if len(text) != chars:
        raise ConfigError(f"not a NATS {what}: expected {chars} characters")
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except binascii.Error as exc:
        raise ConfigError(f"not a NATS {what}: invalid base32") from exc
    if base64.b32encode(raw).decode("ascii").rstrip("=") != text:
        raise ConfigError(f"not a NATS {what}: non-canonical encoding")
    body, crc = raw[:-2], raw[-2:]
    if nkeys.crc16(body) != int.from_bytes(crc, "little"):
        raise ConfigError(f"not a NATS {what}: checksum mismatch")
    return bytes(body)


def decode_user_public_key(public_key: str) -> bytes:
    """The raw 32-byte Ed25519 key inside a NATS user public key ``U...``.

    Raises :class:`ConfigError`: a bad key comes from configuration or the
    registry, never from a message.
    """
    body = _b32_decode_checked(public_key, _PUBLIC_KEY_CHARS, "user public key")
    if body[0] != nkeys.PREFIX_BYTE_USER:
        raise ConfigError("not a NATS user public key: wrong prefix (expected 'U')")
    return body[1:]


def _encode_user_public_key(raw: bytes) -> str:
    body = bytes([nkeys.PREFIX_BYTE_USER]) + raw
    return base64.b32encode(body + nkeys.crc16_checksum(body)).decode("ascii").rstrip("=")


class Signer:
    """Signs with the Ed25519 key of a NATS user seed; never shows the seed.

    ``repr`` and ``str`` name only the public key, so that a signer that ends up
    in a log line or a traceback does not leak the agent's credentials.
    """

    __slots__ = ("_key", "_public_key")

    def __init__(self, signing_key: Any, public_key: str) -> None:
        self._key = signing_key
        self._public_key = public_key

    @classmethod
    def from_seed(cls, seed: str | bytes) -> Signer:
        """Build a signer from a user seed ``SU...`` (surrounding whitespace ignored)."""
        text = seed.decode("ascii", "replace") if isinstance(seed, bytes) else seed
        text = text.strip()
        # Do not echo the seed in any message: it is a secret even when malformed.
        body = _b32_decode_checked(text, _SEED_CHARS, "user seed")
        prefix = body[0] & 0xF8
        role = (body[0] & 0x07) << 5 | (body[1] & 0xF8) >> 3
        if prefix != nkeys.PREFIX_BYTE_SEED or role != nkeys.PREFIX_BYTE_USER:
            raise ConfigError("not a NATS user seed: expected 'SU...'")
        key = nacl.signing.SigningKey(body[2:])
        return cls(key, _encode_user_public_key(bytes(key.verify_key)))

    @property
    def public_key(self) -> str:
        """The NATS user public key ``U...`` that verifies this signer's signatures."""
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` (deterministic)."""
        signature: bytes = self._key.sign(data).signature
        return signature

    def __repr__(self) -> str:
        return f"Signer(public_key={self._public_key!r})"


class Verifier:
    """Verifies Ed25519 signatures, keeping decoded keys for the last ``maxsize`` senders."""

    __slots__ = ("_keys",)

    def __init__(self, maxsize: int = 4096) -> None:
        self._keys = functools.lru_cache(maxsize=maxsize)(_verify_key)

    def verify(self, public_key: str, data: bytes, signature: bytes) -> None:
        """Raise :class:`SignatureError` unless ``signature`` signs ``data`` for ``public_key``.

        An unusable key also fails as ``bad_signature``: the message cannot be
        proved to come from the sender, and a policy worker must deny it rather
        than crash.
        """
        try:
            key = self._keys(public_key)
        except ConfigError as exc:
            raise SignatureError(f"cannot verify: {exc}", reason="bad_signature") from exc
        try:
            key.verify(data, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
            raise SignatureError("signature does not verify", reason="bad_signature") from exc


def _verify_key(public_key: str) -> Any:
    return nacl.signing.VerifyKey(decode_user_public_key(public_key))
