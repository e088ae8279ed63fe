"""The envelope's NATS headers and the rules that every value must follow.

The checks take the header strings exactly as they travel, because those
strings are what the signature covers. Each value is accepted in exactly one
spelling (``7``, never ``07`` or ``+7``): otherwise two different header sets
would carry one envelope, and the signing input rebuilt from the parsed values
would differ from what the sender signed. Every check also rules out control
characters, which could forge extra lines in the signing input.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Final, Literal, get_args

from agent_sdk.errors import EnvelopeError
from agent_sdk.names import LEVELS, MESSAGE_TYPES, AgentAddress, Destination
from agent_sdk.nonces import MAX_NONCE

Enc = Literal["none", "x25519-sealed"]
ENCODINGS: Final[tuple[Enc, ...]] = get_args(Enc)

VERSION: Final = "1"
MAX_HEADERS: Final = 64
MAX_HEADER_BYTES: Final = 256  # for each header name and each value, UTF-8

H_VERSION: Final = "Symbi-Version"
H_ID: Final = "Symbi-Id"
H_FROM: Final = "Symbi-From"
H_TO: Final = "Symbi-To"
H_TYPE: Final = "Symbi-Type"
H_TIME: Final = "Symbi-Time"
H_NONCE: Final = "Symbi-Nonce"
H_LEVEL: Final = "Symbi-Level"
H_ENC: Final = "Symbi-Enc"
H_REPLY_TO: Final = "Symbi-Reply-To"
H_SIG: Final = "Symbi-Sig"
H_MSG_ID: Final = "Nats-Msg-Id"

ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Canonical decimals: no sign, spaces, leading zeros, "_" or non-ASCII digits (all of
# which int() would accept).
_TIME_RE: Final = re.compile(r"0|[1-9][0-9]{0,14}")
_NONCE_RE: Final = re.compile(r"0|[1-9][0-9]{0,19}")
# 64 bytes as canonical unpadded base64url: the 86th character holds 2 bits + 4 zero bits.
_SIG_RE: Final = re.compile(r"[A-Za-z0-9_-]{85}[AQgw]")


def check_limits(headers: Mapping[str, str]) -> None:
    """Raise unless there are at most :data:`MAX_HEADERS` headers, none too long."""
    if len(headers) > MAX_HEADERS:
        raise EnvelopeError(f"{len(headers)} headers: at most {MAX_HEADERS} are allowed")
    for name, value in headers.items():
        if _too_long(name) or _too_long(value):
            raise EnvelopeError(f"header {name[:64]!r} exceeds {MAX_HEADER_BYTES} bytes")


def required(headers: Mapping[str, str], name: str) -> str:
    """The value of header ``name``, or raise naming it."""
    value = headers.get(name)
    if value is None:
        raise EnvelopeError(f"{name} is missing")
    return value


def check_values(
    msg_id: str,
    sender: str,
    to: str,
    msg_type: str,
    time_ms: str,
    nonce: str,
    level: str,
    enc: str,
    reply_to: str | None,
    sig: str | None,
) -> None:
    """Raise :class:`EnvelopeError` naming the first header value that breaks the contract."""
    if not ID_RE.fullmatch(msg_id):
        raise EnvelopeError(f"{H_ID} must be 1 to 64 of [A-Za-z0-9_-], got {msg_id!r}")
    _check_sender(sender)
    kind = _destination_kind(to)
    if msg_type not in MESSAGE_TYPES:
        raise EnvelopeError(f"{H_TYPE} must be one of {', '.join(MESSAGE_TYPES)}")
    if (msg_type == "event") != (kind == "event"):
        raise EnvelopeError(f"{H_TYPE} 'event' goes with {H_TO} 'event.<topic>', and only with it")
    if not _TIME_RE.fullmatch(time_ms):
        raise EnvelopeError(f"{H_TIME} must be a decimal of at most 15 digits, got {time_ms!r}")
    if not _NONCE_RE.fullmatch(nonce) or int(nonce) > MAX_NONCE:
        raise EnvelopeError(f"{H_NONCE} must be a decimal unsigned 64-bit integer, got {nonce!r}")
    if level not in LEVELS:
        raise EnvelopeError(f"{H_LEVEL} must be one of {', '.join(LEVELS)}")
    if enc not in ENCODINGS:
        raise EnvelopeError(f"{H_ENC} must be one of {', '.join(ENCODINGS)}")
    if reply_to is not None:
        if msg_type != "rpc":
            raise EnvelopeError(f"{H_REPLY_TO} is only allowed on rpc messages")
        if not ID_RE.fullmatch(reply_to):
            raise EnvelopeError(f"{H_REPLY_TO} must be a {H_ID}, got {reply_to!r}")
    if sig is not None and not _SIG_RE.fullmatch(sig):
        raise EnvelopeError(f"{H_SIG} must be 64 bytes as unpadded base64url (86 characters)")


def _too_long(text: str) -> bool:
    # A character is at most 4 UTF-8 bytes, so short strings skip the encoding.
    if len(text) <= MAX_HEADER_BYTES // 4:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > MAX_HEADER_BYTES


@functools.lru_cache(maxsize=4096)
def _check_sender(sender: str) -> None:
    """Raise unless ``sender`` is an agent address (cached: the same senders recur)."""
    try:
        AgentAddress.parse(sender)
    except EnvelopeError as exc:
        raise EnvelopeError(f"{H_FROM}: {exc}") from exc


@functools.lru_cache(maxsize=4096)
def _destination_kind(to: str) -> str:
    """The kind of a ``Symbi-To`` value, or raise (cached: the same destinations recur)."""
    try:
        return Destination.parse(to).kind
    except EnvelopeError as exc:
        raise EnvelopeError(f"{H_TO}: {exc}") from exc
