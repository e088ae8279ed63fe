"""The policy worker's parts, without a server: checks, replay, rate state, wire formats."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, generate_latest

from agent_sdk.envelope import build, sign, to_headers
from agent_sdk.errors import BrokerError, ConfigError, ContractError, EnvelopeError
from agent_sdk.route import route_signing_input, sign_route, verify_route
from agent_sdk.signing import Signer
from broker_gateway.keys import new_seed
from broker_gateway.records import AgentRecord
from broker_gateway.server import MAX_PAYLOAD, MAX_PENDING
from policy_worker.audit import audit_msg_id, audit_publish, audit_record
from policy_worker.broker import Ack, KvEntry, Publish, PublishResult, RevisionConflict
from policy_worker.bus_ops import BusOp, applied, parse_bus_op
from policy_worker.checks import Checker
from policy_worker.config import WorkerConfig
from policy_worker.consumer import MAX_BYTES_PER_BATCH, PullConsumer, request_bytes
from policy_worker.deadletter import deadletter
from policy_worker.decision import Decision
from policy_worker.delivery import forwarded_headers
from policy_worker.ingress import IngressItem, stage_of
from policy_worker.metrics import WorkerMetrics
from policy_worker.policy import default_policies
from policy_worker.rate_limit import encode_state
from policy_worker.rate_stage import rated, start_rate
from policy_worker.rate_store import RateStore
from policy_worker.recipients import RecipientResolver
from policy_worker.replay import (
    NonceRecord,
    NonceStore,
    adopted,
    decode,
    encode,
    keep_recipients,
    mark_replay,
)
from policy_worker.topics import check_pattern, pattern_matches

NOW_MS = 1_796_000_000_000


def _signer() -> Signer:
    return Signer.from_seed(new_seed("user"))


# -- route tags ----------------------------------------------------------------


def test_route_tag_binds_every_field() -> None:
    router = _signer()
    fields = {"msg_id": "m-1", "sender": "docker.a1", "recipient": "docker.b1", "sender_key": "UX"}
    tag = sign_route(router, **fields)
    assert verify_route(tag, router_public_key=router.public_key, **fields)
    for name in fields:
        changed = {**fields, name: fields[name] + "x"}
        assert not verify_route(tag, router_public_key=router.public_key, **changed), name
    assert not verify_route(tag, router_public_key=_signer().public_key, **fields)
    assert not verify_route("not-a-tag", router_public_key=router.public_key, **fields)
    assert route_signing_input(**fields) == b"symbi-route/1\nm-1\ndocker.a1\ndocker.b1\nUX"
    with pytest.raises(ContractError):
        route_signing_input(**{**fields, "sender_key": "UX\nmore"})


# -- topics and the bus -----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("metrics.cpu", "metrics.cpu", True),
        ("metrics.*", "metrics.cpu", True),
        ("metrics.*", "metrics", False),
        ("metrics.*", "metrics.cpu.load", False),
        ("metrics.>", "metrics.cpu.load", True),
        ("metrics.>", "metrics", False),
        ("*.cpu", "metrics.cpu", True),
        (">", "anything.at.all", True),
        ("metrics.cpu", "metrics.gpu", False),
    ],
)
def test_pattern_matching(pattern: str, topic: str, matches: bool) -> None:
    assert check_pattern(pattern) == pattern
    assert pattern_matches(pattern, topic) is matches


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "A.b", "a b", "a.*x", ".".join("a" * 9)])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(EnvelopeError):
        check_pattern(pattern)


def test_bus_ops() -> None:
    op = parse_bus_op(b'{"op": "subscribe", "topics": ["a.b", "c.>", "a.b"]}')
    assert op == BusOp("subscribe", ("a.b", "c.>"))
    assert applied(("x",), op) == ("x", "a.b", "c.>")
    assert applied(("x", "a.b"), BusOp("unsubscribe", ("a.b", "zz"))) == ("x",)
    for bad in (b"nope", b"[]", b'{"op": "drop", "topics": ["a"]}', b'{"op": "subscribe"}',
                b'{"op": "subscribe", "topics": []}', b'{"op": "subscribe", "topics": [1]}',
                b'{"op": "subscribe", "topics": ["a"], "x": 1}'):  # fmt: skip
        with pytest.raises(EnvelopeError):
            parse_bus_op(bad)
    with pytest.raises(EnvelopeError):
        applied(tuple(f"t{i}" for i in range(256)), BusOp("subscribe", ("one.more",)))


# -- the stateless checks ------------------------------------------------------------


class FakeRegistry:
    def __init__(self, *records: AgentRecord) -> None:
        self.records = {r.address: r for r in records}

    def get(self, address: str) -> AgentRecord | None:
        return self.records.get(address)


def _record(address: str, signer: Signer, **kw: Any) -> AgentRecord:
    tier, _, agent_id = address.partition(".")
    return AgentRecord(
        tier=tier,  # type: ignore[arg-type]
        id=agent_id,
        public_key=signer.public_key,
        encryption_public_key="x",
        **kw,
    )


def _ingress(
    subject: str, headers: dict[str, str] | None, payload: bytes, *, stored_ms: int, seq: int = 7
) -> Msg:
    reply = f"$JS.ACK.INGRESS.workers.1.{seq}.{seq}.{stored_ms * 1_000_000}.0"
    return Msg(None, subject, reply, payload, headers)  # type: ignore[arg-type]


@pytest.fixture
def parties() -> tuple[Signer, Checker]:
    alice = _signer()
    registry = FakeRegistry(
        _record("docker.alice", alice),
        _record("docker.bob", _signer(), subscriptions=("news.*",)),
        _record("gvisor.gina", _signer(), subscriptions=("news.>",)),
        _record("docker.gone", _signer(), subscriptions=("news.*",), status="revoked"),
    )
    checker = Checker(
        policies=default_policies(),
        registry=registry,
        resolver=RecipientResolver(registry, frozenset({"launcher", "bus"})),
        max_skew_ms=30_000,
    )
    return alice, checker


def _inspect(checker: Checker, env: Any, *, stored_ms: int, headers: Any = None) -> IngressItem:
    msg = _ingress(
        "tier.docker.agent.alice.out",
        to_headers(env) if headers is None else headers,
        env.payload,
        stored_ms=stored_ms,
    )
    return checker.inspect(msg, time.perf_counter())


def test_freshness_is_judged_by_the_ingress_storage_time(parties: tuple[Signer, Checker]) -> None:
    alice, checker = parties
    env = sign(build(sender="docker.alice", to="docker.bob", type="data", level="public",
                     time_ms=NOW_MS), alice)  # fmt: skip
    # Stored 10 s after it was sent: fresh, however late a (re)delivery is processed.
    item = _inspect(checker, env, stored_ms=NOW_MS + 10_000)
    assert [t.decision.reason for t in item.targets] == ["ok"]
    assert item.stored_ms == NOW_MS + 10_000 and item.seq == 7 and item.attempt == 1
    stale = _inspect(checker, env, stored_ms=NOW_MS + 31_000)
    assert [t.decision.reason for t in stale.targets] == ["stale"]
    assert stale.targets[0].stage == "final" and not stale.needs_nonce


def test_signature_is_checked_with_the_registered_key(parties: tuple[Signer, Checker]) -> None:
    _, checker = parties
    forged = sign(build(sender="docker.alice", to="docker.bob", type="data", level="public",
                        time_ms=NOW_MS), _signer())  # fmt: skip
    [target] = _inspect(checker, forged, stored_ms=NOW_MS).targets
    assert target.decision.reason == "bad_signature" and target.recipient is None
    assert target.dst_tier == "docker"


def test_event_fans_out_to_active_subscribers(parties: tuple[Signer, Checker]) -> None:
    alice, checker = parties
    env = sign(build(sender="docker.alice", to="event.news.today", type="event",
                     level="public", time_ms=NOW_MS), alice)  # fmt: skip
    item = _inspect(checker, env, stored_ms=NOW_MS)
    assert [(t.recipient, t.dst_tier, t.decision.reason) for t in item.targets] == [
        ("docker.bob", "docker", "ok"),
        ("gvisor.gina", "gvisor", "ok"),
    ]
    assert encode(item) == b"7|docker.bob,gvisor.gina"
    nobody = sign(build(sender="docker.alice", to="event.sports", type="event",
                        level="public", time_ms=NOW_MS), alice)  # fmt: skip
    [target] = _inspect(checker, nobody, stored_ms=NOW_MS).targets
    assert (target.recipient, target.dst_tier) == (None, "event")
    assert target.decision.reason == "unknown_destination"


def test_garbage_headers_never_raise(parties: tuple[Signer, Checker]) -> None:
    alice, checker = parties
    env = sign(build(sender="docker.alice", to="docker.bob", type="data", level="public"), alice)
    for headers in ({}, {"Symbi-Id": "\ufffd"}, {"Bad\x01": "v"}, {"X": "y" * 5000}):
        [target] = _inspect(checker, env, stored_ms=NOW_MS, headers=headers).targets
        assert target.decision.reason == "malformed"


# -- replay: sticky outcomes -----------------------------------------------------


def test_nonce_values_round_trip(parties: tuple[Signer, Checker]) -> None:
    alice, checker = parties
    env = sign(build(sender="docker.alice", to="docker.bob", type="data", level="public",
                     time_ms=NOW_MS), alice)  # fmt: skip
    assert encode(_inspect(checker, env, stored_ms=NOW_MS)) == b"7"
    event = sign(build(sender="docker.alice", to="event.news.today", type="event",
                       level="public", time_ms=NOW_MS), alice)  # fmt: skip
    assert encode(_inspect(checker, event, stored_ms=NOW_MS)) == b"7|docker.bob,gvisor.gina"
    assert decode(b"12") == NonceRecord(12)
    assert decode(b"12|docker.b,gvisor.g") == NonceRecord(12, ("docker.b", "gvisor.g"))
    # Entries of earlier versions: only the sequence and the recipients count.
    assert decode(b"12|ok") == NonceRecord(12)
    assert decode(b"12|docker.b=ok,gvisor.g=rate_limited") == NonceRecord(
        12, ("docker.b", "gvisor.g")
    )
    assert decode(b"x|ok").seq is None
    assert decode(b"\xff").seq is None


def test_replays_are_denied(parties: tuple[Signer, Checker]) -> None:
    alice, checker = parties
    env = sign(build(sender="docker.alice", to="docker.bob", type="data", level="public",
                     time_ms=NOW_MS), alice)  # fmt: skip
    again = _inspect(checker, env, stored_ms=NOW_MS)
    mark_replay(again, 3)
    assert again.targets[0].decision.reason == "replay"
    assert again.targets[0].stage == "final"


def test_event_redelivery_keeps_its_first_recipients(parties: tuple[Signer, Checker]) -> None:
    alice, checker = parties
    env = sign(build(sender="docker.alice", to="event.news.today", type="event",
                     level="public", time_ms=NOW_MS), alice)  # fmt: skip
    item = _inspect(checker, env, stored_ms=NOW_MS)
    # First attempt: bob and firecracker.fay (no longer subscribed).
    keep_recipients(item, decode(b"7|docker.bob,firecracker.fay"))
    assert [(t.recipient, t.subject, t.decision.reason) for t in item.targets] == [
        ("docker.bob", "tier.docker.agent.bob.in", "ok"),
        ("gvisor.gina", "tier.gvisor.agent.gina.in", "ok"),
        ("firecracker.fay", "tier.firecracker.agent.fay.in", "unknown_destination"),
    ]
    # Its audit record (if the attempt got that far) is what counts.
    fay = item.targets[2]
    record = {"reason": "ok", "decision": "allow", "recipient": "firecracker.fay",
              "policy": "docker_to_firecracker"}  # fmt: skip
    decision = adopted(record, fay, "docker", checker.policies)
    assert decision is not None and decision.allowed
    assert decision.policy_name == "docker_to_firecracker"
    assert adopted({**record, "recipient": "docker.bob"}, fay, "docker", checker.policies) is None
    assert adopted({**record, "decision": "deny"}, fay, "docker", checker.policies) is None
    assert adopted({**record, "reason": "maybe"}, fay, "docker", checker.policies) is None


# -- KV state against an in-memory fake of the broker seam -------------------------------


class FakeIO:
    """Compare-and-set semantics of a JetStream KV bucket, in memory."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[int, bytes]] = {}
        self.seq = 0
        self.writes = 0
        self.fail_next = 0

    async def ack(self, msg: Msg) -> None:
        await msg.ack()

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        found = self.data.get(key)
        return None if found is None else KvEntry(*found)

    @staticmethod
    def kv_write_request(bucket: str, key: str, value: bytes, last: int) -> Publish:
        return Publish(key, value, {"last": str(last)})

    async def kv_write(self, bucket: str, key: str, value: bytes, last: int) -> int:
        [result] = await self.publish_all([self.kv_write_request(bucket, key, value, last)])
        if isinstance(result, BrokerError):
            raise result
        return result.seq

    async def publish_all(self, requests: Sequence[Publish]) -> list[PublishResult]:
        out: list[PublishResult] = []
        for req in requests:
            self.writes += 1
            if self.fail_next:
                self.fail_next -= 1
                out.append(BrokerError("timeout"))
                continue
            current = self.data.get(req.subject, (0, b""))[0]
            if current != int(req.headers["last"]):
                out.append(RevisionConflict("wrong last sequence"))
                continue
            self.seq += 1
            self.data[req.subject] = (self.seq, req.payload)
            out.append(Ack("KV", self.seq))
        return out


