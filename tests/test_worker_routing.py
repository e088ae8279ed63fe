"""Policy workers against a real ``symbi up --workers 2``: routing, denials, audit, metrics.

Agents here are plain nats.py connections that build and sign their envelopes
with :mod:`agent_sdk.envelope` (no client SDK), so what is tested is the wire
contract as any other client would speak it. Every denial is looked up in the
AUDIT stream by the ingress sequence of the message that caused it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from agent_sdk.envelope import build, parse, sign, to_headers, verify
from agent_sdk.route import verify_route
from agent_sdk.sealing import open_sealed, seal
from agent_sdk.signing import Signer
from broker_gateway.gateway import Gateway
from broker_gateway.keys import new_seed
from broker_gateway.state import StateDir
from tests.helpers import AuditLog, Sender, SymbiUp, bus_with_policies, register_sender

POLICIES = """
communication_policies:
  - name: docker_to_docker
    source_tier: docker
    destination_tier: docker
    allowed_message_types: [control, data, event, rpc]
    rate_limits: {messages_per_second: 10000, burst_size: 10000}
    max_payload_bytes: 65536
  - name: docker_to_gvisor
    source_tier: docker
    destination_tier: gvisor
    allowed_message_types: [data, event, rpc]
    security_requirements: {encryption_min_level: confidential}
  - name: docker_to_host
    source_tier: docker
    destination_tier: host
    allowed_message_types: [control, data, event, rpc]
  - name: gvisor_to_host
    source_tier: gvisor
    destination_tier: host
    allowed_message_types: [data]
  - name: gvisor_to_gvisor
    source_tier: gvisor
    destination_tier: gvisor
    allowed_message_types: [data]
    security_requirements: {content_filtering: true}
    content_filter:
      rules: [{name: secret_word, pattern: FORBIDDEN}]
  - name: gvisor_to_docker
    source_tier: gvisor
    destination_tier: docker
    allowed_message_types: [data, event]
    security_requirements: {audit_logging: false}
  - name: firecracker_to_docker
    source_tier: firecracker
    destination_tier: docker
    allowed_message_types: [data]
    rate_limits: {messages_per_second: 1, burst_size: 2}
