"""Envelope building, strict parsing, signing and sealing, without a NATS server."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid

import nkeys
import pytest

from agent_sdk.b64 import b64url_decode, b64url_encode
from agent_sdk.envelope import Envelope, build, parse, sign, signing_input, to_headers, verify
from agent_sdk.errors import ConfigError, CryptoError, EnvelopeError, SignatureError
from agent_sdk.headers import MAX_HEADER_BYTES, MAX_HEADERS
from agent_sdk.nonces import NonceSource
from agent_sdk.sealing import EncryptionKeyPair, open_sealed, seal
from agent_sdk.signing import Signer, Verifier

REQUIRED = (
    "Symbi-Version",
    "Symbi-Id",
    "Symbi-From",
    "Symbi-To",
    "Symbi-Type",
    "Symbi-Time",
    "Symbi-Nonce",
    "Symbi-Level",
)


def _new_seed(prefix: int = nkeys.PREFIX_BYTE_USER) -> str:
    seed: bytes = nkeys.encode_seed(os.urandom(32), prefix)
    return seed.decode()


def _flip_char(text: str, index: int) -> str:
    """``text`` with the base32 character at ``index`` changed to its neighbour."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    index %= len(text)
    new = alphabet[alphabet.index(text[index]) ^ 1]
    return text[:index] + new + text[index + 1 :]


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.from_seed(_new_seed())


@pytest.fixture(scope="module")
def other_signer() -> Signer:
    return Signer.from_seed(_new_seed())


@pytest.fixture
def env(signer: Signer) -> Envelope:
    unsigned = build(
        sender="docker.a1", to="gvisor.b2", type="data", level="restricted", payload=b'{"x": 1}'
    )
    return sign(unsigned, signer)


@pytest.fixture
def headers(env: Envelope) -> dict[str, str]:
    return to_headers(env)


def _malformed(headers: dict[str, str], payload: bytes = b"") -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        parse(headers, payload)
    assert info.value.reason == "malformed"
    assert not isinstance(info.value, SignatureError)
    return info.value


# --- round trip -----------------------------------------------------------------


def test_round_trip(env: Envelope, headers: dict[str, str], signer: Signer) -> None:
    parsed = parse(headers, env.payload)
    assert parsed == env
    verify(parsed, signer.public_key)
    verify(parsed, signer.public_key, verifier=Verifier(maxsize=1))


def test_build_defaults(signer: Signer) -> None:
    before = time.time_ns() // 1_000_000
    first = build(sender="docker.a1", to="host.launcher", type="control", level="public")
    second = build(sender="docker.a1", to="host.launcher", type="control", level="public")
    assert uuid.UUID(first.id).version == 4
    assert first.id != second.id
    assert second.nonce > first.nonce
    assert before <= first.time_ms <= time.time_ns() // 1_000_000
    assert first.payload == b""
    assert first.enc == "none"
    assert first.reply_to is None
    assert first.sig is None


def test_headers_carry_the_envelope(env: Envelope, headers: dict[str, str]) -> None:
    assert headers["Symbi-Version"] == "1"
    assert headers["Nats-Msg-Id"] == headers["Symbi-Id"] == env.id
    assert headers["Symbi-From"] == "docker.a1"
    assert headers["Symbi-Time"] == str(env.time_ms)
    assert headers["Symbi-Nonce"] == str(env.nonce)
    assert "Symbi-Enc" not in headers
    assert "Symbi-Reply-To" not in headers
    assert len(headers["Symbi-Sig"]) == 86


def test_unsigned_headers_have_no_sig() -> None:
    unsigned = build(sender="docker.a1", to="docker.b1", type="data", level="public")
    assert "Symbi-Sig" not in to_headers(unsigned)


def test_rpc_answer_round_trip(signer: Signer) -> None:
    request = build(sender="docker.a1", to="host.launcher", type="rpc", level="secret")
    answer = sign(
        build(sender="docker.b1", to="docker.a1", type="rpc", level="secret", reply_to=request.id),
        signer,
    )
    headers = to_headers(answer)
    assert headers["Symbi-Reply-To"] == request.id
    parsed = parse(headers, b"")
    assert parsed.reply_to == request.id
    verify(parsed, signer.public_key)