async def test_rate_store_admits_the_burst_then_the_rate() -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    assert await rates.admit("k", now_ms=NOW_MS, rate=10, burst=5, n=8) == 5
    assert await rates.admit("k", now_ms=NOW_MS, rate=10, burst=5, n=1) == 0
    assert await rates.admit("k", now_ms=NOW_MS + 300, rate=10, burst=5, n=20) == 3
    assert await rates.admit("k", now_ms=NOW_MS + 10_000, rate=10, burst=5, n=20) == 5


async def test_rate_store_recovers_from_another_workers_write() -> None:
    io = FakeIO()
    mine, theirs = RateStore(io), RateStore(io)  # type: ignore[arg-type]
    assert await mine.admit("k", now_ms=NOW_MS, rate=10, burst=4, n=2) == 2
    assert await theirs.admit("k", now_ms=NOW_MS, rate=10, burst=4, n=1) == 1
    # mine remembers a stale revision: the write conflicts, it re-reads, one is left.
    assert await mine.admit("k", now_ms=NOW_MS, rate=10, burst=4, n=3) == 1
    assert mine.conflicts == 1


def _batch(alice: Signer, checker: Checker, size: int) -> list[IngressItem]:
    """``size`` messages from alice to bob, stored at the same instant (one rate group)."""
    fields = {"sender": "docker.alice", "to": "docker.bob", "type": "data", "level": "public"}
    envs = [sign(build(**fields, time_ms=NOW_MS), alice) for _ in range(size)]
    return [_inspect(checker, env, stored_ms=NOW_MS) for env in envs]


