"""The SDK reproduces the contract's signing vectors byte for byte.

``tests/contract/vectors.json`` is a copy of the contract's own file; every
implementation of ``symbi/1`` (this SDK, the policy workers, agents in other
languages) must produce the same signing input and signature for each case.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from agent_sdk.b64 import b64url_encode
from agent_sdk.envelope import Envelope, parse, sign, signing_input, to_headers, verify
from agent_sdk.errors import SignatureError
from agent_sdk.headers import H_MSG_ID, H_SIG
from agent_sdk.signing import Signer

VECTORS_PATH = Path(__file__).parent / "contract" / "vectors.json"
SHARED_VECTORS_PATH = Path(__file__).resolve().parents[2] / "shared" / "contract" / "vectors.json"

VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = VECTORS["cases"]
CASE_IDS = [case["headers"]["Symbi-Id"] for case in CASES]


def test_vectors_are_for_this_contract() -> None:
    assert VECTORS["contract"] == "symbi/1"
    assert len(CASES) >= 2


def test_vectors_match_the_contract_copy() -> None:
    if not SHARED_VECTORS_PATH.exists():
        pytest.skip(f"the contract's own copy is not here ({SHARED_VECTORS_PATH})")
    assert VECTORS_PATH.read_bytes() == SHARED_VECTORS_PATH.read_bytes()


def _payload(case: dict[str, Any]) -> bytes:
    return base64.b64decode(case["payload_b64"], validate=True)


def _unsigned(case: dict[str, Any]) -> Envelope:
    """The case's envelope, parsed from its headers with a placeholder signature."""
    headers = {**case["headers"], "Symbi-Version": "1", H_SIG: "A" * 86}
    return dataclasses.replace(parse(headers, _payload(case)), sig=None)


def _signed(case: dict[str, Any]) -> Envelope:
    headers = {**case["headers"], "Symbi-Version": "1", H_SIG: case["signature"]}
    return parse(headers, _payload(case))


def _flip_bit(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _flip_text(text: str) -> str:
    """``text`` with one bit of its last character flipped (still a single ASCII letter/digit)."""
    last = text[-1]
    flipped = chr(ord(last) ^ 0x01)
    if not flipped.isalnum():  # keep the value well formed where possible
        flipped = chr(ord(last) ^ 0x02)
    return text[:-1] + flipped


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_signing_input_is_byte_exact(case: dict[str, Any]) -> None:
    assert signing_input(_unsigned(case)) == case["signing_input"].encode("utf-8")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_seed_gives_public_key(case: dict[str, Any]) -> None:
    assert Signer.from_seed(case["user_seed"]).public_key == case["public_key"]
    assert Signer.from_seed(case["user_seed"].encode()).public_key == case["public_key"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_signature_is_reproduced(case: dict[str, Any]) -> None:
    signed = sign(_unsigned(case), Signer.from_seed(case["user_seed"]))
    assert signed.sig == case["signature"]
    assert signed == _signed(case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vector_verifies(case: dict[str, Any]) -> None:
    verify(_signed(case), case["public_key"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_headers_round_trip(case: dict[str, Any]) -> None:
    headers = to_headers(_signed(case))
    assert headers[H_MSG_ID] == case["headers"]["Symbi-Id"]
    del headers[H_MSG_ID]
    assert headers == {**case["headers"], "Symbi-Version": "1", H_SIG: case["signature"]}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_payload_bit_flip_fails(case: dict[str, Any]) -> None:
    env = _signed(case)
    tampered = _flip_bit(env.payload) if env.payload else b"\x01"
    with pytest.raises(SignatureError) as info:
        verify(dataclasses.replace(env, payload=tampered), case["public_key"])
    assert info.value.reason == "bad_signature"


def _header_tampers(case: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """One variant per signed header, each still well formed but differing in one bit."""
    base = case["headers"]
    variants: list[tuple[str, dict[str, str]]] = []
    for name, value in base.items():
        if name == "Symbi-Type":
            new = {"data": "control", "control": "data", "rpc": "rpc", "event": "event"}[value]
            if new == value:  # rpc/event are pinned by Reply-To/To; change them with those
                continue
        elif name == "Symbi-Level":
            new = {"public": "restricted", "restricted": "public"}.get(value, "public")
        elif name == "Symbi-Enc":
            new = "none"
        elif name in ("Symbi-Time", "Symbi-Nonce"):
            new = str(int(value) ^ 1)
        else:
            new = _flip_text(value)
        variants.append((name, {**base, name: new}))
    if "Symbi-Enc" not in base:
        variants.append(("Symbi-Enc", {**base, "Symbi-Enc": "x25519-sealed"}))
    return variants


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_header_tamper_fails(case: dict[str, Any]) -> None:
    variants = _header_tampers(case)
    assert len(variants) >= 7
    for name, headers in variants:
        headers = {**headers, "Symbi-Version": "1", H_SIG: case["signature"]}
        env = parse(headers, _payload(case))
        assert env != _signed(case), name
        with pytest.raises(SignatureError) as info:
            verify(env, case["public_key"])
        assert info.value.reason == "bad_signature", name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_signature_bit_flip_fails(case: dict[str, Any]) -> None:
    env = _signed(case)
    raw = base64.urlsafe_b64decode(case["signature"] + "==")
    for index in (0, 31, 63):
        bad = dataclasses.replace(env, sig=b64url_encode(_flip_bit(raw, index)))
        with pytest.raises(SignatureError):
            verify(bad, case["public_key"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_other_key_fails(case: dict[str, Any]) -> None:
    other_keys = {c["public_key"] for c in CASES} - {case["public_key"]}
    assert other_keys, "the vectors need at least two keys"
    for other in other_keys:
        with pytest.raises(SignatureError) as info:
            verify(_signed(case), other)
        assert info.value.reason == "bad_signature"