def test_event_round_trip(signer: Signer) -> None:
    event = sign(
        build(sender="docker.a1", to="event.alerts.cpu", type="event", level="public"), signer
    )
    verify(parse(to_headers(event), event.payload), signer.public_key)


def test_explicit_enc_none_is_the_default(env: Envelope, headers: dict[str, str]) -> None:
    parsed = parse({**headers, "Symbi-Enc": "none"}, env.payload)
    assert parsed == env
    assert signing_input(parsed) == signing_input(env)


def test_extra_headers_are_allowed_and_unsigned(
    env: Envelope, headers: dict[str, str], signer: Signer
) -> None:
    extra = {**headers, "Symbi-Worker": "pw-1", "Nats-Expected-Stream": "x"}
    parsed = parse(extra, env.payload)
    assert parsed == env
    verify(parsed, signer.public_key)


def test_header_order_does_not_matter(env: Envelope, headers: dict[str, str]) -> None:
    assert parse(dict(reversed(list(headers.items()))), env.payload) == env


def test_largest_values_parse(signer: Signer) -> None:
    env = sign(
        build(
            sender="docker.a1",
            to="docker.b1",
            type="data",
            level="public",
            id="x" * 64,
            time_ms=10**15 - 1,
            nonce=2**64 - 1,
        ),
        signer,
    )
    parsed = parse(to_headers(env), b"")
    assert (parsed.time_ms, parsed.nonce) == (10**15 - 1, 2**64 - 1)
    verify(parsed, signer.public_key)


def test_zero_values_parse(signer: Signer) -> None:
    env = sign(
        build(sender="docker.a1", to="docker.b1", type="data", level="public", time_ms=0, nonce=0),
        signer,
    )
    assert parse(to_headers(env), b"") == env


def test_repr_hides_payload_and_seed(env: Envelope, signer: Signer) -> None:
    assert "payload" not in repr(env)
    assert '"x"' not in repr(env)
    assert repr(signer) == f"Signer(public_key={signer.public_key!r})"


# --- malformed ------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED)
def test_missing_header(headers: dict[str, str], name: str) -> None:
    del headers[name]
    assert name in str(_malformed(headers))


@pytest.mark.parametrize("empty", [None, {}])
def test_no_headers(empty: dict[str, str] | None) -> None:
    with pytest.raises(EnvelopeError):
        parse(empty, b"")