async def test_rate_stage_admits_from_the_reserve_without_tasks(
    parties: tuple[Signer, Checker],
) -> None:
    alice, checker = parties
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    first = start_rate(rates, _batch(alice, checker, 1))  # 1000/s, burst 2000: reserve 100
    assert first.admissions is not None
    assert await rated(first) == []
    assert io.writes == 1
    covered = start_rate(rates, _batch(alice, checker, 60))
    assert covered.admissions is None and covered.groups == []
    assert await rated(covered) == []
    assert (io.writes, rates.local_admissions) == (1, 60)
    # 40 reserved left for 41 messages: the shared state admits the last one.
    partly = start_rate(rates, _batch(alice, checker, 41))
    assert [g.local for g in partly.groups] == [40]
    assert await rated(partly) == []
    assert io.writes == 2


async def test_rate_stage_limits_the_last_members_after_the_reserve(
    parties: tuple[Signer, Checker],
) -> None:
    alice, checker = parties
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    await rated(start_rate(rates, _batch(alice, checker, 99)))  # reserve 100 charged
    await rated(start_rate(rates, _batch(alice, checker, 98)))  # 2 left
    [key] = io.data
    # Another worker has used up the sender's bucket since: the shared state admits nothing.
    io.data[key] = (io.seq + 1, encode_state(NOW_MS + 10_000))
    items = _batch(alice, checker, 3)
    over = await rated(start_rate(rates, items))
    assert [item for item, _, _ in over] == items[2:]
    assert {decision.reason for _, _, decision in over} == {"rate_limited"}
    assert rates.local_admissions == 98 + 2


