"""PubAck reading: the fast path for the usual answers, json for everything else."""

from __future__ import annotations

import pytest
from nats.errors import BadHeaderError

from agent_sdk.errors import PublishError
from policy_worker.broker import Ack, Reply, RevisionConflict, read_ack


def _msg(data: bytes, status: str = "") -> Reply:
    return Reply(data, status)


@pytest.mark.parametrize(
    ("data", "ack"),
    [
        (b'{"stream":"AUDIT","seq":42}', Ack("AUDIT", 42)),
        (b'{"stream":"AUDIT","seq":42,"duplicate":true}', Ack("AUDIT", 42, True)),
        (b'{"stream":"KV_x","domain":"hub","seq":7}', Ack("KV_x", 7)),
        (b'{"seq":9, "stream": "S"}', Ack("S", 9)),  # another shape: read by json
        (b'{"stream":"S","seq":9,"duplicate":false}', Ack("S", 9)),
    ],
)
def test_pubacks_are_read(data: bytes, ack: Ack) -> None:
    assert read_ack(_msg(data), "s") == ack


def test_puback_errors_are_mapped() -> None:
    wrong_last = b'{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}'
    assert isinstance(read_ack(_msg(wrong_last), "s"), RevisionConflict)
    other = b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}'
    result = read_ack(_msg(other), "s")
    assert isinstance(result, PublishError) and not isinstance(result, RevisionConflict)
    assert isinstance(read_ack(_msg(b"", "503"), "s"), PublishError)
    assert isinstance(read_ack(_msg(b'{"stream":"S"}'), "s"), PublishError)


async def test_publishes_are_encoded_as_nats_py_encodes_them() -> None:
    from nats.aio.client import Client

    from policy_worker.broker import JetStreamIO, Publish
    from policy_worker.direct_client import DirectClient

    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    nc = DirectClient()
    nc._status = Client.CONNECTED
    nc._max_payload = 1 << 20
    nc._send_command = capture  # type: ignore[method-assign]
    io = JetStreamIO(nc, timeout_s=1)
    headers = {"Symbi-Id": " m1 ", "X-Odd": "a\r\nb", "Nats-Msg-Id": "s:m1:r", " ": "skipped"}
    for req in (
        Publish("tier.docker.agent.b.in", b"payload \r\n bytes", headers),
        Publish("$KV.symbi_nonces.docker.a.5", b"7", {}),
    ):
        await io._publish(req, "_INBOX.x.1")
        await nc.publish(req.subject, req.payload, reply="_INBOX.x.1", headers=req.headers or None)  # type: ignore[arg-type]
        assert sent[-2] == sent[-1]
    with pytest.raises(BadHeaderError):
        await io._publish(Publish("a.b", b"", {"bad name": "v"}), "_INBOX.x.2")


def test_publishes_go_out_in_waves_of_bounded_bytes() -> None:
    from policy_worker.broker import Publish, waves

    reqs = [Publish(f"s.{i}", b"x" * n, {}) for i, n in enumerate((6, 3, 2, 9, 1, 12, 0))]
    cut = waves(reqs, 10)
    assert [[r.subject for r in w] for w in cut] == [
        ["s.0", "s.1"],
        ["s.2"],
        ["s.3", "s.4"],
        ["s.5"],  # alone over the bound: a wave of its own
        ["s.6"],
    ]
    assert [r for w in cut for r in w] == reqs  # in order, each once
    assert waves(reqs, 1000) == [reqs]
    assert waves([], 10) == [[]]