"""


@dataclass
class World:
    up: SymbiUp
    router: Client
    audit: AuditLog
    gateway: Gateway
    agents: dict[str, Sender]

    def __getitem__(self, address: str) -> Sender:
        return self.agents[address]

    async def decided(self, seq: int, count: int = 1) -> list[dict[str, Any]]:
        """The audit records of the ingress message ``seq``."""
        return await self.audit.wait(count, ingress_seq=seq)

    async def settled(self, seq: int, timeout: float = 20.0) -> None:
        """Wait until a worker acknowledged ingress message ``seq`` (work-queue: it is gone)."""
        deadline = time.monotonic() + timeout
        js = self.router.jetstream()
        while time.monotonic() < deadline:
            try:
                await js.get_msg("INGRESS", seq)
            except NotFoundError:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"ingress message {seq} was never acknowledged")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbiUp]:
    yield from bus_with_policies(tmp_path_factory.mktemp("routing"), POLICIES, workers=2)


@pytest.fixture(scope="module")
async def world(up: SymbiUp) -> AsyncIterator[World]:
    state = StateDir.open(up.state_dir, create=False)
    gateway = await Gateway.connect(state, up.url)
    router = await up.connect_router()
    audit = await AuditLog().start(router)
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("docker", "alice", {"clearance": "confidential"}),
        ("docker", "bob", {"clearance": "restricted"}),
        ("docker", "carol", {}),
        ("docker", "dora", {"capabilities": ("rpc",)}),
        ("gvisor", "gina", {"clearance": "confidential"}),
        ("gvisor", "gus", {}),
        ("firecracker", "fred", {}),
        ("firecracker", "fay", {}),
    ]
    agents = {}
    for tier, agent_id, kwargs in specs:
        sender = await register_sender(gateway, tier, agent_id, **kwargs)
        agents[sender.address] = sender
    yield World(up, router, audit, gateway, agents)
    await audit.stop()
    for agent in agents.values():
        await agent.nc.close()
    await router.close()
    await gateway.close()


# -- the allowed path ---------------------------------------------------------


async def test_delivery_is_byte_for_byte_and_verifiable(world: World) -> None:
    alice, bob = world["docker.alice"], world["docker.bob"]
    payload = bytes(range(256)) * 3  # not UTF-8, with every byte value
    env = alice.envelope("docker.bob", payload, type="data", level="restricted")
    sent = to_headers(env)
    seq = await alice.send(env, sent)

    msg = await bob.receive(env.id)
    assert msg.data == payload
    for name, value in sent.items():
        if name.startswith("Symbi-"):
            assert msg.headers[name] == value, name
    assert msg.headers["Nats-Msg-Id"] == f"docker.alice:{env.id}:docker.bob"
    assert msg.headers["Symbi-Sender-Key"] == alice.info["public_key"]
    assert msg.headers["Symbi-Worker"].startswith("worker-")
    # The recipient verifies both the envelope and the router's route tag.
    delivered = parse(msg.headers, msg.data)
    verify(delivered, msg.headers["Symbi-Sender-Key"])
    assert verify_route(
        msg.headers["Symbi-Route"],
        router_public_key=bob.info["router_public_key"],
        msg_id=env.id,
        sender="docker.alice",
        recipient="docker.bob",
        sender_key=msg.headers["Symbi-Sender-Key"],
    )
    # A tag for another recipient does not verify.
    assert not verify_route(
        msg.headers["Symbi-Route"],
        router_public_key=bob.info["router_public_key"],
        msg_id=env.id,
        sender="docker.alice",
        recipient="docker.carol",
        sender_key=msg.headers["Symbi-Sender-Key"],
    )

    [record] = await world.decided(seq)
    assert world.audit.subjects[world.audit.records.index(record)] == "audit.allow.docker.docker"
    assert record["decision"] == "allow" and record["reason"] == "ok"
    assert record["policy"] == "docker_to_docker" and record["recipient"] == "docker.bob"
    assert record["id"] == env.id and record["from"] == "docker.alice"
    assert record["to"] == "docker.bob" and record["type"] == "data"
    assert record["level"] == "restricted" and record["sent_time"] == env.time_ms
    assert record["size"] == len(payload) and record["worker"].startswith("worker-")
    import hashlib

    assert record["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert isinstance(record["time"], int)


async def test_sealed_payload_crosses_tiers_to_its_recipient(world: World) -> None:
    alice, gina = world["docker.alice"], world["gvisor.gina"]
    sealed = seal(b"for gina only", gina.info["encryption_public_key"])
    env = alice.envelope(
        "gvisor.gina", sealed, type="data", level="confidential", enc="x25519-sealed"
    )
    seq = await alice.send(env)
    msg = await gina.receive(env.id)
    verify(parse(msg.headers, msg.data), alice.info["public_key"])
    assert open_sealed(msg.data, gina.info["encryption_secret_key"]) == b"for gina only"
    [record] = await world.decided(seq)
    assert record["reason"] == "ok" and record["policy"] == "docker_to_gvisor"


async def test_sender_cannot_forge_worker_headers(world: World) -> None:
    alice, bob = world["docker.alice"], world["docker.bob"]
    env = alice.envelope("docker.bob", b"x")
    headers = to_headers(env)
    headers.update({"Symbi-Route": "forged", "symbi-sender-key": "UFORGED", "Nats-Foo": "bar"})
    headers["X-App"] = "kept"
    await alice.send(env, headers)
    msg = await bob.receive(env.id)
    assert msg.headers["Symbi-Route"] != "forged"
    assert "symbi-sender-key" not in msg.headers and "Nats-Foo" not in msg.headers
    assert msg.headers["X-App"] == "kept"
    assert msg.headers["Symbi-Sender-Key"] == alice.info["public_key"]


async def test_host_service_delivery_goes_to_the_host_stream(world: World) -> None:
    alice = world["docker.alice"]
    env = alice.envelope("host.launcher", b'{"start": "x"}', type="control")
    registry = await world.gateway.registry()
    record = await registry.get("docker.alice")
    assert "control" not in record.capabilities  # control needs the capability...
    denied = await alice.send(env)
    [denial] = await world.decided(denied)
    assert denial["reason"] == "capability"
    ok_env = alice.envelope("host.launcher", b'{"ping": 1}', type="data")
    seq = await alice.send(ok_env)
    [allowed] = await world.decided(seq)
    assert allowed["reason"] == "ok" and allowed["recipient"] == "host.launcher"
    assert world.audit.subjects[world.audit.records.index(allowed)] == "audit.allow.docker.host"
    stored = await world.router.jetstream().get_last_msg("HOST", "host.launcher.in")
    assert stored.data == b'{"ping": 1}' and stored.headers is not None
    assert verify_route(
        stored.headers["Symbi-Route"],
        router_public_key=alice.info["router_public_key"],
        msg_id=ok_env.id,
        sender="docker.alice",
        recipient="host.launcher",
        sender_key=alice.info["public_key"],
    )


# -- every reason code of the contract -----------------------------------------


async def _revoked_sender(world: World) -> int:
    """carol is revoked in the registry only, so her connection still works."""
    registry = await world.gateway.registry()
    record = await registry.get("docker.carol")
    await registry.update(record.model_copy(update={"status": "revoked"}))
    await asyncio.sleep(0.5)  # the workers' registry caches follow a KV watch
    carol = world["docker.carol"]
    return await carol.send(carol.envelope("docker.bob", b"after revocation"))


async def _unregistered_sender(world: World) -> int:
    """Only the router can publish on a ghost outbox; the worker must still deny it."""
    ghost = Signer.from_seed(new_seed("user"))
    env = sign(build(sender="docker.ghost", to="docker.bob", type="data", level="public"), ghost)
    ack = await world.router.jetstream().publish(
        "tier.docker.agent.ghost.out", b"", headers=to_headers(env)
    )
    return int(ack.seq)


def _from(address: str, to: str, payload: bytes = b"x", **fields: Any) -> Case:
    async def send(world: World) -> int:
        sender = world[address]
        return await sender.send(sender.envelope(to, payload, **fields))

    return send


def _alice(mangle: Callable[[dict[str, str]], None], **fields: Any) -> Case:
    async def send(world: World) -> int:
        alice = world["docker.alice"]
        env = alice.envelope("docker.bob", b"x", **fields)
        headers = to_headers(env)
        mangle(headers)
        return await alice.send(env, headers)

    return send


def _foreign_signature() -> Case:
    async def send(world: World) -> int:
        stranger = Signer.from_seed(new_seed("user"))
        env = sign(
            build(sender="docker.alice", to="docker.bob", type="data", level="public"), stranger
        )
        return await world["docker.alice"].send(env)

    return send


def _spoofed_from() -> Case:
    async def send(world: World) -> int:
        alice = world["docker.alice"]
        # Signed with alice's own key, claiming to be bob, sent on alice's outbox.
        env = sign(
            build(sender="docker.bob", to="docker.dora", type="data", level="public"), alice.signer
        )
        return await alice.send(env)

    return send


def _stale() -> Case:
    return _from("docker.alice", "docker.bob", time_ms=time.time_ns() // 1_000_000 - 600_000)


Case = Callable[[World], Awaitable[int]]
REASON_CASES: list[tuple[str, Case]] = [
    ("malformed", _alice(lambda h: h.update({"Symbi-Time": "soon"}))),
    ("unsigned", _alice(lambda h: h.pop("Symbi-Sig"))),
    ("bad_signature", _foreign_signature()),
    ("from_mismatch", _spoofed_from()),
    ("unknown_sender", _unregistered_sender),
    ("unknown_sender", _revoked_sender),
    ("unknown_destination", _from("docker.alice", "docker.nobody")),
    ("unknown_destination", _from("docker.alice", "host.nowhere")),
    ("stale", _stale()),
    ("no_policy", _from("docker.alice", "firecracker.fay")),
    ("type_not_allowed", _from("docker.alice", "gvisor.gina", type="control")),
    ("clearance", _from("docker.alice", "docker.bob", level="confidential")),
    ("capability", _from("docker.alice", "docker.bob", type="rpc")),
    ("encryption_required", _from("docker.alice", "gvisor.gina", level="confidential")),
    ("content_filtered", _from("gvisor.gus", "gvisor.gina", b"a FORBIDDEN word")),
    ("malformed", _from("docker.alice", "docker.bob", b"x" * (1024 * 1024))),
]


@pytest.mark.parametrize(
    ("reason", "case"),
    REASON_CASES,
    ids=[f"{reason}-{i}" for i, (reason, _) in enumerate(REASON_CASES)],
)
async def test_denial_is_audited_with_its_reason(world: World, reason: str, case: Case) -> None:
    seq = await case(world)
    [record] = await world.decided(seq)
    assert record["decision"] == "deny"
    assert record["reason"] == reason, record
    assert record["outbox"] is not None
    assert "payload" not in record


async def test_replay_with_a_new_msg_id_is_denied(world: World) -> None:
    alice, bob = world["docker.alice"], world["docker.bob"]
    env = alice.envelope("docker.bob", b"once")
    first = await alice.send(env)
    await bob.receive(env.id)
    headers = to_headers(env)
    headers["Nats-Msg-Id"] = "a-fresh-id"  # gets past the ingress stream's deduplication
    again = await alice.send(env, headers)
    assert again != first
    [record] = await world.decided(again)
    assert record["reason"] == "replay" and record["id"] == env.id
    [original] = await world.decided(first)
    assert original["reason"] == "ok"


async def test_rate_limit_denies_past_the_burst(world: World) -> None:
    fred = world["firecracker.fred"]
    seqs = [await fred.send(fred.envelope("docker.bob", b"%d" % i)) for i in range(6)]
    records = [(await world.decided(seq))[0] for seq in seqs]
    reasons = [r["reason"] for r in records]
    assert reasons.count("ok") >= 2 and reasons.count("rate_limited") >= 1, reasons
    assert set(reasons) <= {"ok", "rate_limited"}


async def test_same_publish_twice_is_delivered_once(world: World) -> None:
    alice, bob = world["docker.alice"], world["docker.bob"]
    env = alice.envelope("docker.bob", b"retried publish")
    first = await alice.send(env)
    second = await alice.send(env)  # the same Nats-Msg-Id: the ingress stream keeps one
    assert first == second
    await bob.receive(env.id)
    marker = alice.envelope("docker.bob", b"marker")
    await alice.send(marker)
    msg = await bob.receive(marker.id)  # would have returned the duplicate first
    assert msg.headers["Symbi-Id"] == marker.id
    assert len(world.audit.find(id=env.id)) == 1


async def test_audit_logging_false_spares_only_allowed_messages(world: World) -> None:
    gus, bob = world["gvisor.gus"], world["docker.bob"]
    env = gus.envelope("docker.bob", b"quiet")
    seq = await gus.send(env)
    await bob.receive(env.id)
    await world.settled(seq)  # acknowledged only after every record got its PubAck
    assert world.audit.find(ingress_seq=seq) == []
    denied = await gus.send(gus.envelope("docker.bob", b"loud", type="rpc"))
    [record] = await world.decided(denied)
    assert record["reason"] == "type_not_allowed" and record["policy"] == "gvisor_to_docker"


# -- events and run-time subscriptions -------------------------------------------


async def _bus_op(world: World, sender: Sender, op: str, topics: list[str]) -> None:
    seq = await sender.send(
        sender.envelope("host.bus", json.dumps({"op": op, "topics": topics}).encode())
    )
    [record] = await world.decided(seq)
    assert record["reason"] == "ok", record
    assert record["detail"] and record["detail"].startswith("bus: "), record
    registry = await world.gateway.registry()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        subs = (await registry.get(sender.address)).subscriptions
        if (set(topics) <= set(subs)) == (op == "subscribe"):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the workers' registry caches follow a KV watch


async def test_event_reaches_every_subscriber_but_the_sender(world: World) -> None:
    alice, bob, gina = world["docker.alice"], world["docker.bob"], world["gvisor.gina"]
    await _bus_op(world, bob, "subscribe", ["metrics.>"])
    await _bus_op(world, gina, "subscribe", ["metrics.*"])
    await _bus_op(world, alice, "subscribe", ["metrics.cpu"])  # the sender: skipped

    env = alice.envelope("event.metrics.cpu", b'{"load": 0.5}', type="event")
    seq = await alice.send(env)
    records = await world.decided(seq, count=2)
    assert sorted(r["recipient"] for r in records) == ["docker.bob", "gvisor.gina"]
    assert all(r["reason"] == "ok" for r in records)
    subjects = {world.audit.subjects[world.audit.records.index(r)] for r in records}
    assert subjects == {"audit.allow.docker.docker", "audit.allow.docker.gvisor"}
    for recipient in (bob, gina):
        msg = await recipient.receive(env.id)
        assert verify_route(
            msg.headers["Symbi-Route"],
            router_public_key=recipient.info["router_public_key"],
            msg_id=env.id,
            sender="docker.alice",
            recipient=recipient.address,
            sender_key=alice.info["public_key"],
        )

    # Deeper than "metrics.*": only bob's "metrics.>" matches.
    deep = alice.envelope("event.metrics.cpu.core0", b"{}", type="event")
    [only_bob] = await world.decided(await alice.send(deep))
    assert only_bob["recipient"] == "docker.bob"

    await _bus_op(world, bob, "unsubscribe", ["metrics.>"])
    await _bus_op(world, gina, "unsubscribe", ["metrics.*"])
    nobody = alice.envelope("event.metrics.cpu", b"{}", type="event")
    [record] = await world.decided(await alice.send(nobody))
    assert record["reason"] == "unknown_destination" and record["recipient"] is None


async def test_invalid_bus_op_is_delivered_but_not_applied(world: World) -> None:
    bob = world["docker.bob"]
    env = bob.envelope("host.bus", b'{"op": "subscribe", "topics": ["a.>.b"]}')
    [record] = await world.decided(await bob.send(env))
    assert record["reason"] == "ok"
    assert "not applied" in record["detail"]
    registry = await world.gateway.registry()
    assert "a.>.b" not in (await registry.get("docker.bob")).subscriptions


# -- metrics -------------------------------------------------------------------


async def test_metrics_endpoint_shows_the_workers_counters(world: World) -> None:
    alice, bob = world["docker.alice"], world["docker.bob"]
    env = alice.envelope("docker.bob", b"counted")
    seq = await alice.send(env)
    await bob.receive(env.id)
    await world.settled(seq)
    url = f"http://127.0.0.1:{world.up.http_port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    deadline = time.monotonic() + 20
    allowed = 0.0
    text = ""
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(scrape)
        allowed = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("symbi_messages_total{")
            and 'decision="allow"' in line
            and 'src_tier="docker"' in line
        )
        if allowed >= 5:
            break
        await asyncio.sleep(0.2)
    assert allowed >= 5, text
    assert "symbi_messages_total{" in text and 'decision="deny"' in text
    assert "symbi_decision_seconds_bucket{" in text
    assert "symbi_end_to_end_seconds_count{" in text
    assert 'symbi_child_processes{kind="worker"} 2.0' in text


# -- garbage: denied malformed, and the workers keep serving --------------------


async def raw_hpub(url: str, creds: str, subject: str, header_lines: bytes, payload: bytes) -> None:
    """Publish over a bare socket: nats.py cannot put non-UTF-8 bytes in a header."""
    import base64
    from urllib.parse import urlparse

    import nkeys

    from broker_gateway import jwt

    where = urlparse(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    try:
        info = json.loads((await reader.readline()).split(b" ", 1)[1])
        token, seed = jwt.parse_creds(creds)
        signature = nkeys.from_seed(bytearray(seed)).sign(info["nonce"].encode())
        connect = {
            "verbose": False,
            "pedantic": False,
            "protocol": 1,
            "headers": True,
            "jwt": token,
            "sig": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
        }
        header = b"NATS/1.0\r\n" + header_lines + b"\r\n"
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        writer.write(
            f"HPUB {subject} {len(header)} {len(header) + len(payload)}\r\n".encode()
            + header
            + payload
            + b"\r\nPING\r\n"
        )
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line and not line.startswith(b"-ERR"), line
            if line.startswith(b"PONG"):
                return
    finally:
        writer.close()


def _mangled(mangle: Callable[[dict[str, str]], Any]) -> Callable[[Sender], Awaitable[None]]:
    async def send(alice: Sender) -> None:
        env = alice.envelope("docker.bob", b"junk")
        headers = to_headers(env)
        mangle(headers)
        await alice.nc.jetstream().publish(alice.outbox, b"junk", headers=headers or None)

    return send


def _raw(header_lines: bytes) -> Callable[[Sender], Awaitable[None]]:
    async def send(alice: Sender) -> None:
        assert alice.creds is not None
        creds = alice.creds.read_text()
        await raw_hpub(alice.info["nats_url"], creds, alice.outbox, header_lines, b"junk")

    return send


def _raw_envelope(extra: bytes) -> Callable[[Sender], Awaitable[None]]:
    """A valid signed envelope, sent raw with ``extra`` header lines."""

    async def send(alice: Sender) -> None:
        assert alice.creds is not None
        env = alice.envelope("docker.bob", b"junk")
        lines = b"".join(f"{k}: {v}\r\n".encode() for k, v in to_headers(env).items())
        await raw_hpub(
            alice.info["nats_url"], alice.creds.read_text(), alice.outbox, lines + extra, b"junk"
        )

    return send


async def _one_megabyte(alice: Sender) -> None:
    await alice.send(alice.envelope("docker.bob", b"m" * (1024 * 1024)))


GARBAGE: dict[str, Callable[[Sender], Awaitable[None]]] = {
    "no_headers": _mangled(lambda h: h.clear()),
    "missing_header": _mangled(lambda h: h.pop("Symbi-Nonce")),
    "non_numeric_time": _mangled(lambda h: h.update({"Symbi-Time": "12:00"})),
    "oversized_header": _mangled(lambda h: h.update({"X-Pad": "p" * 4000})),
    "too_many_headers": _mangled(lambda h: h.update({f"X-H{i}": "v" for i in range(70)})),
    # nats.py refuses to send such a name (so a worker could never forward it).
    "bad_header_name": _raw_envelope(b"Bad\x01Name: v\r\n"),
    "non_utf8_value": _raw(
        b"Symbi-Version: 1\r\nSymbi-Id: \xff\xfe\xfd\r\nSymbi-From: docker.alice\r\n"
        b"Symbi-To: docker.bob\r\nNats-Msg-Id: raw-1\r\n"
    ),
    "non_utf8_name": _raw(b"Symbi-\xffVersion: 1\r\nNats-Msg-Id: raw-2\r\n"),
    "one_megabyte_payload": _one_megabyte,
}


@pytest.mark.parametrize("kind", list(GARBAGE))
async def test_garbage_is_malformed_and_the_workers_keep_serving(world: World, kind: str) -> None:
    alice, bob = world["docker.alice"], world["docker.bob"]
    js = world.router.jetstream()
    before = (await js.stream_info("INGRESS")).state.last_seq
    await GARBAGE[kind](alice)
    deadline = time.monotonic() + 20
    junk: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not junk:
        junk = [
            r
            for r in world.audit.find(outbox="docker.alice", reason="malformed")
            if r["ingress_seq"] > before
        ]
        await asyncio.sleep(0.02)
    assert len(junk) == 1, junk
    [record] = junk
    assert record["decision"] == "deny"
    if kind == "one_megabyte_payload":  # well formed, but over its policy's cap
        assert record["recipient"] == "docker.bob" and record["size"] == 1024 * 1024
        assert record["policy"] == "docker_to_docker"
    else:  # denied before it had recipients: one record, recipient null
        assert record["recipient"] is None and record["size"] == 4
        assert record["policy"] is None and record["detail"]
    if kind == "no_headers":  # nothing readable: null, never guessed
        for field in ("id", "from", "to", "type", "level", "sent_time"):
            assert record[field] is None, field
    good = alice.envelope("docker.bob", b"still there?")
    await alice.send(good)
    assert (await bob.receive(good.id)).data == b"still there?"
