"""Retries, the circuit breaker and nats error mapping of the SDK's publisher.

The same :class:`ReliablePublisher` runs against an in-memory JetStream fake
(every failure mode on demand, no sleeping) and against a real ``nats-server``
that is stopped and restarted under it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import PubAck

from agent_sdk.circuit import CircuitBreaker, CircuitBreakerConfig, CircuitState
from agent_sdk.errors import CircuitOpenError, ConfigError, PublishError
from agent_sdk.options import ClientOptions
from agent_sdk.publisher import ReliablePublisher
from agent_sdk.retry import RetryPolicy
from broker_gateway.server import server_binary
from tests.helpers import free_port


def _state(breaker: CircuitBreaker) -> CircuitState:
    return breaker.state  # read afresh each time (mypy would narrow a property)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeJetStream:
    """Answers each publish with the next scripted outcome (an exception or a PubAck)."""

    def __init__(self, *outcomes: BaseException | PubAck) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, bytes, dict[str, Any]]] = []

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> PubAck:
        self.calls.append((subject, payload, dict(headers or {})))
        outcome = self.outcomes.pop(0) if self.outcomes else _ack(len(self.calls))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _ack(seq: int, duplicate: bool = False) -> PubAck:
    return PubAck(stream="INGRESS", seq=seq, duplicate=duplicate)


async def _no_sleep(_: float) -> None:
    return None


def _publisher(js: FakeJetStream, attempts: int = 5, threshold: int = 5) -> ReliablePublisher:
    return ReliablePublisher(
        js,
        retry=RetryPolicy(max_attempts=attempts),
        breaker=CircuitBreaker(CircuitBreakerConfig(threshold=threshold, reset_s=10)),
        sleep=_no_sleep,
    )


HEADERS = {"Symbi-Id": "m-1", "Nats-Msg-Id": "m-1"}


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    assert [policy.backoff_cap(n) for n in (1, 2, 3, 4, 5, 100)] == [0.1, 0.2, 0.4, 0.8, 1, 1]
    delays = {policy.delay(3) for _ in range(50)}
    assert len(delays) > 1 and all(0 <= d <= 0.4 for d in delays)


def test_settings_come_from_the_environment() -> None:
    env = {
        "SYMBIONT_RETRY_MAX_ATTEMPTS": "3",
        "SYMBIONT_CIRCUIT_BREAKER_THRESHOLD": "7",
        "SYMBIONT_CIRCUIT_BREAKER_RESET_S": "2.5",
    }
    options = ClientOptions.from_env(env)
    assert options.retry.max_attempts == 3
    assert options.circuit == CircuitBreakerConfig(threshold=7, reset_s=2.5)
    defaults = ClientOptions.from_env({})
    assert defaults.retry.max_attempts == 5 and defaults.circuit.threshold == 5
    assert defaults.circuit.reset_s == 10


@pytest.mark.parametrize(
    "env",
    [
        {"SYMBIONT_RETRY_MAX_ATTEMPTS": "0"},
        {"SYMBIONT_RETRY_MAX_ATTEMPTS": "five"},
        {"SYMBIONT_CIRCUIT_BREAKER_THRESHOLD": "-1"},
        {"SYMBIONT_CIRCUIT_BREAKER_RESET_S": "nan"},
    ],
)
def test_bad_environment_values_are_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        ClientOptions.from_env(env)


def test_breaker_opens_probes_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(CircuitBreakerConfig(threshold=3, reset_s=10), clock=clock)
    for _ in range(3):
        breaker.acquire()
        breaker.record_failure()
    assert _state(breaker) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError, match="3 consecutive failures"):
        breaker.acquire()
    clock.now += 10
    assert _state(breaker) is CircuitState.HALF_OPEN
    breaker.acquire()  # the probe
    with pytest.raises(CircuitOpenError, match="probe"):
        breaker.acquire()  # others wait for its verdict
    breaker.record_failure()  # failed probe: open again for a full cool-down
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    clock.now += 10
    breaker.acquire()
    breaker.record_success()
    assert _state(breaker) is CircuitState.CLOSED and breaker.consecutive_failures == 0


async def test_retries_reuse_the_message_id_until_acknowledged() -> None:
    js = FakeJetStream(nats.errors.TimeoutError(), nats.errors.NoRespondersError(), _ack(7))
    ack = await _publisher(js).publish("tier.docker.agent.a1.out", b"x", HEADERS)
    assert ack.seq == 7
    assert [c[2]["Nats-Msg-Id"] for c in js.calls] == ["m-1"] * 3
    assert {c[1] for c in js.calls} == {b"x"}


async def test_a_duplicate_ack_after_a_retry_is_success() -> None:
    # The first attempt was stored but its PubAck was lost: the retry is recognised.
    js = FakeJetStream(nats.errors.TimeoutError(), _ack(3, duplicate=True))
    assert (await _publisher(js).publish("s", b"x", HEADERS)).seq == 3


async def test_a_duplicate_ack_on_the_first_attempt_is_an_id_collision() -> None:
    js = FakeJetStream(_ack(3, duplicate=True))
    with pytest.raises(PublishError, match="id collision"):
        await _publisher(js).publish("s", b"x", HEADERS)
    assert len(js.calls) == 1


async def test_exhausted_retries_raise_publish_error_from_the_cause() -> None:
    js = FakeJetStream(*[nats.errors.TimeoutError() for _ in range(3)])
    with pytest.raises(PublishError, match="after 3 attempts") as info:
        await _publisher(js, attempts=3).publish("s", b"x", HEADERS)
    assert type(info.value) is PublishError
    assert isinstance(info.value.__cause__, nats.errors.TimeoutError)


@pytest.mark.parametrize(
    "error",
    [
        nats.js.errors.APIError(code=400, err_code=10060, description="expected stream mismatch"),
        nats.errors.MaxPayloadError(),
        nats.errors.ConnectionClosedError(),
    ],
)
async def test_definite_failures_are_not_retried(error: Exception) -> None:
    js = FakeJetStream(error)
    with pytest.raises(PublishError) as info:
        await _publisher(js).publish("s", b"x", HEADERS)
    assert info.value.__cause__ is error and len(js.calls) == 1


async def test_open_circuit_fails_fast_without_publishing() -> None:
    js = FakeJetStream(*[nats.errors.TimeoutError() for _ in range(4)])
    publisher = _publisher(js, attempts=5, threshold=4)
    with pytest.raises(CircuitOpenError) as info:
        await publisher.publish("s", b"x", HEADERS)
    assert isinstance(info.value.__cause__, nats.errors.TimeoutError)
    assert len(js.calls) == 4  # the fifth attempt was refused by the breaker
    with pytest.raises(CircuitOpenError):
        await publisher.publish("s", b"y", HEADERS)
    assert len(js.calls) == 4


async def test_the_publish_that_opens_the_circuit_says_so() -> None:
    js = FakeJetStream(*[nats.errors.TimeoutError() for _ in range(3)])
    with pytest.raises(CircuitOpenError, match="paused") as info:
        await _publisher(js, attempts=3, threshold=3).publish("s", b"x", HEADERS)
    assert isinstance(info.value.__cause__, nats.errors.TimeoutError)


async def test_a_refusal_by_the_server_counts_as_reachable() -> None:
    js = FakeJetStream(
        nats.errors.TimeoutError(), nats.js.errors.APIError(code=400, description="no")
    )
    publisher = _publisher(js, attempts=5, threshold=2)
    with pytest.raises(PublishError):
        await publisher.publish("s", b"x", HEADERS)
    assert publisher.breaker.consecutive_failures == 0


# -- against a real nats-server that goes away and comes back -----------------


class PlainNats:
    """A bare JetStream ``nats-server`` on a fixed port, restartable on the same store."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        log = self.store / "server.log"
        log.write_text("")
        self.proc = await asyncio.create_subprocess_exec(
            server_binary(),
            *("-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port)),
            *("-l", str(log)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(400):
            text = log.read_text()
            if "Server is ready" in text:
                return
            assert "[FTL]" not in text, text
            await asyncio.sleep(0.025)
        raise AssertionError("nats-server did not start:\n" + log.read_text())

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


@pytest.fixture
async def plain_nats(tmp_path: Path) -> AsyncIterator[PlainNats]:
    server = PlainNats(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_breaker_opens_when_the_server_dies_and_recovers_after_it_returns(
    plain_nats: PlainNats,
) -> None:
    nc = await nats.connect(plain_nats.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await js.add_stream(name="INGRESS", subjects=["tier.*.agent.*.out"])
        breaker = CircuitBreaker(CircuitBreakerConfig(threshold=3, reset_s=1.0))
        publisher = ReliablePublisher(
            js, retry=RetryPolicy(max_attempts=5, base_delay_s=0.01), breaker=breaker, timeout_s=0.3
        )
        subject = "tier.docker.agent.a1.out"
        await publisher.publish(subject, b"1", {"Nats-Msg-Id": "before"})

        await plain_nats.stop()
        with pytest.raises(CircuitOpenError):
            await publisher.publish(subject, b"2", {"Nats-Msg-Id": "during"})
        assert _state(breaker) is CircuitState.OPEN
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(CircuitOpenError):
            await publisher.publish(subject, b"3", {"Nats-Msg-Id": "fast"})
        assert loop.time() - started < 0.25  # refused without waiting for a PubAck timeout

        await plain_nats.start()
        ack = None
        for _ in range(100):  # reconnect, then the cool-down; generous, no timing asserted
            with contextlib.suppress(PublishError):
                ack = await publisher.publish(subject, b"4", {"Nats-Msg-Id": "after"})
                break
            await asyncio.sleep(0.1)
        assert ack is not None and not ack.duplicate
        assert _state(breaker) is CircuitState.CLOSED
        ids = set()
        for seq in range(1, (await js.stream_info("INGRESS")).state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                stored = await js.get_msg("INGRESS", seq)
                ids.add((stored.headers or {})["Nats-Msg-Id"])
        assert {"before", "after"} <= ids and "fast" not in ids
    finally:
        await nc.close()
