"""Encode, sign and decode NATS JWTs (v2) with nkeys.

NATS JWTs are ordinary JWS compact tokens with ``alg: ed25519-nkey``: the
signature is Ed25519 over ``<header>.<claims>`` by the issuer's nkey, and the
``jti`` is the base32 SHA-512/256 of the claims. Only what the gateway needs
is here: operator, account, user and activation claims.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from agent_sdk.errors import ConfigError

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_public_key(public_key: str) -> bytes:
    """The 32 raw Ed25519 bytes of an nkey public key (``U…``, ``A…``, ``O…``)."""
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    if len(raw) != 35 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise ValueError("invalid nkey public key")
    return raw[1:33]


def encode(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    """Sign ``claims`` with ``issuer``; fills ``iss``, ``iat`` and ``jti``."""
    body = dict(claims)
    body["iss"] = issuer.public_key.decode()
    body.setdefault("iat", int(time.time()))
    body.pop("jti", None)
    digest = hashlib.new("sha512_256", json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64url(json.dumps(_HEADER, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(body, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{_b64url(issuer.sign(signing_input))}"


def decode(token: str, verify: bool = True) -> dict[str, Any]:
    """The claims of ``token``; with ``verify``, check the signature against ``iss``."""
    try:
        header, payload, signature = token.split(".")
        claims: dict[str, Any] = json.loads(_b64url_decode(payload))
        if verify:
            verify_key = nacl.signing.VerifyKey(raw_public_key(claims["iss"]))
            verify_key.verify(f"{header}.{payload}".encode(), _b64url_decode(signature))
    except (ValueError, KeyError, nacl.exceptions.BadSignatureError) as exc:
        raise ConfigError("invalid NATS JWT") from exc
    return claims


def creds_file(user_jwt: str, user_seed: bytes) -> str:
    """The standard NATS credentials file text, as ``nsc`` writes it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def parse_creds(text: str) -> tuple[str, bytes]:
    """``(jwt, seed)`` from a credentials file."""
    lines = [line.strip() for line in text.splitlines()]
    try:
        token = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
        seed = lines[lines.index("-----BEGIN USER NKEY SEED-----") + 1]
    except (ValueError, IndexError) as exc:
        raise ConfigError("not a NATS credentials file") from exc
    return token, seed.encode()