async def test_nonce_claims() -> None:
    io = FakeIO()
    nonces = NonceStore(io)  # type: ignore[arg-type]
    first = await nonces.claim([("a.b.1", b"5"), ("a.b.2", b"6")])
    assert first == [None, None]
    again = await nonces.claim([("a.b.1", b"9"), ("a.b.3", b"10")])
    assert again == [NonceRecord(5), None]
    io.fail_next = 1
    [failed] = await nonces.claim([("a.b.4", b"11")])
    assert isinstance(failed, BrokerError)


# -- wire formats -----------------------------------------------------------------


def test_delivery_keeps_sender_headers_but_not_nats_or_worker_ones() -> None:
    headers = {
        "Symbi-Id": "m",
        "Symbi-Sig": "s",
        "X-App": "1",
        "Nats-Msg-Id": "m",
        "Nats-Expected-Last-Sequence": "3",
        "symbi-route": "forged",
        "Symbi-Sender-Key": "UFORGED",
        "Symbi-Worker": "me",
    }
    assert forwarded_headers(headers) == {"Symbi-Id": "m", "Symbi-Sig": "s", "X-App": "1"}


def test_audit_record_of_garbage_has_nulls_and_no_payload(parties: tuple[Signer, Checker]) -> None:
    _, checker = parties
    msg = _ingress(
        "tier.docker.agent.alice.out", {"Symbi-Time": "soon"}, b"secret", stored_ms=NOW_MS
    )
    item = checker.inspect(msg, time.perf_counter())
    [target] = item.targets
    record = audit_record(item, target, worker="w", now_ms=NOW_MS)
    nulls = {k for k, v in record.items() if v is None}
    assert nulls >= {"id", "from", "to", "type", "level", "sent_time", "policy", "recipient"}
    assert record["decision"] == "deny" and record["reason"] == "malformed"
    assert record["outbox"] == "docker.alice" and record["size"] == 6
    pub = audit_publish(item, target, worker="w", now_ms=NOW_MS)
    assert pub.subject == "audit.deny.docker.unknown"
    assert pub.headers == {"Nats-Msg-Id": audit_msg_id(7, None)} == {"Nats-Msg-Id": "audit:7:-"}
    assert b"secret" not in pub.payload and json.loads(pub.payload) == record


