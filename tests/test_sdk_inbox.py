"""The client's inbox against a real ``symbi up`` without workers: the test is the router.

Deliveries are published into the durable inbox by the router's service user,
exactly as a policy worker would (sender's signed headers and payload, plus
``Symbi-Sender-Key``, ``Symbi-Route`` and ``Symbi-Worker``), or forged in one
way each. The client must hand over only the valid ones, drop and report the
rest, acknowledge junk so it cannot wedge the inbox, and acknowledge real
messages only once the user's code has handled them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from agent_sdk.client import AgentClient
from agent_sdk.credentials import AgentConfig, read_credentials
from agent_sdk.envelope import Envelope, build, parse, sign, to_headers, verify
from agent_sdk.errors import BrokerError, ConfigError, ContractError, RequestTimeoutError
from agent_sdk.inbox import Message, SecurityEvent
from agent_sdk.names import MessageType
from agent_sdk.options import ClientOptions
from agent_sdk.route import sign_route
from agent_sdk.sealing import EncryptionKeyPair, open_sealed, seal
from agent_sdk.signing import Signer
from broker_gateway.gateway import Gateway
from broker_gateway.keys import new_seed, route_signer_seed, write_secret
from broker_gateway.state import StateDir
from tests.helpers import SymbiUp, close_all, connect_agent, free_port

OPTIONS = dataclasses.replace(
    ClientOptions(), fetch_timeout_s=0.25, request_timeout_s=5.0, nak_delay_max_s=0.2
)


@dataclasses.dataclass
class FakeRouter:
    """Publishes deliveries into agents' durable inboxes as a policy worker does."""

    nc: Client
    route_signer: Signer
    signers: dict[str, Signer]  # address -> that agent's own signer (from its creds)

    def envelope(
        self,
        sender: str,
        to: str,
        payload: bytes = b"hello",
        type: MessageType = "data",
        **fields: Any,
    ) -> Envelope:
        env = build(sender=sender, to=to, type=type, level="restricted", payload=payload, **fields)
        return sign(env, self.signers[sender])

    def headers(
        self,
        env: Envelope,
        recipient: str,
        *,
        sender_key: str | None = None,
        route_signer: Signer | None = None,
        route_recipient: str | None = None,
    ) -> dict[str, str]:
        key = sender_key or self.signers[env.sender].public_key
        headers = to_headers(env)
        headers["Nats-Msg-Id"] = f"{env.sender}:{env.id}:{recipient}"
        headers["Symbi-Sender-Key"] = key
        headers["Symbi-Route"] = sign_route(
            route_signer or self.route_signer,
            msg_id=env.id,
            sender=env.sender,
            recipient=route_recipient or recipient,
            sender_key=key,
        )
        headers["Symbi-Worker"] = "test-router"
        return headers

    async def store(self, recipient: str, payload: bytes, headers: dict[str, str] | None) -> None:
        tier, _, agent_id = recipient.partition(".")
        await self.nc.jetstream().publish(
            f"tier.{tier}.agent.{agent_id}.in", payload, headers=headers
        )

    async def deliver(self, env: Envelope, recipient: str, **forge: Any) -> None:
        await self.store(recipient, env.payload, self.headers(env, recipient, **forge))


@pytest.fixture(scope="module")
async def gateway(bus: SymbiUp) -> AsyncIterator[Gateway]:
    gw = await Gateway.connect(StateDir.open(bus.state_dir, create=False), bus.url)
    yield gw
    await gw.close()


@pytest.fixture(scope="module")
async def router(bus: SymbiUp) -> AsyncIterator[FakeRouter]:
    state = StateDir.open(bus.state_dir, create=False)
    nc = await bus.connect_router()
    yield FakeRouter(nc, Signer.from_seed(route_signer_seed(state.keys)), {})
    await nc.close()


AgentFactory = Callable[..., Awaitable[Path]]


