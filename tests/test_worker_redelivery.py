"""Redeliveries after a worker died: each crash point, against an in-memory broker.

The pipeline's protocol (see :mod:`policy_worker.pipeline`) relies on the
deduplication of audit records and deliveries by ``Nats-Msg-Id`` and on
compare-and-set KV writes; :class:`FakeBroker` has exactly those semantics, so
each test can leave behind what a worker killed at one point leaves, then run
the redelivery through a fresh pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from agent_sdk.envelope import Envelope, build, sign, to_headers
from agent_sdk.headers import H_MSG_ID
from agent_sdk.signing import Signer
from broker_gateway.streams import NONCE_BUCKET, RATE_BUCKET
from policy_worker.broker import (
    EXPECTED_LAST_SUBJECT_SEQ,
    Ack,
    KvEntry,
    Publish,
    PublishResult,
    RevisionConflict,
)
from policy_worker.bus_ops import SubscriptionWriter
from policy_worker.checks import Checker
from policy_worker.config import WorkerConfig
from policy_worker.metrics import WorkerMetrics
from policy_worker.pipeline import BatchOutcome, Pipeline
from policy_worker.policy import parse_policies
from policy_worker.rate_store import RateStore
from policy_worker.recipients import RecipientResolver
from policy_worker.replay import NonceStore
from policy_worker.route_tag import RouteSigner
from tests.test_worker_units import AckRecorder, FakeRegistry, _record, _signer

POLICIES = """
communication_policies:
  - name: docker_to_docker
    source_tier: docker
    destination_tier: docker
    allowed_message_types: [data]
    rate_limits: {messages_per_second: 1, burst_size: 1}
"""


@dataclass
class Stored:
    subject: str
    payload: bytes
    headers: dict[str, str]


@dataclass
class FakeBroker:
    """KV buckets with compare-and-set, and streams that deduplicate by ``Nats-Msg-Id``."""

    kv: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    streams: dict[str, list[Stored]] = field(default_factory=dict)
    ids: dict[tuple[str, str], int] = field(default_factory=dict)
    revision: int = 0
    reads: int = 0

    async def ack(self, msg: Msg) -> None:
        await msg.ack()

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        found = self.kv.get(f"{bucket}.{key}")
        return None if found is None else KvEntry(*found)

    @staticmethod
    def kv_write_request(bucket: str, key: str, value: bytes, last: int) -> Publish:
        return Publish(f"$KV.{bucket}.{key}", value, {EXPECTED_LAST_SUBJECT_SEQ: str(last)})

    async def kv_write(self, bucket: str, key: str, value: bytes, last: int) -> int:
        [result] = await self.publish_all([self.kv_write_request(bucket, key, value, last)])
        assert isinstance(result, Ack)
        return result.seq

    async def publish_all(self, requests: Sequence[Publish]) -> list[PublishResult]:
        return [self.store(req) for req in requests]

    def store(self, req: Publish) -> PublishResult:
        if req.subject.startswith("$KV."):
            key = req.subject[len("$KV.") :]
            current = self.kv.get(key, (0, b""))[0]
            if current != int(req.headers[EXPECTED_LAST_SUBJECT_SEQ]):
                return RevisionConflict("wrong last sequence")
            self.revision += 1
            self.kv[key] = (self.revision, req.payload)
            return Ack("KV", self.revision)
        stream = "AUDIT" if req.subject.startswith("audit.") else "INBOX"
        msg_id = req.headers[H_MSG_ID]
        if (stream, msg_id) in self.ids:
            return Ack(stream, self.ids[(stream, msg_id)], duplicate=True)
        kept = self.streams.setdefault(stream, [])
        kept.append(Stored(req.subject, req.payload, dict(req.headers)))
        self.ids[(stream, msg_id)] = len(kept)
        return Ack(stream, len(kept))

    async def stored(self, stream: str, seq: int) -> bytes:
        self.reads += 1
        return self.streams[stream][seq - 1].payload

    def audits(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.streams.get("AUDIT", [])]

    def deliveries(self) -> list[Stored]:
        return self.streams.get("INBOX", [])


@dataclass
class World:
    alice: Signer
    checker: Checker
    broker: FakeBroker
    config: WorkerConfig
    signer: RouteSigner

    def pipeline(self) -> Pipeline:
        """A fresh worker's pipeline (nothing remembered from the one that died)."""
        return Pipeline(
            config=self.config,
            checker=self.checker,
            io=self.broker,  # type: ignore[arg-type]
            nonces=NonceStore(self.broker),  # type: ignore[arg-type]
            rates=RateStore(self.broker),  # type: ignore[arg-type]
            subscriptions=SubscriptionWriter(self.broker),  # type: ignore[arg-type]
            signer=self.signer,
            metrics=WorkerMetrics(CollectorRegistry()),
        )

    async def run(
        self, env: Envelope, *, attempt: int, seq: int = 7
    ) -> tuple[BatchOutcome, AckRecorder]:
        client = AckRecorder()
        stored_ns = env.time_ms * 1_000_000
        reply = f"$JS.ACK.INGRESS.workers.{attempt}.{seq}.{seq}.{stored_ns}.0"
        msg = Msg(client, "tier.docker.agent.alice.out", reply, env.payload, to_headers(env))  # type: ignore[arg-type]
        return await self.pipeline().process([msg]), client


@pytest.fixture
def world(tmp_path: Path) -> World:
    alice = _signer()
    registry = FakeRegistry(_record("docker.alice", alice), _record("docker.bob", _signer()))
    policies = parse_policies(POLICIES)
    checker = Checker(
        policies=policies,
        registry=registry,
        resolver=RecipientResolver(registry, frozenset()),
        max_skew_ms=30_000,
    )
    config = WorkerConfig(
        name="w", state_dir=tmp_path, nats_url="nats://x", creds=tmp_path, policies=policies
    )
    return World(alice, checker, FakeBroker(), config, RouteSigner(_signer()))


