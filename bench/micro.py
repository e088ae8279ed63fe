"""In-process rates of the worker's CPU-only steps, against raw Ed25519 in the same run.

Each function is timed in a loop for about ``seconds`` and reported twice:
per wall-clock second and per CPU second of this process. The second is the
"per core" figure (one thread, one core) and barely moves when other work
shares the machine, which on a shared 2-core box is what makes it comparable
between runs. Raw ``nacl.signing.VerifyKey.verify`` is measured in the same
run, so ``agent_sdk`` verification is given as a fraction of what the machine
can do at all.

- ``decide``: :func:`policy_worker.decision.decide` alone, for a signed
  envelope already verified, cycling through every tier pair of the policies
  in use (the allowed path, which runs every check);
- ``envelope_verify``: :func:`agent_sdk.envelope.verify` (signing input with
  the payload's SHA-256, base64 decoding, cached key, libsodium);
- ``envelope_parse``: :func:`agent_sdk.envelope.parse` of the headers as they
  arrive, which the worker also does for every message;
- ``ed25519_verify``: the bare libsodium verification of the same bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.signing

from agent_sdk.b64 import b64url_decode
from agent_sdk.envelope import Envelope, build, parse, sign, signing_input, to_headers, verify
from agent_sdk.names import AgentAddress
from agent_sdk.signing import SIGNATURE_BYTES, Signer, Verifier, decode_user_public_key
from broker_gateway.keys import new_seed
from broker_gateway.records import AgentRecord
from policy_worker.decision import decide
from policy_worker.policy import PolicySet

_CHUNK = 256
_PAYLOAD = 256


@dataclass(frozen=True, slots=True)
class Rate:
    """Operations per wall-clock second and per CPU second of one thread."""

    ops: int
    per_s: float
    per_cpu_s: float

    def as_dict(self) -> dict[str, float | int]:
        return {"ops": self.ops, "per_s": round(self.per_s), "per_cpu_s": round(self.per_cpu_s)}


def measure(step: Callable[[int], Any], seconds: float) -> Rate:
    """Call ``step(i)`` for i = 0, 1, ... for about ``seconds``; the achieved rates."""
    for i in range(_CHUNK):  # warm caches (key decoding, regexes, lru caches)
        step(i)
    ops = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while True:
        for i in range(ops, ops + _CHUNK):
            step(i)
        ops += _CHUNK
        wall = time.perf_counter() - wall0
        if wall >= seconds:
            break
    cpu = max(time.process_time() - cpu0, 1e-9)
    return Rate(ops, ops / wall, ops / cpu)


def _record(address: str, signer: Signer) -> AgentRecord:
    tier, _, agent_id = address.partition(".")
    return AgentRecord(
        tier=tier,
        id=agent_id,
        public_key=signer.public_key,
        encryption_public_key="A" * 43,
        clearance="restricted",
    )


@dataclass(frozen=True, slots=True)
class _Case:
    env: Envelope
    arrived_from: AgentAddress
    sender: AgentRecord
    recipient: AgentRecord
    headers: dict[str, str]


def _cases(pairs: list[tuple[str, str]], count: int = 64) -> list[_Case]:
    """Signed envelopes over the given tier pairs, from distinct senders."""
    cases = []
    for i in range(count):
        src, dst = pairs[i % len(pairs)]
        signer = Signer.from_seed(new_seed("user"))
        sender, to = f"{src}.micro-s{i}", f"{dst}.micro-r{i}"
        unsigned = build(
            sender=sender, to=to, type="data", level="restricted", payload=os.urandom(_PAYLOAD)
        )
        env = sign(unsigned, signer)
        cases.append(
            _Case(
                env,
                AgentAddress.parse(sender),
                _record(sender, signer),
                _record(to, Signer.from_seed(new_seed("user"))),
                to_headers(env),
            )
        )
    return cases


def run_micro(policies: PolicySet, pairs: list[tuple[str, str]], seconds: float) -> dict[str, Any]:
    """All four rates, and verification as a fraction of raw Ed25519."""
    cases = _cases(pairs)
    n = len(cases)
    verifier = Verifier()
    now_ms = time.time_ns() // 1_000_000

    def decide_step(i: int) -> None:
        c = cases[i % n]
        decision = decide(
            c.env,
            arrived_from=c.arrived_from,
            sender=c.sender,
            recipient=c.recipient,
            dst_tier=c.recipient.tier,
            policies=policies,
            now_ms=now_ms,
            max_skew_ms=30_000,
        )
        assert decision.allowed, decision

    def verify_step(i: int) -> None:
        c = cases[i % n]
        verify(c.env, c.sender.public_key, verifier=verifier)

    def parse_step(i: int) -> None:
        c = cases[i % n]
        parse(c.headers, c.env.payload)

    raw = [
        (
            nacl.signing.VerifyKey(decode_user_public_key(c.sender.public_key)),
            signing_input(c.env),
            _signature(c.env),
        )
        for c in cases
    ]

    def raw_step(i: int) -> None:
        key, data, signature = raw[i % n]
        key.verify(data, signature)

    rates = {
        "decide": measure(decide_step, seconds),
        "envelope_parse": measure(parse_step, seconds),
        "envelope_verify": measure(verify_step, seconds),
        "ed25519_verify": measure(raw_step, seconds),
    }
    result: dict[str, Any] = {name: rate.as_dict() for name, rate in rates.items()}
    result["verify_vs_raw"] = round(
        rates["envelope_verify"].per_cpu_s / rates["ed25519_verify"].per_cpu_s, 3
    )
    result["pairs"] = [f"{s}->{d}" for s, d in pairs]
    return result


def _signature(env: Envelope) -> bytes:
    assert env.sig is not None
    return b64url_decode(env.sig, length=SIGNATURE_BYTES)