@pytest.fixture(scope="module")
def make_agent(
    gateway: Gateway, router: FakeRouter, tmp_path_factory: pytest.TempPathFactory
) -> AgentFactory:
    """Register an agent in-process (fast) and write its files as the CLI does."""

    async def make(address: str, *capabilities: str) -> Path:
        tier, _, agent_id = address.partition(".")
        creds = await gateway.register_agent(tier, agent_id, capabilities=capabilities)
        out = tmp_path_factory.mktemp(address)
        write_secret(out / "agent.creds", creds.creds)
        write_secret(out / "agent.json", json.dumps(creds.info))
        router.signers[address] = read_credentials(out / "agent.creds").signer
        return out

    return make


class Events:
    """Collects security events (an async ``on_security_event`` callback)."""

    def __init__(self) -> None:
        self.seen: list[SecurityEvent] = []
        self._changed = asyncio.Condition()

    async def __call__(self, event: SecurityEvent) -> None:
        async with self._changed:
            self.seen.append(event)
            self._changed.notify_all()

    async def wait(self, count: int, timeout: float = 5.0) -> list[str]:
        """The reasons of all events so far, once there are at least ``count``."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.seen) >= count)
        return [e.reason for e in self.seen]


async def _connect(directory: Path, events: Events | None = None) -> AgentClient:
    return await AgentClient.connect(directory, options=OPTIONS, on_security_event=events)


async def _next(client: AgentClient, timeout: float = 5.0) -> Message:
    """The next message, handed back unacknowledged (the loop is left early)."""
    async with asyncio.timeout(timeout):
        async for msg in client.messages():
            return msg
    raise AssertionError("the inbox closed")


async def _take(client: AgentClient, count: int, timeout: float = 5.0) -> list[Message]:
    """The next ``count`` messages, each acknowledged as handled."""
    got: list[Message] = []
    async with asyncio.timeout(timeout), client.messages() as stream:
        async for msg in stream:
            got.append(msg)
            if len(got) == count:
                break
    return got


async def _consumer_state(router: FakeRouter, config: AgentConfig) -> tuple[int, int]:
    """(messages not yet delivered, delivered but unacknowledged) of the agent's consumer."""
    info = await router.nc.jetstream().consumer_info(config.inbox_stream, config.inbox_consumer)
    return info.num_pending, info.num_ack_pending


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll server-side state (nothing to wait on locally) until ``check`` holds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _state_is(router: FakeRouter, config: AgentConfig, state: tuple[int, int]) -> bool:
    return await _consumer_state(router, config) == state


