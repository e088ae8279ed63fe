"""The SDK end to end: agents talk through a real ``symbi up`` with two policy workers.

Agents are registered with the real command line and connect from the files
it wrote; every message goes outbox -> ingress stream -> a worker -> the
recipient's inbox. The last test stops and restarts the whole bus under a
connected client to exercise the circuit breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from agent_sdk.circuit import CircuitBreakerConfig
from agent_sdk.client import AgentClient
from agent_sdk.credentials import AgentConfig, read_credentials
from agent_sdk.envelope import build, sign, to_headers
from agent_sdk.errors import BrokerError, CircuitOpenError, PublishError
from agent_sdk.inbox import Message
from agent_sdk.options import ClientOptions
from agent_sdk.retry import RetryPolicy
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from tests.helpers import SymbiUp, close_all, connect_agent
from tests.test_sdk_inbox import Events

OPTIONS = dataclasses.replace(ClientOptions(), fetch_timeout_s=0.25, request_timeout_s=10.0)


@pytest.fixture(scope="module")
def live_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbiUp]:
    """``symbi up`` with two policy workers, for the whole module."""
    up = SymbiUp(tmp_path_factory.mktemp("state"), workers=2)
    up.start()
    yield up
    assert up.stop() == 0, "".join(up.output)


@pytest.fixture(scope="module")
def agents(live_bus: SymbiUp, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Registered with ``symbi agent register``: address -> directory of its files."""
    specs = {
        "docker.a1": ("--capability", "rpc", "--clearance", "confidential"),
        "gvisor.g1": ("--capability", "rpc", "--clearance", "confidential"),
        "docker.b1": (),
        "docker.sub1": ("--subscribe", "metrics.*"),
        "gvisor.sub2": (),
        "docker.pub1": (),
    }
    dirs = {}
    for address, extra in specs.items():
        tier, _, agent_id = address.partition(".")
        out = tmp_path_factory.mktemp(address)
        live_bus.register(tier, agent_id, out, *extra)
        dirs[address] = out
    return dirs


@pytest.fixture(scope="module")
async def router(live_bus: SymbiUp) -> AsyncIterator[Client]:
    nc = await live_bus.connect_router()
    yield nc
    await nc.close()


ClientFactory = Callable[..., Awaitable[AgentClient]]