BAD_VALUES: list[tuple[str, str]] = [
    ("Symbi-Version", "2"),
    ("Symbi-Version", "1.0"),
    ("Symbi-Version", " 1"),
    ("Symbi-Version", ""),
    ("Symbi-Id", ""),
    ("Symbi-Id", "x" * 65),
    ("Symbi-Id", "a b"),
    ("Symbi-Id", "a.b"),
    ("Symbi-Id", "a/b"),
    ("Symbi-Id", "é"),
    ("Symbi-From", "docker"),
    ("Symbi-From", "kvm.a1"),
    ("Symbi-From", "docker.A1"),
    ("Symbi-From", "docker.-a"),
    ("Symbi-From", "docker.a1.x"),
    ("Symbi-From", "event.alerts"),
    ("Symbi-From", "host.launcher"),
    ("Symbi-From", "docker." + "a" * 64),
    ("Symbi-To", "docker"),
    ("Symbi-To", "docker.*"),
    ("Symbi-To", "docker.>"),
    ("Symbi-To", "event."),
    ("Symbi-To", "event.Alerts"),
    ("Symbi-To", "event.a..b"),
    ("Symbi-To", "event." + ".".join("abcdefghi")),
    ("Symbi-To", "host."),
    ("Symbi-To", "host.a.b"),
    ("Symbi-Type", "Data"),
    ("Symbi-Type", "request"),
    ("Symbi-Type", ""),
    ("Symbi-Time", ""),
    ("Symbi-Time", "abc"),
    ("Symbi-Time", "-1"),
    ("Symbi-Time", "+1"),
    ("Symbi-Time", " 1"),
    ("Symbi-Time", "1 "),
    ("Symbi-Time", "01"),
    ("Symbi-Time", "1.5"),
    ("Symbi-Time", "1_000"),
    ("Symbi-Time", "1e3"),
    ("Symbi-Time", "\u0661\u0662"),  # Arabic-Indic digits, which int() accepts
    ("Symbi-Time", "1" * 16),
    ("Symbi-Nonce", ""),
    ("Symbi-Nonce", "-1"),
    ("Symbi-Nonce", "+1"),
    ("Symbi-Nonce", "00"),
    ("Symbi-Nonce", "007"),
    ("Symbi-Nonce", "1.0"),
    ("Symbi-Nonce", "0x10"),
    ("Symbi-Nonce", str(2**64)),
    ("Symbi-Nonce", "9" * 20),
    ("Symbi-Nonce", "1" * 21),
    ("Symbi-Level", "top-secret"),
    ("Symbi-Level", "Public"),
    ("Symbi-Level", ""),
    ("Symbi-Enc", "aes"),
    ("Symbi-Enc", "None"),
    ("Symbi-Enc", ""),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value(headers: dict[str, str], name: str, value: str) -> None:
    headers[name] = value
    assert name in str(_malformed(headers))


@pytest.mark.parametrize("name", [*REQUIRED, "Symbi-Enc", "Symbi-Reply-To", "Symbi-Sig"])
@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\t", " "])
def test_control_characters_are_malformed(signer: Signer, name: str, bad: str) -> None:
    """A newline in a value could forge extra lines of the signing input."""
    rpc = sign(
        build(sender="docker.a1", to="docker.b1", type="rpc", level="public", reply_to="m-1"),
        signer,
    )
    headers = {**to_headers(rpc), "Symbi-Enc": "none"}
    for value in (headers[name] + bad, bad + headers[name], headers[name][:1] + bad):
        _malformed({**headers, name: value})


def test_event_type_to_an_agent(headers: dict[str, str]) -> None:
    headers["Symbi-Type"] = "event"
    assert "Symbi-Type" in str(_malformed(headers))


@pytest.mark.parametrize("msg_type", ["control", "data", "rpc"])
def test_agent_type_to_an_event_topic(headers: dict[str, str], msg_type: str) -> None:
    headers["Symbi-To"] = "event.alerts"
    headers["Symbi-Type"] = msg_type
    _malformed(headers)


@pytest.mark.parametrize("msg_type", ["control", "data", "event"])
def test_reply_to_only_on_rpc(headers: dict[str, str], msg_type: str) -> None:
    headers["Symbi-Type"] = msg_type
    if msg_type == "event":
        headers["Symbi-To"] = "event.alerts"
    headers["Symbi-Reply-To"] = "m-1"
    assert "Symbi-Reply-To" in str(_malformed(headers))


@pytest.mark.parametrize("reply_to", ["", "a.b", "x" * 65])
def test_bad_reply_to(headers: dict[str, str], reply_to: str) -> None:
    headers["Symbi-Type"] = "rpc"
    headers["Symbi-Reply-To"] = reply_to
    assert "Symbi-Reply-To" in str(_malformed(headers))


def test_oversized_header_value(env: Envelope, headers: dict[str, str]) -> None:
    parse({**headers, "X-Note": "x" * MAX_HEADER_BYTES}, env.payload)
    assert "X-Note" in str(_malformed({**headers, "X-Note": "x" * (MAX_HEADER_BYTES + 1)}))
    # The limit is in UTF-8 bytes, not characters.
    _malformed({**headers, "X-Note": "é" * (MAX_HEADER_BYTES // 2 + 1)})


def test_oversized_header_name(headers: dict[str, str]) -> None:
    _malformed({**headers, "X-" + "n" * MAX_HEADER_BYTES: "1"})


def test_too_many_headers(env: Envelope, headers: dict[str, str]) -> None:
    filler = {f"X-{i}": "1" for i in range(MAX_HEADERS - len(headers))}
    parse({**headers, **filler}, env.payload)
    _malformed({**headers, **filler, "X-one-more": "1"})


# --- signatures -----------------------------------------------------------------


def test_unsigned(headers: dict[str, str]) -> None:
    del headers["Symbi-Sig"]
    with pytest.raises(SignatureError) as info:
        parse(headers, b"")
    assert info.value.reason == "unsigned"


def test_malformed_wins_over_unsigned(headers: dict[str, str]) -> None:
    del headers["Symbi-Sig"]
    headers["Symbi-Level"] = "bogus"
    _malformed(headers)


@pytest.mark.parametrize(
    "sig",
    [
        "",
        "A" * 85,
        "A" * 87,
        "A" * 86 + "==",
        "A" * 84 + "==",
        "+" + "A" * 85,
        "/" + "A" * 85,
        "A" * 85 + "B",  # decodes to 64 bytes, but with non-zero trailing bits
        "A" * 85 + "=",
        "A" * 85 + ".",
    ],
)
def test_bad_signature_encoding(headers: dict[str, str], sig: str) -> None:
    headers["Symbi-Sig"] = sig
    assert "Symbi-Sig" in str(_malformed(headers))


def test_wrong_key(env: Envelope, other_signer: Signer) -> None:
    with pytest.raises(SignatureError) as info:
        verify(env, other_signer.public_key)
    assert info.value.reason == "bad_signature"


def test_tampered_payload(env: Envelope, signer: Signer) -> None:
    with pytest.raises(SignatureError):
        verify(dataclasses.replace(env, payload=env.payload + b" "), signer.public_key)


def test_verify_unsigned_envelope(env: Envelope, signer: Signer) -> None:
    with pytest.raises(SignatureError) as info:
        verify(dataclasses.replace(env, sig=None), signer.public_key)
    assert info.value.reason == "unsigned"


def test_verify_undecodable_signature(env: Envelope, signer: Signer) -> None:
    with pytest.raises(SignatureError) as info:
        verify(dataclasses.replace(env, sig="not base64!"), signer.public_key)
    assert info.value.reason == "bad_signature"


@pytest.mark.parametrize(
    "public_key",
    [
        "",
        "U" + "A" * 55,  # checksum mismatch
        "not a key",
        "lowercase" * 6 + "aaaaaaaa",
    ],
)
def test_verify_with_unusable_key_denies(env: Envelope, public_key: str) -> None:
    with pytest.raises(SignatureError) as info:
        verify(env, public_key)
    assert info.value.reason == "bad_signature"


def test_verify_with_account_key_denies(env: Envelope, signer: Signer) -> None:
    account: bytes = nkeys.from_seed(_new_seed(nkeys.PREFIX_BYTE_ACCOUNT).encode()).public_key
    with pytest.raises(SignatureError):
        verify(env, account.decode())


def test_signature_is_deterministic(env: Envelope, signer: Signer) -> None:
    assert sign(dataclasses.replace(env, sig=None), signer) == env


def test_signer_matches_nkeys(signer: Signer) -> None:
    seed = _new_seed()
    keypair = nkeys.from_seed(seed.encode())
    ours = Signer.from_seed(seed)
    assert ours.public_key == keypair.public_key.decode()
    assert ours.sign(b"abc") == keypair.sign(b"abc")
    assert Signer.from_seed(f"  {seed}\n").public_key == ours.public_key


@pytest.mark.parametrize(
    "seed",
    [
        "",
        "SU",
        "not a seed",
        _new_seed(nkeys.PREFIX_BYTE_ACCOUNT),  # SA...: an account, not a user
        _flip_char(_new_seed(), 10),  # checksum mismatch
        _flip_char(_new_seed(), -1),  # only the unused trailing bits differ
    ],
)
def test_bad_seed(seed: str) -> None:
    with pytest.raises(ConfigError) as info:
        Signer.from_seed(seed)
    if seed:
        assert seed not in str(info.value)


def test_build_rejects_what_parse_rejects() -> None:
    with pytest.raises(EnvelopeError):
        build(sender="docker.a1", to="event.x", type="data", level="public")
    with pytest.raises(EnvelopeError):
        build(sender="docker.a1", to="docker.b1", type="data", level="public", nonce=-1)
    with pytest.raises(EnvelopeError):
        build(sender="docker.a1", to="docker.b1", type="data", level="public", nonce=2**64)
    with pytest.raises(EnvelopeError):
        build(sender="docker.a1", to="docker.b1", type="data", level="public", time_ms=-1)
    with pytest.raises(EnvelopeError):
        build(sender="docker.a1", to="docker.b1", type="data", level="public", id="a b")
    with pytest.raises(EnvelopeError):
        build(sender="docker.a1", to="docker.b1", type="data", level="public", reply_to="m")


# --- nonces and base64url -------------------------------------------------------


def test_nonce_source_is_strictly_increasing_across_threads() -> None:
    source = NonceSource()
    results: list[list[int]] = [[] for _ in range(4)]

    def take(out: list[int]) -> None:
        out.extend(source.next() for _ in range(2000))

    threads = [threading.Thread(target=take, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for out in results:
        assert out == sorted(out)
    everything = [n for out in results for n in out]
    assert len(set(everything)) == len(everything)


def test_new_nonce_source_starts_above_an_old_one() -> None:
    """A restarted agent gets a fresh source; it must not reuse the old nonces."""
    old = NonceSource()
    issued = [old.next() for _ in range(1000)]
    assert NonceSource().next() > max(issued)


@pytest.mark.parametrize("data", [b"", b"\x00", b"ab", b"abc", bytes(range(256))])
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("text", ["A", "AB=", "AB==", "A+", "A/", "AB C", "AB\n", "AF"])
def test_b64url_decode_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(text)


def test_b64url_decode_length() -> None:
    with pytest.raises(ValueError, match="expected 4 bytes"):
        b64url_decode(b64url_encode(b"abc"), length=4)


# --- sealing --------------------------------------------------------------------


def test_seal_round_trip(signer: Signer) -> None:
    recipient = EncryptionKeyPair.generate()
    sealed = seal(b"secret plans", recipient.public_key)
    assert b"secret plans" not in sealed
    assert recipient.open(sealed) == b"secret plans"
    assert open_sealed(sealed, recipient.secret_key) == b"secret plans"
    assert EncryptionKeyPair.from_secret(recipient.secret_key).public_key == recipient.public_key

    # The signature covers the sealed bytes, and the headers say how they are sealed.
    env = sign(
        build(
            sender="docker.a1",
            to="docker.b1",
            type="data",
            level="secret",
            enc="x25519-sealed",
            payload=sealed,
        ),
        signer,
    )
    parsed = parse(to_headers(env), sealed)
    assert parsed.enc == "x25519-sealed"
    verify(parsed, signer.public_key)
    assert recipient.open(parsed.payload) == b"secret plans"


def test_seal_is_randomised() -> None:
    recipient = EncryptionKeyPair.generate()
    assert seal(b"x", recipient.public_key) != seal(b"x", recipient.public_key)


def test_open_with_wrong_key() -> None:
    sealed = seal(b"secret", EncryptionKeyPair.generate().public_key)
    wrong = EncryptionKeyPair.generate()
    with pytest.raises(CryptoError):
        wrong.open(sealed)
    with pytest.raises(CryptoError):
        open_sealed(sealed, wrong.secret_key)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_open_damaged(damage: str) -> None:
    recipient = EncryptionKeyPair.generate()
    sealed = seal(b"secret", recipient.public_key)
    bad = {
        "flip": sealed[:-1] + bytes([sealed[-1] ^ 1]),
        "truncate": sealed[:40],
        "empty": b"",
    }[damage]
    with pytest.raises(CryptoError):
        recipient.open(bad)


@pytest.mark.parametrize("key", ["", "short", "A" * 44, "A" * 42 + "B", "+" * 43])
def test_bad_keys(key: str) -> None:
    with pytest.raises(CryptoError):
        seal(b"x", key)
    with pytest.raises(CryptoError):
        open_sealed(b"x" * 64, key)


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(CryptoError):
        seal(b"x", b64url_encode(bytes(32)))


def test_key_pair_repr_hides_secret() -> None:
    pair = EncryptionKeyPair.generate()
    assert pair.secret_key not in repr(pair)
    assert pair.public_key in repr(pair)
