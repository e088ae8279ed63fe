"""DirectClient on a real nats-server: direct subscriptions get every message, others as usual.

It overrides a private method of nats-py, so this is also the canary for a
nats-py upgrade that changes how the read loop dispatches messages.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from broker_gateway.server import server_binary
from policy_worker.broker import Ack, JetStreamIO, Publish
from policy_worker.direct_client import DirectClient, status_of
from tests.helpers import free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store: Path = tmp_path_factory.mktemp("js")
    port = free_port()
    proc = subprocess.Popen(
        [server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def client(server: str) -> AsyncIterator[DirectClient]:
    nc = DirectClient()
    for _ in range(50):
        try:
            await nc.connect(server, connect_timeout=1, allow_reconnect=False)
            break
        except Exception:  # the server may still be starting
            await asyncio.sleep(0.1)
    assert nc.is_connected
    yield nc
    await nc.close()


async def test_raw_and_msg_handlers_see_every_message_and_others_are_untouched(
    client: DirectClient, server: str
) -> None:
    raw: list[tuple[bytes, bytes, bytes]] = []
    msgs: list[Msg] = []
    queued: list[Msg] = []

    sub_raw = await client.subscribe("raw.*")
    client.on_raw(sub_raw, lambda s, d, h: raw.append((s, d, h)))
    sub_msg = await client.subscribe("msg.*")
    client.on_msg(sub_msg, msgs.append)

    async def usual(msg: Msg) -> None:
        queued.append(msg)

    await client.subscribe("usual.*", cb=usual)
    pub = await nats.connect(server)
    try:
        for i in range(100):
            await pub.publish(f"raw.{i}", b"r%d" % i, headers={"K": "v"} if i % 2 else None)
            await pub.publish(f"msg.{i}", b"m%d" % i, reply="back", headers={"K": f"v{i}"})
            await pub.publish(f"usual.{i}", b"u%d" % i)
        await pub.flush()
    finally:
        await pub.close()
    for _ in range(100):
        if len(raw) == len(msgs) == len(queued) == 100:
            break
        await asyncio.sleep(0.05)
    assert [r[:2] for r in raw] == [(b"raw.%d" % i, b"r%d" % i) for i in range(100)]
    assert raw[0][2] == b"" and raw[1][2].startswith(b"NATS/1.0\r\nK: v")
    assert [(m.subject, m.data, m.reply, m.headers) for m in msgs] == [
        (f"msg.{i}", b"m%d" % i, "back", {"K": f"v{i}"}) for i in range(100)
    ]
    assert all(m._client is client for m in msgs)
    assert [m.data for m in queued] == [b"u%d" % i for i in range(100)]
    assert sub_raw.pending_msgs == 0 and sub_msg.pending_msgs == 0


async def test_a_failing_handler_drops_only_its_message(client: DirectClient) -> None:
    seen: list[bytes] = []

    def handler(subject: bytes, data: bytes, headers: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        seen.append(data)

    sub = await client.subscribe("fail.x")
    client.on_raw(sub, handler)
    for data in (b"a", b"boom", b"b"):
        await client.publish("fail.x", data)
    await client.flush()
    for _ in range(50):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.05)
    assert seen == [b"a", b"b"] and client.is_connected
    client.forget(sub)
    await sub.unsubscribe()


async def test_pubacks_come_through_the_direct_path(client: DirectClient) -> None:
    js = client.jetstream()
    await js.add_stream(name="S", subjects=["s.>"])
    io = JetStreamIO(client, timeout_s=5)
    results = await io.publish_all([Publish(f"s.{i}", b"x", {}) for i in range(50)])
    assert results == [Ack("S", i + 1) for i in range(50)]
    # No stream on the subject: the server's inline 503 status becomes an error.
    [missing] = await io.publish_all([Publish("nowhere.at.all", b"x", {})])
    assert not isinstance(missing, Ack) and "503" in str(missing)


def test_status_of_reads_the_inline_status() -> None:
    assert status_of(b"NATS/1.0 503\r\n\r\n") == "503"
    assert status_of(b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n") == "408"
    assert status_of(b"NATS/1.0\r\nK: v\r\n\r\n") == ""
    assert status_of(b"") == ""


async def test_a_publish_nobody_answers_times_out_alone(client: DirectClient) -> None:
    js = client.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    await client.subscribe("silent.x")  # a subscriber that never answers: no 503 either
    io = JetStreamIO(client, timeout_s=0.3)
    first, silent, last = await io.publish_all(
        [Publish("t.1", b"x", {}), Publish("silent.x", b"x", {}), Publish("t.2", b"x", {})]
    )
    assert first == Ack("T", 1) and last == Ack("T", 2)
    assert not isinstance(silent, Ack) and "in time" in str(silent)
    assert io._waiting == {}


def test_header_lines_parse_as_nats_py_parses_them() -> None:
    import random

    from nats.aio.client import Client

    rng = random.Random(7)
    pieces = [b"Symbi-Id", b" Name ", b"na me", b"X\xff", b"", b":", b" ", b"\t", b"v", b"\xc3\xa9"]
    pieces += [b"Nats-Msg-Id", b"a:b", b"\r", b"\n", b"\x00", b"K"]
    for _ in range(3000):
        lines = [
            b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
            for _ in range(rng.randint(0, 6))
        ]
        raw = b"\r\n".join(lines) + rng.choice([b"", b"\r\n", b"\r\n\r\n"])
        assert DirectClient._parse_header_lines(raw) == Client._parse_header_lines(raw), raw