@pytest.fixture
async def connect(agents: dict[str, Path]) -> AsyncIterator[ClientFactory]:
    """Connect agents by address; all are closed after the test."""
    clients: list[AgentClient] = []

    async def make(address: str, **kwargs: object) -> AgentClient:
        client = await AgentClient.connect(agents[address], options=OPTIONS, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def _take(client: AgentClient, count: int = 1, timeout: float = 10.0) -> list[Message]:
    """The next ``count`` messages, each acknowledged as handled."""
    got: list[Message] = []
    async with asyncio.timeout(timeout), client.messages() as stream:
        async for msg in stream:
            got.append(msg)
            if len(got) == count:
                break
    return got


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll server-side state (nothing to wait on locally) until ``check`` holds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _nothing_for(client: AgentClient, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        msg = (await _take(client, 1, timeout=seconds))[0]
        raise AssertionError(f"unexpected message {msg!r}")


async def test_data_message_from_docker_reaches_gvisor(connect: ClientFactory) -> None:
    a1, g1 = await connect("docker.a1"), await connect("gvisor.g1")
    sent = await a1.send("gvisor.g1", b'{"task": 1}', level="restricted")
    [msg] = await _take(g1)
    assert (msg.id, msg.sender, msg.to, msg.type) == (sent, "docker.a1", "gvisor.g1", "data")
    assert msg.payload == b'{"task": 1}' and msg.worker is not None
    assert msg.sender_key == a1.config.public_key


async def test_rpc_round_trip_between_docker_and_gvisor(connect: ClientFactory) -> None:
    a1, g1 = await connect("docker.a1"), await connect("gvisor.g1")

    async def serve(request: Message) -> None:
        await g1.reply(request, b"pong:" + request.payload)

    server = asyncio.create_task(g1.handle(serve))
    try:
        answers = await asyncio.gather(
            *(a1.request("gvisor.g1", f"ping{i}".encode(), level="public") for i in range(3))
        )
        assert sorted(a.payload for a in answers) == [b"pong:ping0", b"pong:ping1", b"pong:ping2"]
        assert all(a.sender == "gvisor.g1" and a.is_reply and a.level == "public" for a in answers)
        assert a1.stats.replies == 3 and a1.stats.received == 0
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def test_sealed_payloads_round_trip_and_plaintext_secrets_are_stopped(
    connect: ClientFactory,
) -> None:
    a1, g1 = await connect("docker.a1"), await connect("gvisor.g1")
    # docker -> gvisor at "confidential" must be sealed (default policies): the
    # plaintext one is denied by a worker, the sealed one arrives and opens.
    await a1.send("gvisor.g1", b"in the clear", level="confidential")
    sealed_id = await a1.send(
        "gvisor.g1", b"for g1 only", level="confidential", encrypt=g1.config.encryption_public_key
    )
    [msg] = await _take(g1)
    assert (msg.id, msg.payload, msg.encrypted, msg.level) == (
        sealed_id,
        b"for g1 only",
        True,
        "confidential",
    )
    assert b"for g1 only" not in msg.envelope.payload
    answer = asyncio.create_task(
        a1.request(
            "gvisor.g1",
            b"sealed question",
            level="confidential",
            encrypt=g1.config.encryption_public_key,
        )
    )
    [question] = await _take(g1)
    assert question.payload == b"sealed question" and question.encrypted
    await g1.reply(question, b"sealed answer", encrypt=a1.config.encryption_public_key)
    reply = await answer
    assert reply.payload == b"sealed answer" and reply.encrypted
    await _nothing_for(g1, 0.5)  # the plaintext secret never arrived


async def test_event_fan_out_follows_subscriptions(
    connect: ClientFactory, live_bus: SymbiUp
) -> None:
    pub, sub1, sub2 = (
        await connect("docker.pub1"),
        await connect("docker.sub1"),
        await connect("gvisor.sub2"),
    )
    gateway = await Gateway.connect(StateDir.open(live_bus.state_dir, create=False), live_bus.url)
    try:
        registry = await gateway.registry()

        async def subscriptions() -> tuple[str, ...]:
            return (await registry.get("gvisor.sub2")).subscriptions

        await sub2.subscribe("metrics.>")
        await _until(lambda: _equals(subscriptions(), ("metrics.>",)))

        sent = await pub.publish("metrics.cpu", b"0.93", level="public")
        for client in (sub1, sub2):
            [event] = await _take(client)
            assert (event.id, event.type, event.topic, event.to) == (
                sent,
                "event",
                "metrics.cpu",
                "event.metrics.cpu",
            )
            assert event.payload == b"0.93" and event.sender == "docker.pub1"

        await sub2.unsubscribe("metrics.>")
        await _until(lambda: _equals(subscriptions(), ()))
        second = await pub.publish("metrics.cpu", b"0.10", level="public")
        assert [e.id for e in await _take(sub1)] == [second]
        await _nothing_for(sub2, 0.5)
    finally:
        await gateway.close()


async def test_forged_misaddressed_and_unrouted_deliveries_are_dropped_and_reported(
    connect: ClientFactory, agents: dict[str, Path], router: Client
) -> None:
    events = Events()
    a1 = await connect("docker.a1")
    b1 = await connect("docker.b1", on_security_event=events)
    # A real delivery to a1, then the same bytes stored in b1's inbox (as a buggy or
    # compromised host component might): the envelope and the route tag name a1.
    sent = await a1.send("docker.a1", b"note to self", level="public")
    [own] = await _take(a1)
    assert own.id == sent
    js = router.jetstream()
    raw = await js.get_last_msg(a1.config.inbox_stream, a1.config.inbox)
    assert raw.headers is not None
    # (A new Nats-Msg-Id each: the inbox stream would drop a copy as a duplicate.)
    copied = {**raw.headers, "Nats-Msg-Id": "copy-1"}
    await js.publish(b1.config.inbox, raw.data or b"", headers=copied)
    # The same message with the worker's headers removed: never routed.
    bare = {k: v for k, v in copied.items() if k not in ("Symbi-Route", "Symbi-Sender-Key")}
    bare.update({"Symbi-To": "docker.b1", "Nats-Msg-Id": "copy-2"})  # re-addressed, too
    await js.publish(b1.config.inbox, raw.data or b"", headers=bare)
    attacker = await connect_agent(agents["docker.pub1"])
    try:
        # It aims the PubAck of its own publish at b1's live inbox...
        await attacker.nc.publish(
            attacker.info["outbox"], b"", reply=b1.config.inbox, headers={"Nats-Msg-Id": "junk-b1"}
        )
        # ...and claims to be a1 (signing with its own key): the workers deny it.
        signer = read_credentials(agents["docker.pub1"] / "agent.creds").signer
        forged = sign(
            build(sender="docker.a1", to="docker.b1", type="data", level="public", payload=b"x"),
            signer,
        )
        await attacker.nc.jetstream().publish(
            attacker.info["outbox"], forged.payload, headers=to_headers(forged)
        )
    finally:
        await close_all(attacker)
    legit = await a1.send("docker.b1", b"the real a1", level="public")

    [msg] = await _take(b1)
    assert msg.id == legit and msg.payload == b"the real a1"
    assert sorted(await events.wait(3)) == ["malformed", "misaddressed", "unrouted"]
    assert b1.stats.security_events == 3
    await _nothing_for(b1, 0.5)


def _nats_server_pid(state_dir: Path) -> int:
    """The pid of the ``nats-server`` that ``symbi up`` started on ``state_dir``."""
    conf = str(state_dir / "nats" / "server.conf").encode()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"nats-server") and conf in argv:
                return int(proc.name)
    raise AssertionError(f"no nats-server for {state_dir}")


async def _freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every thread has stopped (delivery is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    async with asyncio.timeout(10):
        while True:
            states = set()
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            if states <= {"T", "t"}:
                return
            await asyncio.sleep(0.01)


async def test_circuit_breaker_opens_while_the_bus_is_down_and_recovers(
    tmp_path: Path,
) -> None:
    up = SymbiUp(tmp_path / "state")
    up.start()
    try:
        up.register("docker", "cb1", tmp_path / "cb1")
        options = dataclasses.replace(
            OPTIONS,
            retry=RetryPolicy(max_attempts=3, base_delay_s=0.01),
            circuit=CircuitBreakerConfig(threshold=3, reset_s=0.5),
            publish_timeout_s=0.3,
        )
        client = await AgentClient.connect(AgentConfig.load(tmp_path / "cb1"), options=options)
        # A second client that does not reconnect: once the bus is gone for good,
        # its inbox loop must end with an error, not hang as if the inbox were empty.
        quitter = await AgentClient.connect(
            tmp_path / "cb1", options=options, allow_reconnect=False
        )

        async def read_all() -> None:
            async for _ in quitter.messages():
                pass

        reading = asyncio.create_task(read_all())
        server = _nats_server_pid(up.state_dir)
        try:
            await client.send("docker.cb1", b"before", level="public")
            # The server stops answering (frozen rather than killed: a restarted
            # `symbi up` could find its port still held by closing connections).
            await _freeze(server)
            try:
                with pytest.raises(CircuitOpenError):
                    await client.send("docker.cb1", b"during", level="public")
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(CircuitOpenError):
                    await client.send("docker.cb1", b"refused", level="public")
                assert loop.time() - started < 0.25  # no network wait while open
            finally:
                os.kill(server, signal.SIGCONT)
            delivered = None
            async with asyncio.timeout(30):
                while delivered is None:
                    with contextlib.suppress(PublishError):
                        delivered = await client.send("docker.cb1", b"after", level="public")
                    await asyncio.sleep(0.1)
            stats = client.stats
            assert stats.publish_failures >= 2 and stats.published == 2

            assert up.stop() == 0
            with pytest.raises(BrokerError, match="closed"):
                await asyncio.wait_for(reading, 10)
        finally:
            await client.close()
            await quitter.close()
    finally:
        if up.proc is not None and up.proc.poll() is None:
            assert up.stop() == 0