def _message(world: World, n: int = 0) -> Envelope:
    now = time.time_ns() // 1_000_000
    return sign(
        build(sender="docker.alice", to="docker.bob", type="data", level="public",
              payload=b"m%d" % n, time_ms=now),
        world.alice,
    )  # fmt: skip


def _nonce(world: World, env: Envelope) -> bytes | None:
    found = world.broker.kv.get(f"{NONCE_BUCKET}.docker.alice.{env.nonce}")
    return None if found is None else found[1]


def _rate_writes(world: World) -> int:
    found = world.broker.kv.get(f"{RATE_BUCKET}.docker.alice.docker_to_docker")
    return 0 if found is None else found[0]


def _acked(client: AckRecorder) -> bool:
    return [body for _, body in client.sent] == [b""]


async def test_first_delivery_records_the_nonce_then_audits_and_delivers(world: World) -> None:
    env = _message(world)
    outcome, client = await world.run(env, attempt=1)
    assert outcome.acked == 1 and _acked(client)
    assert _nonce(world, env) == b"7"
    assert [r["reason"] for r in world.broker.audits()] == ["ok"]
    assert len(world.broker.deliveries()) == 1 and _rate_writes(world) > 0


async def test_killed_after_the_nonce_and_rate(world: World) -> None:
    env = _message(world)
    await world.run(env, attempt=1)
    # What the dead attempt left: the nonce entry and its rate; no audit, no delivery.
    world.broker.streams.clear()
    world.broker.ids.clear()
    rate_state = _rate_writes(world)
    outcome, client = await world.run(env, attempt=2)
    assert outcome.acked == 1 and _acked(client)
    assert _rate_writes(world) == rate_state  # not counted twice
    assert [r["reason"] for r in world.broker.audits()] == ["ok"]
    assert len(world.broker.deliveries()) == 1 and world.broker.reads == 0


async def test_killed_after_an_allowing_audit(world: World) -> None:
    env = _message(world)
    await world.run(env, attempt=1)
    del world.broker.streams["INBOX"]  # the delivery never got out
    world.broker.ids = {k: v for k, v in world.broker.ids.items() if k[0] != "INBOX"}
    outcome, client = await world.run(env, attempt=2)
    assert outcome.acked == 1 and _acked(client)
    assert len(world.broker.audits()) == 1 and world.broker.reads == 1
    [delivery] = world.broker.deliveries()
    assert delivery.headers["Symbi-Id"] == env.id


async def test_killed_after_a_denying_audit_stays_denied(world: World) -> None:
    first, second = _message(world, 1), _message(world, 2)
    await world.run(first, attempt=1, seq=7)
    await world.run(second, attempt=1, seq=8)  # burst 1: rate limited
    assert [r["reason"] for r in world.broker.audits()] == ["ok", "rate_limited"]
    # Its redelivery decides afresh without the rate (which would allow it), but the
    # audit record of the dead attempt is authoritative: still denied, not delivered.
    outcome, client = await world.run(second, attempt=2, seq=8)
    assert outcome.acked == 1 and _acked(client)
    assert [r["reason"] for r in world.broker.audits()] == ["ok", "rate_limited"]
    assert len(world.broker.deliveries()) == 1 and world.broker.reads == 1


async def test_killed_before_the_ack(world: World) -> None:
    env = _message(world)
    await world.run(env, attempt=1)
    outcome, client = await world.run(env, attempt=2)
    assert outcome.acked == 1 and _acked(client)
    assert len(world.broker.audits()) == 1 and len(world.broker.deliveries()) == 1


async def test_killed_before_anything_was_written(world: World) -> None:
    env = _message(world)
    outcome, client = await world.run(env, attempt=2)  # e.g. handed back on a stop
    assert outcome.acked == 1 and _acked(client)
    assert _nonce(world, env) == b"7" and _rate_writes(world) > 0  # rated after all
    assert [r["reason"] for r in world.broker.audits()] == ["ok"]
    assert len(world.broker.deliveries()) == 1


async def test_a_replay_is_denied_on_any_attempt(world: World) -> None:
    env = _message(world)
    await world.run(env, attempt=1, seq=7)
    for attempt in (1, 2):
        outcome, _ = await world.run(env, attempt=attempt, seq=9)
        assert outcome.acked == 1
    assert [r["reason"] for r in world.broker.audits()] == ["ok", "replay"]
    assert len(world.broker.deliveries()) == 1


async def test_large_batches_are_checked_on_crypto_threads_too(world: World) -> None:
    world.config = dataclasses.replace(world.config, crypto_threads=2, crypto_min_batch=2)
    envs = [_message(world, n) for n in range(5)]
    clients = [AckRecorder() for _ in envs]
    msgs = [
        Msg(client, "tier.docker.agent.alice.out",  # type: ignore[arg-type]
            f"$JS.ACK.INGRESS.workers.1.{10 + n}.{10 + n}.{env.time_ms * 1_000_000}.0",
            env.payload, to_headers(env))
        for n, (env, client) in enumerate(zip(envs, clients, strict=True))
    ]  # fmt: skip
    pipeline = world.pipeline()
    try:
        outcome = await pipeline.process(msgs)
    finally:
        pipeline.close()
    assert outcome.acked == 5 and all(_acked(c) for c in clients)
    # In order, as checked: burst 1, so only the first is allowed.
    assert [(r["ingress_seq"], r["reason"]) for r in world.broker.audits()] == [
        (10, "ok"), (11, "rate_limited"), (12, "rate_limited"), (13, "rate_limited"),
        (14, "rate_limited"),
    ]  # fmt: skip
