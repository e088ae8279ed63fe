"""End-to-end encryption of payloads (``Symbi-Enc: x25519-sealed``).

A sealed payload is a libsodium sealed box (``crypto_box_seal``) to the
recipient's X25519 key: anyone who knows the recipient's public key can seal,
only the recipient can open, and the policy workers that route the message see
ciphertext only. The sender signs the sealed bytes, so the box needs no sender
key of its own. Keys travel as unpadded base64url, like the rest of the
contract's binary values.
"""

from __future__ import annotations

import functools
from typing import Any

import nacl.exceptions
import nacl.public

from agent_sdk.b64 import b64url_decode, b64url_encode
from agent_sdk.errors import CryptoError

KEY_BYTES = 32
SEAL_OVERHEAD = 48  # ephemeral public key (32) + authentication tag (16)


def decode_key(key_b64: str, what: str = "X25519 key") -> bytes:
    """The 32 raw bytes of an X25519 key in unpadded base64url, or :class:`CryptoError`."""
    try:
        return b64url_decode(key_b64, length=KEY_BYTES)
    except ValueError as exc:
        raise CryptoError(f"invalid {what}: {exc}") from exc


class EncryptionKeyPair:
    """An agent's X25519 key pair; ``repr`` shows the public half only."""

    __slots__ = ("_box", "_private")

    def __init__(self, private_key: Any) -> None:
        self._private = private_key
        # Building the box derives the public key (a scalar multiplication): do it once.
        self._box = nacl.public.SealedBox(private_key)

    @classmethod
    def generate(cls) -> EncryptionKeyPair:
        """A fresh random key pair."""
        return cls(nacl.public.PrivateKey.generate())

    @classmethod
    def from_secret(cls, secret_b64: str) -> EncryptionKeyPair:
        """The key pair whose secret half is ``secret_b64`` (unpadded base64url)."""
        return cls(nacl.public.PrivateKey(decode_key(secret_b64, "X25519 secret key")))

    @property
    def public_key(self) -> str:
        """The public half, unpadded base64url: what the registry publishes."""
        return b64url_encode(bytes(self._private.public_key))

    @property
    def secret_key(self) -> str:
        """The secret half, unpadded base64url: store it like a credentials file."""
        return b64url_encode(bytes(self._private))

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of a payload sealed to this key pair, or :class:`CryptoError`."""
        try:
            plaintext: bytes = self._box.decrypt(sealed)
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise CryptoError("sealed payload cannot be opened with this key") from exc
        return plaintext

    def __repr__(self) -> str:
        return f"EncryptionKeyPair(public_key={self.public_key!r})"


def seal(payload: bytes, recipient_public_b64: str) -> bytes:
    """``payload`` sealed to the recipient's X25519 public key (unpadded base64url)."""
    try:
        sealed: bytes = _sealer(recipient_public_b64).encrypt(payload)
    except nacl.exceptions.CryptoError as exc:  # e.g. a low-order (all-zero) public key
        raise CryptoError("cannot seal to this X25519 public key") from exc
    return sealed


def open_sealed(payload: bytes, secret_b64: str) -> bytes:
    """Open a sealed ``payload`` with an X25519 secret key; raise :class:`CryptoError`.

    To open many payloads, keep an :class:`EncryptionKeyPair` and call its
    ``open``, which derives the public key once instead of every time.
    """
    return EncryptionKeyPair.from_secret(secret_b64).open(payload)


@functools.lru_cache(maxsize=1024)
def _sealer(recipient_public_b64: str) -> Any:
    """A sealed box for one recipient, cached: an agent writes to the same peers."""
    key = decode_key(recipient_public_b64, "X25519 public key")
    return nacl.public.SealedBox(nacl.public.PublicKey(key))