async def test_valid_delivery_is_handed_over_with_its_envelope(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    await make_agent("docker.s1")
    b_dir = await make_agent("docker.r1")
    env = router.envelope("docker.s1", "docker.r1", b'{"n": 1}')
    await router.deliver(env, "docker.r1")
    async with await _connect(b_dir) as client:
        [msg] = await _take(client, 1)
        assert (msg.id, msg.sender, msg.to, msg.type) == (env.id, "docker.s1", "docker.r1", "data")
        assert msg.payload == b'{"n": 1}' and msg.level == "restricted" and not msg.encrypted
        assert msg.sender_key == router.signers["docker.s1"].public_key
        assert msg.worker == "test-router" and msg.topic is None
        assert b'"n"' not in repr(msg).encode()


async def test_sealed_and_event_deliveries_are_opened_and_accepted(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    await make_agent("gvisor.s2")
    r_dir = await make_agent("docker.r2")
    me = AgentConfig.load(r_dir)
    sealed = router.envelope(
        "gvisor.s2", "docker.r2", seal(b"secret", me.encryption_public_key), enc="x25519-sealed"
    )
    event = router.envelope("gvisor.s2", "event.metrics.cpu", b"42", type="event")
    await router.deliver(sealed, "docker.r2")
    await router.deliver(event, "docker.r2")
    async with await _connect(r_dir) as client:
        first, second = await _take(client, 2)
    assert (first.payload, first.encrypted, first.envelope.payload) == (
        b"secret",
        True,
        sealed.payload,
    )
    assert (second.type, second.topic, second.payload) == ("event", "metrics.cpu", b"42")


async def test_forged_and_misrouted_deliveries_are_dropped_and_reported(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    await make_agent("docker.s3")
    await make_agent("docker.x3")
    r_dir = await make_agent("docker.r3")
    config = AgentConfig.load(r_dir)
    stranger = Signer.from_seed(new_seed("user"))
    s3_key = router.signers["docker.s3"].public_key

    def env(**fields: Any) -> Envelope:
        return router.envelope("docker.s3", fields.pop("to", "docker.r3"), **fields)

    unsigned = env()
    unsigned_headers = router.headers(unsigned, "docker.r3")
    del unsigned_headers["Symbi-Sig"]
    tampered = env()
    forged_key_env = sign(
        build(sender="docker.s3", to="docker.r3", type="data", level="restricted", payload=b"x"),
        stranger,
    )
    sealed_elsewhere = env(
        payload=seal(b"x", EncryptionKeyPair.generate().public_key), enc="x25519-sealed"
    )
    unrouted = env()
    cases: list[tuple[str, bytes, dict[str, str] | None]] = [
        ("malformed", b"no headers at all", None),
        ("malformed", b"x", {"Symbi-Version": "2"}),
        ("unsigned", unsigned.payload, unsigned_headers),
        ("unrouted", unrouted.payload, to_headers(unrouted)),
        # Routed to another agent, stored here: the tag names the other recipient.
        ("bad_route", b"hello", router.headers(env(), "docker.r3", route_recipient="docker.x3")),
        # A tag signed by someone other than the router.
        ("bad_route", b"hello", router.headers(env(), "docker.r3", route_signer=stranger)),
        # Addressed to another agent in the envelope itself.
        ("misaddressed", b"hello", router.headers(env(to="docker.x3"), "docker.r3")),
        # Signed by a stranger, while the router vouched for s3's registered key.
        ("bad_signature", b"x", router.headers(forged_key_env, "docker.r3", sender_key=s3_key)),
        # The payload changed after signing.
        ("bad_signature", b"HELLO", router.headers(tampered, "docker.r3")),
        ("undecryptable", sealed_elsewhere.payload, router.headers(sealed_elsewhere, "docker.r3")),
    ]
    for _, payload, headers in cases:
        await router.store("docker.r3", payload, headers)
    good = env(payload=b"the real one")
    await router.deliver(good, "docker.r3")

    events = Events()
    async with await _connect(r_dir, events) as client:
        [msg] = await _take(client, 1)
        assert msg.id == good.id and msg.payload == b"the real one"
        reasons = await events.wait(len(cases))
        assert sorted(reasons) == sorted(c[0] for c in cases)
        assert all(e.subject == config.inbox for e in events.seen)
        assert {e.msg_id for e in events.seen if e.reason == "bad_signature"} == {
            forged_key_env.id,
            tampered.id,
        }
        stats = client.stats
        assert stats.received == 1 and stats.security_events == len(cases)
        assert stats.security_by_reason["bad_route"] == 2
        # Junk is acknowledged at once, the real message once handled: nothing is left.
        await _eventually(lambda: _state_is(router, config, (0, 0)))


async def test_a_redelivered_copy_of_a_handled_message_is_dropped(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    await make_agent("docker.s5")
    r_dir = await make_agent("docker.r5")
    config = AgentConfig.load(r_dir)
    env = router.envelope("docker.s5", "docker.r5")
    later = router.envelope("docker.s5", "docker.r5", b"later")
    await router.deliver(env, "docker.r5")
    copy = router.headers(env, "docker.r5")
    copy["Nats-Msg-Id"] = "stored-again"  # a second stored copy, e.g. a worker's retry
    await router.store("docker.r5", env.payload, copy)
    await router.deliver(later, "docker.r5")
    async with await _connect(r_dir) as client:
        assert [m.id for m in await _take(client, 2)] == [env.id, later.id]
        assert client.stats.duplicates == 1
        await _eventually(lambda: _state_is(router, config, (0, 0)))


async def test_acknowledged_only_after_the_loop_body_ran(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    await make_agent("docker.s6")
    r_dir = await make_agent("docker.r6")
    config = AgentConfig.load(r_dir)
    first, second = (router.envelope("docker.s6", "docker.r6", p) for p in (b"1", b"2"))
    await router.deliver(first, "docker.r6")
    await router.deliver(second, "docker.r6")
    options = dataclasses.replace(OPTIONS, prefetch=1)
    async with await AgentClient.connect(r_dir, options=options) as client:
        stream = client.messages()
        assert (await anext(stream)).id == first.id
        await _eventually(lambda: _state_is(router, config, (1, 1)))  # held, not acknowledged
        assert (await anext(stream)).id == second.id  # asking for the next acknowledges
        await _eventually(lambda: _state_is(router, config, (0, 1)))

        with pytest.raises(RuntimeError):  # the body fails: handed back for redelivery
            async with stream:
                raise RuntimeError("handler bug")
        assert (await _next(client)).id == second.id  # left early: handed back again
        [again] = await _take(client, 1)
        assert again.id == second.id
        await _eventually(lambda: _state_is(router, config, (0, 0)))
        assert client.stats.received == 4 and client.stats.duplicates == 0


async def test_handle_acknowledges_successes_and_gives_up_on_a_poison_message(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    await make_agent("docker.s7")
    r_dir = await make_agent("docker.r7")
    config = AgentConfig.load(r_dir)
    flaky, poison, fine = (
        router.envelope("docker.s7", "docker.r7", p) for p in (b"f", b"p", b"ok")
    )
    for env in (flaky, poison, fine):
        await router.deliver(env, "docker.r7")
    calls: list[bytes] = []

    async def handler(msg: Message) -> None:
        calls.append(msg.payload)
        if msg.payload == b"p" or (msg.payload == b"f" and calls.count(b"f") == 1):
            raise ValueError("cannot handle this")

    options = dataclasses.replace(OPTIONS, max_deliveries=2)
    client = await AgentClient.connect(r_dir, options=options)
    task = asyncio.create_task(client.handle(handler, concurrency=2))
    try:
        await _eventually(lambda: _state_is(router, config, (0, 0)))
        assert sorted(calls) == [b"f", b"f", b"ok", b"p", b"p"]
        assert client.stats.handler_failures == 3 and client.stats.acked == 2
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)  # handle() returns once the client is closed


async def _outbox_request(router: FakeRouter, sender: str) -> Envelope:
    """The last message ``sender`` published to its outbox (no workers consume it here)."""
    tier, _, agent_id = sender.partition(".")
    js = router.nc.jetstream()
    async with asyncio.timeout(5):
        while True:
            try:
                raw = await js.get_last_msg("INGRESS", f"tier.{tier}.agent.{agent_id}.out")
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.05)
                continue
            env = parse(raw.headers, raw.data or b"")
            verify(env, router.signers[sender].public_key)
            return env


async def test_request_takes_the_answer_of_the_asked_agent_only(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    q_dir = await make_agent("docker.q8", "rpc")
    await make_agent("gvisor.b8", "rpc")
    await make_agent("docker.x8", "rpc")
    events = Events()
    async with await _connect(q_dir, events) as client:
        pending = asyncio.create_task(
            client.request("gvisor.b8", b"2+2?", level="restricted", timeout=5)
        )
        request = await _outbox_request(router, "docker.q8")
        assert (request.type, request.to, request.reply_to) == ("rpc", "gvisor.b8", None)
        impostor = router.envelope("docker.x8", "docker.q8", b"5", type="rpc", reply_to=request.id)
        await router.deliver(impostor, "docker.q8")
        assert await events.wait(1) == ["unexpected_reply"]
        assert not pending.done()
        answer = router.envelope("gvisor.b8", "docker.q8", b"4", type="rpc", reply_to=request.id)
        await router.deliver(answer, "docker.q8")
        reply = await asyncio.wait_for(pending, 5)
        assert (reply.id, reply.payload, reply.reply_to, reply.is_reply) == (
            answer.id,
            b"4",
            request.id,
            True,
        )
        # The durable copies are acknowledged, never yielded, and reported only once.
        config = AgentConfig.load(q_dir)
        await _eventually(lambda: _state_is(router, config, (0, 0)))
        assert client.stats.replies == 1 and client.stats.received == 0
        assert [e.reason for e in events.seen] == ["unexpected_reply"]


async def test_request_times_out_and_a_late_answer_is_dropped(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    q_dir = await make_agent("docker.q9", "rpc")
    await make_agent("docker.b9", "rpc")
    async with await _connect(q_dir) as client:
        with pytest.raises(RequestTimeoutError, match=r"docker\.b9"):
            await client.request("docker.b9", b"?", level="restricted", timeout=0.3)
        request = await _outbox_request(router, "docker.q9")
        late = router.envelope("docker.b9", "docker.q9", b"late", type="rpc", reply_to=request.id)
        normal = router.envelope("docker.b9", "docker.q9", b"normal")
        await router.deliver(late, "docker.q9")
        await router.deliver(normal, "docker.q9")
        [msg] = await _take(client, 1)
        assert msg.id == normal.id
        assert client.stats.late_replies == 1 and client.stats.security_events == 0


async def test_junk_aimed_at_the_live_inbox_is_reported_not_handed_over(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    attacker_dir = await make_agent("docker.evil10")
    await make_agent("docker.s10")
    r_dir = await make_agent("docker.r10")
    config = AgentConfig.load(r_dir)
    events = Events()
    attacker = await connect_agent(attacker_dir)
    try:
        async with await _connect(r_dir, events) as client:
            # The attacker names r10's inbox as the reply subject of its own outbox
            # publish: the ingress stream's PubAck lands on r10's live inbox.
            await attacker.nc.publish(
                attacker.info["outbox"],
                b"x",
                reply=config.inbox,
                headers={"Nats-Msg-Id": "inject-r10"},
            )
            await attacker.nc.flush()
            assert await events.wait(1) == ["malformed"]
            assert events.seen[0].subject == config.inbox and events.seen[0].msg_id is None
            good = router.envelope("docker.s10", "docker.r10", b"real")
            await router.deliver(good, "docker.r10")
            assert [m.id for m in await _take(client, 1)] == [good.id]
    finally:
        await close_all(attacker)


async def test_send_publish_and_subscribe_sign_and_publish_to_the_outbox(
    make_agent: AgentFactory, router: FakeRouter
) -> None:
    a_dir = await make_agent("docker.a11")
    b_dir = await make_agent("gvisor.b11")
    b = AgentConfig.load(b_dir)
    async with await _connect(a_dir) as client:
        sent_id = await client.send("gvisor.b11", b"plain", level="public")
        sent = await _outbox_request(router, "docker.a11")
        assert (sent.id, sent.to, sent.type, sent.level, sent.payload) == (
            sent_id,
            "gvisor.b11",
            "data",
            "public",
            b"plain",
        )
        raw = await router.nc.jetstream().get_last_msg("INGRESS", "tier.docker.agent.a11.out")
        assert raw.headers is not None and raw.headers["Nats-Msg-Id"] == sent_id

        sealed_id = await client.send(
            "gvisor.b11", b"secret", level="confidential", encrypt=b.encryption_public_key
        )
        sealed = await _outbox_request(router, "docker.a11")
        assert sealed.id == sealed_id and sealed.enc == "x25519-sealed"
        assert b"secret" not in sealed.payload
        assert open_sealed(sealed.payload, b.encryption_secret_key) == b"secret"

        await client.send("host.launcher", b"stop", level="restricted", type="control")
        assert (await _outbox_request(router, "docker.a11")).type == "control"

        await client.publish("metrics.cpu", b"42", level="public")
        event = await _outbox_request(router, "docker.a11")
        assert (event.to, event.type) == ("event.metrics.cpu", "event")

        await client.subscribe("metrics.*", "alerts.>")
        op = await _outbox_request(router, "docker.a11")
        assert (op.to, op.type) == ("host.bus", "data")
        assert json.loads(op.payload) == {"op": "subscribe", "topics": ["metrics.*", "alerts.>"]}
        await client.unsubscribe("alerts.>")
        op = await _outbox_request(router, "docker.a11")
        assert json.loads(op.payload) == {"op": "unsubscribe", "topics": ["alerts.>"]}
        assert client.stats.published == 6


async def test_misuse_is_refused_before_anything_is_sent(make_agent: AgentFactory) -> None:
    a_dir = await make_agent("docker.a12")
    async with await _connect(a_dir) as client:
        with pytest.raises(ContractError, match="publish"):
            await client.send("event.metrics", b"x", level="public")
        with pytest.raises(ContractError):
            await client.send("docker.b12", b"x", level="public", type="rpc")  # type: ignore[arg-type]
        with pytest.raises(ContractError):
            await client.send("nowhere", b"x", level="public")
        for bad in ("Metrics", "a..b", ">.x", "a.b.c.d.e.f.g.h.i", "a b"):
            with pytest.raises(ContractError, match="topic pattern"):
                await client.subscribe(bad)
        with pytest.raises(ContractError, match="at least one"):
            await client.subscribe()
        assert client.stats.published == 0


async def test_connect_uses_the_agent_dir_variable_and_refuses_identity_options(
    make_agent: AgentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_dir = await make_agent("docker.a13")
    with pytest.raises(ConfigError, match="user_credentials"):
        await AgentClient.connect(a_dir, user_credentials="/tmp/other.creds")
    monkeypatch.setenv("SYMBIONT_AGENT_DIR", str(a_dir))
    async with await AgentClient.connect(options=OPTIONS) as client:
        assert client.address == "docker.a13" and not client.is_closed
    assert client.is_closed


async def test_nothing_secret_reaches_the_log(
    make_agent: AgentFactory, router: FakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    await make_agent("docker.s14")
    r_dir = await make_agent("docker.r14")
    config = AgentConfig.load(r_dir)
    seed_line = (r_dir / "agent.creds").read_text().split("SEED-----\n")[1].split("\n")[0]
    bad = router.envelope("docker.s14", "docker.r14", b"PAYLOAD-MARKER")
    await router.store("docker.r14", b"PAYLOAD-MARKER", to_headers(bad))  # unrouted
    good = router.envelope("docker.s14", "docker.r14", b"PAYLOAD-MARKER-2")
    await router.deliver(good, "docker.r14")
    caplog.set_level(logging.DEBUG, logger="agent_sdk")
    async with await _connect(r_dir) as client:
        await _take(client, 1)
        assert client.stats.security_by_reason == {"unrouted": 1}
    text = caplog.text + repr(config) + repr(client.config)
    assert "unrouted" in caplog.text
    for secret in (seed_line, config.encryption_secret_key, "PAYLOAD-MARKER"):
        assert secret not in text
    assert os.environ.get("SYMBIONT_AGENT_DIR") is None


async def test_an_unreachable_server_is_a_broker_error(make_agent: AgentFactory) -> None:
    config = AgentConfig.load(await make_agent("docker.a15"))
    nowhere = dataclasses.replace(config, nats_url=f"nats://127.0.0.1:{free_port()}")
    with pytest.raises(BrokerError, match="cannot connect") as info:
        # (nats-py retries even a first connect max_reconnect_attempts times.)
        await AgentClient.connect(nowhere, max_reconnect_attempts=1, reconnect_time_wait=0.1)
    assert isinstance(info.value.__cause__, OSError | nats.errors.Error)