def test_deadletter_keeps_the_message_and_says_why() -> None:
    pub = deadletter(
        subject="tier.docker.agent.a.out",
        headers={"Symbi-Id": "m", "Nats-Msg-Id": "m"},
        payload=b"p",
        seq=4,
        src_tier="docker",
        reason="audit: no PubAck\r\nin time",
        attempts=5,
        worker="w",
    )
    assert pub.subject == "deadletter.docker" and pub.payload == b"p"
    assert pub.headers["Symbi-Id"] == "m" and pub.headers["Nats-Msg-Id"] == "deadletter:4"
    assert pub.headers["Symbi-Deadletter-Reason"] == "audit: no PubAck  in time"
    assert pub.headers["Symbi-Ingress-Seq"] == "4"


def test_stage_order_follows_the_contract_table() -> None:
    policy = default_policies().lookup("docker", "docker")
    assert stage_of(Decision("stale")) == "final"
    assert stage_of(Decision("no_policy")) == "pre_rate"
    assert stage_of(Decision("type_not_allowed", policy)) == "pre_rate"
    assert stage_of(Decision("no_policy", policy, "sender is in deny_senders")) == "rated"
    assert stage_of(Decision("clearance", policy)) == "rated"
    assert stage_of(Decision("ok", policy)) == "rated"


