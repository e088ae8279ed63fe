"""The message envelope of the wire contract ``symbi/1``: headers, signing input, signature.

An envelope travels as NATS headers beside an opaque payload. :func:`parse`
checks every header (rules in :mod:`agent_sdk.headers`) before anything else
looks at a message, so later stages (policy, audit, delivery) only see
well-formed values, and it accepts one spelling per value, so the signing input
rebuilt from the parsed values is exactly what the sender signed. Verification
is a separate step (:func:`verify`) because the sender's key comes from the
registry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from agent_sdk.b64 import b64url_decode, b64url_encode
from agent_sdk.errors import EnvelopeError, SignatureError
from agent_sdk.headers import (
    H_ENC,
    H_FROM,
    H_ID,
    H_LEVEL,
    H_MSG_ID,
    H_NONCE,
    H_REPLY_TO,
    H_SIG,
    H_TIME,
    H_TO,
    H_TYPE,
    H_VERSION,
    VERSION,
    Enc,
    check_limits,
    check_values,
    required,
)
from agent_sdk.names import CONTRACT, Level, MessageType
from agent_sdk.nonces import NonceSource
from agent_sdk.signing import SIGNATURE_BYTES, Signer, Verifier

_DEFAULT_NONCES: Final = NonceSource()
_DEFAULT_VERIFIER: Final = Verifier()


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message: the contract's header fields and the payload (sealed if ``enc`` says so).

    ``sender`` is ``Symbi-From``. ``payload`` is left out of ``repr`` so that an
    envelope in a log line or traceback does not leak its content.
    """

    id: str
    sender: str
    to: str
    type: MessageType
    time_ms: int
    nonce: int
    level: Level
    payload: bytes = dataclasses.field(repr=False)
    enc: Enc = "none"
    reply_to: str | None = None
    sig: str | None = None


def signing_input(env: Envelope) -> bytes:
    """The exact bytes that ``Symbi-Sig`` signs (contract section "Signature")."""
    return "\n".join(
        (
            CONTRACT,
            env.id,
            env.sender,
            env.to,
            env.type,
            str(env.time_ms),
            str(env.nonce),
            env.level,
            env.enc,
            env.reply_to or "",
            hashlib.sha256(env.payload).hexdigest(),
        )
    ).encode("utf-8")


def build(
    *,
    sender: str,
    to: str,
    type: MessageType,
    level: Level,
    payload: bytes = b"",
    enc: Enc = "none",
    reply_to: str | None = None,
    id: str | None = None,
    time_ms: int | None = None,
    nonce: int | None = None,
) -> Envelope:
    """A new, unsigned, validated envelope; pass it to :func:`sign` before publishing.

    ``id`` defaults to a random UUID (it is the ingress stream's shared
    deduplication key, so it must be unpredictable), ``time_ms`` to now and
    ``nonce`` to the next value of a process-wide :class:`NonceSource`, which is
    unique for every sender in the process. ``level`` has no default on
    purpose: under-labelling a secret must be a visible choice.
    """
    if nonce is None:
        nonce = _DEFAULT_NONCES.next()
    if time_ms is None:
        time_ms = time.time_ns() // 1_000_000
    return _validated(
        id if id is not None else str(uuid.uuid4()),
        sender,
        to,
        type,
        str(time_ms),
        str(nonce),
        level,
        enc,
        reply_to,
        None,
        payload,
    )


def sign(env: Envelope, signer: Signer) -> Envelope:
    """A copy of ``env`` carrying ``signer``'s signature (replacing any earlier one)."""
    signature = signer.sign(signing_input(env))
    return dataclasses.replace(env, sig=b64url_encode(signature))


def verify(env: Envelope, public_key: str, *, verifier: Verifier | None = None) -> None:
    """Raise :class:`SignatureError` unless ``env`` is signed by ``public_key`` (``U...``).

    Decoded keys are cached in ``verifier`` (default: one shared by the process).
    """
    if env.sig is None:
        raise SignatureError(f"{H_SIG} is missing", reason="unsigned")
    try:
        signature = b64url_decode(env.sig, length=SIGNATURE_BYTES)
    except ValueError as exc:
        raise SignatureError(f"{H_SIG} is not a signature: {exc}", reason="bad_signature") from exc
    (verifier or _DEFAULT_VERIFIER).verify(public_key, signing_input(env), signature)


def to_headers(env: Envelope) -> dict[str, str]:
    """The NATS headers that carry ``env``, with ``Nats-Msg-Id`` set for deduplication.

    Optional headers are written only when they differ from their absent value.
    ``Symbi-Sig`` is omitted for an unsigned envelope, which receivers deny.
    """
    headers = {
        H_VERSION: VERSION,
        H_ID: env.id,
        H_FROM: env.sender,
        H_TO: env.to,
        H_TYPE: env.type,
        H_TIME: str(env.time_ms),
        H_NONCE: str(env.nonce),
        H_LEVEL: env.level,
        H_MSG_ID: env.id,
    }
    if env.enc != "none":
        headers[H_ENC] = env.enc
    if env.reply_to is not None:
        headers[H_REPLY_TO] = env.reply_to
    if env.sig is not None:
        headers[H_SIG] = env.sig
    return headers


def parse(headers: Mapping[str, str] | None, payload: bytes) -> Envelope:
    """The envelope carried by ``headers`` and ``payload``, checked strictly (not verified).

    Raises :class:`EnvelopeError` (``malformed``) naming the first bad header,
    then :class:`SignatureError` (``unsigned``) if everything else is well
    formed but ``Symbi-Sig`` is absent. Headers other than the contract's are
    allowed (workers add their own) but count towards the size limits.
    """
    if not headers:
        raise EnvelopeError("no headers: not a symbi/1 envelope")
    check_limits(headers)
    version = required(headers, H_VERSION)
    if version != VERSION:
        raise EnvelopeError(f"{H_VERSION} must be {VERSION!r}, got {version!r}")
    env = _validated(
        required(headers, H_ID),
        required(headers, H_FROM),
        required(headers, H_TO),
        required(headers, H_TYPE),
        required(headers, H_TIME),
        required(headers, H_NONCE),
        required(headers, H_LEVEL),
        headers.get(H_ENC, "none"),
        headers.get(H_REPLY_TO),
        headers.get(H_SIG),
        payload,
    )
    if env.sig is None:
        raise SignatureError(f"{H_SIG} is missing", reason="unsigned")
    return env


def _validated(
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
    payload: bytes,
) -> Envelope:
    """An envelope from header strings, each checked against the contract."""
    check_values(msg_id, sender, to, msg_type, time_ms, nonce, level, enc, reply_to, sig)
    return Envelope(
        id=msg_id,
        sender=sender,
        to=to,
        type=msg_type,  # type: ignore[arg-type]  # checked by check_values
        time_ms=int(time_ms),
        nonce=int(nonce),
        level=level,  # type: ignore[arg-type]  # checked by check_values
        payload=payload,
        enc=enc,  # type: ignore[arg-type]  # checked by check_values
        reply_to=reply_to,
        sig=sig,
    )
