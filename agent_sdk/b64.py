"""Base64url without padding, the contract's encoding for signatures and X25519 keys.

The standard library's ``urlsafe_b64decode`` silently drops characters outside
the alphabet and accepts any trailing bits, so one byte string would have many
accepted spellings. Signatures and keys are compared and cached as strings, so
:func:`b64url_decode` accepts exactly one spelling per value: the one that
:func:`b64url_encode` produces.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

_ALPHABET_RE: Final = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """Encode ``data`` as base64url with the ``=`` padding removed."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, length: int | None = None) -> bytes:
    """Decode canonical unpadded base64url, optionally requiring ``length`` bytes.

    Raises :class:`ValueError` on padding, characters outside the alphabet,
    non-zero trailing bits or a wrong length; callers map it to their own error.
    """
    if len(text) % 4 == 1 or not _ALPHABET_RE.fullmatch(text):
        raise ValueError("not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:  # unreachable after the checks above; kept as a guard
        raise ValueError("not unpadded base64url") from exc
    if length is not None and len(data) != length:
        raise ValueError(f"expected {length} bytes, got {len(data)}")
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url (trailing bits set)")
    return data