def test_config_is_validated(tmp_path: Path) -> None:
    base = {"name": "w", "state_dir": tmp_path, "nats_url": "nats://x", "creds": tmp_path}
    config = WorkerConfig(**base)  # type: ignore[arg-type]
    assert [config.backoff_s(n) for n in (1, 2, 3, 9)] == [0.25, 0.5, 1.0, 4.0]
    for bad in ({"name": "a b"}, {"batch": 0}, {"inflight": 0}, {"max_skew_ms": 0},
                {"host_services": frozenset({"Bad"})}, {"max_attempts": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            WorkerConfig(**{**base, **bad})  # type: ignore[arg-type]


def test_metrics_are_prefixed_and_injected() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.decision("docker", "gvisor", "data", "deny", "clearance").inc()
    metrics.latency("end_to_end", "docker", "gvisor").observe(0.01)
    metrics.deadletter.labels(src_tier="docker").inc()
    text = generate_latest(registry).decode()
    assert 'symbi_messages_total{decision="deny",dst_tier="gvisor",reason="clearance"' in text
    assert "symbi_end_to_end_seconds_count" in text and "symbi_deadletter_total" in text
    assert all(line.startswith(("symbi_", "#")) for line in text.splitlines() if line.strip())


# -- the pull consumer's bookkeeping ------------------------------------------------


class FakeNats:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.is_closed = False
        self.is_connected = True
        self.max_payload = MAX_PAYLOAD

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str) -> Any:
        return None

    def on_msg(self, sub: Any, handler: Any) -> None:
        pass

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.requests.append(json.loads(payload))


async def test_pull_consumer_keeps_its_window_filled() -> None:
    nc = FakeNats()
    consumer = PullConsumer(nc, "INGRESS", "workers", window=10, expires_s=1.0)  # type: ignore[arg-type]
    await consumer.start()
    assert await consumer.next_batch(5, wait_s=0.01) == []
    assert [r["batch"] for r in nc.requests] == [10] and consumer.outstanding == 10
    for i in range(6):
        consumer._take(Msg(None, "_INBOX.test", f"$JS.ACK.x.{i}", b"m"))  # type: ignore[arg-type]
    assert len(await consumer.next_batch(4, wait_s=0.01)) == 4
    # 4 outstanding + 2 buffered: 4 free is under half the window, so no request yet.
    assert len(nc.requests) == 1
    assert len(await consumer.next_batch(4, wait_s=0.01)) == 2
    assert [r["batch"] for r in nc.requests] == [10, 6]
    # The first request expires with 4 of its messages never sent.
    timeout = Msg(None, "_INBOX.test", "", b"", {"Status": "408", "Nats-Pending-Messages": "4"})  # type: ignore[arg-type]
    consumer._take(timeout)
    assert consumer.outstanding == 6
    consumer.stop_requesting()
    assert await consumer.next_batch(4, wait_s=0.01) == [] and len(nc.requests) == 2


async def test_pull_consumer_bounds_requests_and_batches_in_bytes() -> None:
    nc = FakeNats()
    consumer = PullConsumer(nc, "INGRESS", "workers", window=10, expires_s=1.0)  # type: ignore[arg-type]
    await consumer.start()
    assert await consumer.next_batch(10, wait_s=0.01) == []
    # A request always fits the biggest message, and two never reach max_pending.
    [request] = nc.requests
    assert request["max_bytes"] > MAX_PAYLOAD and 2 * request["max_bytes"] < MAX_PENDING
    # On a server of one's own that takes bigger messages, the requests grow with them.
    assert request_bytes(3 * MAX_PAYLOAD) > 3 * MAX_PAYLOAD
    assert 2 * request_bytes(3 * MAX_PAYLOAD) < 64 * 1024 * 1024  # its default max_pending
    big = b"x" * (MAX_BYTES_PER_BATCH // 2 + 1)
    for i in range(5):
        consumer._take(Msg(None, "_INBOX.test", f"$JS.ACK.x.{i}", big))  # type: ignore[arg-type]
    # Two of these would pass the batch's byte bound: one at a time.
    assert [len(await consumer.next_batch(10, wait_s=0.01)) for _ in range(5)] == [1] * 5
    huge = b"x" * (MAX_BYTES_PER_BATCH + 1)  # alone over the bound: still taken, alone
    small = b"s"
    for i, data in enumerate((huge, small, small)):
        consumer._take(Msg(None, "_INBOX.test", f"$JS.ACK.y.{i}", data))  # type: ignore[arg-type]
    assert [m.data for m in await consumer.next_batch(10, wait_s=0.01)] == [huge]
    assert [m.data for m in await consumer.next_batch(10, wait_s=0.01)] == [small, small]


async def test_pull_consumer_lingers_for_company() -> None:
    nc = FakeNats()
    consumer = PullConsumer(nc, "INGRESS", "workers", window=10, expires_s=1.0)  # type: ignore[arg-type]
    await consumer.start()
    consumer._take(Msg(None, "_INBOX.test", "$JS.ACK.x.0", b"m"))  # type: ignore[arg-type]

    async def later() -> None:
        await asyncio.sleep(0.005)
        for i in (1, 2):
            consumer._take(Msg(None, "_INBOX.test", f"$JS.ACK.x.{i}", b"m"))  # type: ignore[arg-type]

    company = asyncio.create_task(later())
    # Up to 1 s for fewer than 3: the two that come after 5 ms join the first.
    assert len(await consumer.next_batch(8, wait_s=1, linger_s=1.0, linger_below=3)) == 3
    await company
    consumer._take(Msg(None, "_INBOX.test", "$JS.ACK.x.3", b"m"))  # type: ignore[arg-type]
    started = time.monotonic()
    assert len(await consumer.next_batch(8, wait_s=1, linger_s=0.02, linger_below=3)) == 1
    assert 0.01 < time.monotonic() - started < 0.5  # alone after the linger


# -- the pipeline: retries, then the dead-letter stream ---------------------------


class AckRecorder:
    """Stands in for the nats client behind a message's ack/nak."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes = b"", **_: Any) -> None:
        self.sent.append((subject, payload))


class FlakyIO(FakeIO):
    """Every publish except a dead letter times out."""

    async def publish_all(self, requests: Sequence[Publish]) -> list[PublishResult]:
        return [
            Ack("DEADLETTER", 1)
            if req.subject.startswith("deadletter.")
            else BrokerError("no PubAck in time")
            for req in requests
        ]


@pytest.mark.parametrize(("attempt", "parked"), [(1, False), (5, True)])
async def test_internal_failures_retry_then_dead_letter(
    parties: tuple[Signer, Checker], tmp_path: Path, attempt: int, parked: bool
) -> None:
    from policy_worker.bus_ops import SubscriptionWriter
    from policy_worker.pipeline import Pipeline
    from policy_worker.route_tag import RouteSigner

    alice, checker = parties
    io = FlakyIO()
    registry = CollectorRegistry()
    config = WorkerConfig(name="w", state_dir=tmp_path, nats_url="nats://x", creds=tmp_path)
    pipeline = Pipeline(
        config=config,
        checker=checker,
        io=io,  # type: ignore[arg-type]
        nonces=NonceStore(io),  # type: ignore[arg-type]
        rates=RateStore(io),  # type: ignore[arg-type]
        subscriptions=SubscriptionWriter(io),  # type: ignore[arg-type]
        signer=RouteSigner(_signer()),
        metrics=WorkerMetrics(registry),
    )
    env = sign(build(sender="docker.alice", to="docker.bob", type="data", level="public"), alice)
    client = AckRecorder()
    stored_ms = time.time_ns() // 1_000_000
    reply = f"$JS.ACK.INGRESS.workers.{attempt}.9.9.{stored_ms * 1_000_000}.0"
    msg = Msg(client, "tier.docker.agent.alice.out", reply, env.payload, to_headers(env))  # type: ignore[arg-type]
    outcome = await pipeline.process([msg])
    [(subject, body)] = client.sent
    assert subject == reply
    if parked:
        assert (outcome.deadlettered, outcome.acked) == (1, 0) and body == b""  # an ack
        assert 'symbi_deadletter_total{src_tier="docker"} 1.0' in generate_latest(registry).decode()
    else:
        assert outcome.retried == 1 and body.startswith(b"-NAK")
        assert json.loads(body.split(b" ", 1)[1]) == {"delay": 250_000_000}
