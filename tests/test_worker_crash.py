"""Workers that die, a rate shared by workers, a backlog of big messages (slow: real processes).

``symbi up --workers 0`` runs the broker; the tests start and stop their own
worker processes, so they can kill one at a chosen moment. A killed worker's
unacknowledged messages come back after the consumer's 30 s ack wait, which
is what makes the kill test slow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from agent_sdk.envelope import to_headers
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from policy_worker.rate_limit import take
from tests.helpers import REPO, AuditLog, Sender, SymbiUp, bus_with_policies, register_sender

pytestmark = pytest.mark.slow

RATE, BURST = 40.0, 20
FANOUT = 40
POLICIES = f"""
communication_policies:
  - name: docker_to_docker
    source_tier: docker
    destination_tier: docker
    allowed_message_types: [data, event]
    rate_limits: {{messages_per_second: 1000000, burst_size: 1000000}}
  - name: firecracker_to_docker
    source_tier: firecracker
    destination_tier: docker
    allowed_message_types: [data]
    rate_limits: {{messages_per_second: {RATE}, burst_size: {BURST}}}
"""


@dataclass
class World:
    up: SymbiUp
    router: Client
    audit: AuditLog
    agents: dict[str, Sender]
    workers: list[subprocess.Popen[bytes]]

    def start_workers(
        self, count: int, prefix: str, log: Path | None = None
    ) -> list[subprocess.Popen[bytes]]:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(SYMBIONT_STATE_DIR=str(self.up.state_dir), SYMBIONT_NATS_URL=self.up.url)
        policies = str(self.up.policies)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "policy_worker",
                    "--name",
                    f"{prefix}-{i}",
                    "--policies",
                    policies,
                ],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stderr=None if log is None else log.open("ab"),
            )
            for i in range(count)
        ]
        self.workers.extend(procs)
        return procs


def stop_gracefully(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbiUp]:
    yield from bus_with_policies(tmp_path_factory.mktemp("crash"), POLICIES, workers=0)


@pytest.fixture(scope="module")
async def world(up: SymbiUp) -> AsyncIterator[World]:
    state = StateDir.open(up.state_dir, create=False)
    gateway = await Gateway.connect(state, up.url)
    router = await up.connect_router()
    audit = await AuditLog().start(router)
    agents = {}
    for tier, agent_id in [
        ("firecracker", "f1"),
        ("docker", "sink"),
        ("docker", "sink2"),
        ("docker", "bigsink"),
    ] + [("docker", f"s{i}") for i in range(5)]:
        agent = await register_sender(gateway, tier, agent_id)
        agents[agent.address] = agent
    for i in range(FANOUT):  # subscribers of fanout.>, never connected
        await gateway.register_agent("docker", f"fan{i}", subscriptions=("fanout.>",))
    await gateway.close()
    world = World(up, router, audit, agents, [])
    yield world
    for proc in world.workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    await audit.stop()
    for agent in agents.values():
        await agent.nc.close()
    await router.close()


async def _wait(what: str, done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_rate_limit_is_shared_by_two_workers(world: World) -> None:
    workers = world.start_workers(2, "rate")
    f1 = world.agents["firecracker.f1"]
    await asyncio.sleep(1.0)  # let both workers bind to the consumer
    ids: list[str] = []
    sent_ms: list[float] = []
    start = time.monotonic()
    for i in range(1000):  # 100/s for 10 s: 2.5 times the rate
        delay = start + i / 100 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        env = f1.envelope("docker.sink2", b"%d" % i)
        sent_ms.append(time.time() * 1000)
        ids.append(env.id)
        await f1.nc.publish(f1.outbox, env.payload, headers=to_headers(env))
    await f1.nc.flush()
    wanted = set(ids)
    await _wait(
        "every message audited",
        lambda: len({r["id"] for r in world.audit.records if r["id"] in wanted}) == len(ids),
        60,
    )
    allowed = sum(1 for r in world.audit.records if r["id"] in wanted and r["reason"] == "ok")
    limited = sum(
        1 for r in world.audit.records if r["id"] in wanted and r["reason"] == "rate_limited"
    )
    assert allowed + limited == len(ids)
    # What one ideal token bucket admits for exactly these send times.
    state: bytes | None = None
    expected = 0
    for now in sent_ms:
        admitted, state = take(state, now, RATE, BURST)
        expected += admitted
    assert abs(allowed - expected) <= 0.1 * expected, (allowed, expected)
    js = world.router.jetstream()
    info = await js.stream_info("INBOX_DOCKER", subjects_filter="tier.docker.agent.sink2.in")
    assert info.state.subjects == {"tier.docker.agent.sink2.in": allowed}
    assert [stop_gracefully(w) for w in workers] == [0, 0]


async def test_killed_worker_loses_and_duplicates_nothing(world: World) -> None:
    workers = world.start_workers(2, "kill")
    await asyncio.sleep(1.0)
    senders = [world.agents[f"docker.s{i}"] for i in range(5)]
    envs = [(s, s.envelope("docker.sink", b"m%d" % n)) for n in range(1000) for s in senders]
    wanted = {env.id for _, env in envs}
    futures = [
        await s.nc.jetstream().publish_async(s.outbox, env.payload, headers=to_headers(env))
        for s, env in envs
    ]
    await asyncio.gather(*futures)

    def audited() -> set[str]:
        return {r["id"] for r in world.audit.records if r["id"] in wanted}

    await _wait("a third of the stream", lambda: len(audited()) >= 1500, 60)
    workers[0].kill()  # SIGKILL, mid-stream: its unacknowledged messages come back
    assert workers[0].wait(10) == -signal.SIGKILL
    await _wait("every message audited", lambda: len(audited()) == len(wanted), 150)

    js = world.router.jetstream()
    deadline = time.monotonic() + 30
    while True:  # every ingress message acknowledged (a work queue then deletes it)
        consumer = await js.consumer_info("INGRESS", "workers")
        if consumer.num_pending == consumer.num_ack_pending == 0:
            break
        assert time.monotonic() < deadline, consumer
        await asyncio.sleep(0.2)
    records = [r for r in world.audit.records if r["id"] in wanted]
    assert len(records) == len(wanted)  # audited exactly once
    assert all(r["reason"] == "ok" for r in records)

    info = await js.stream_info("INBOX_DOCKER", subjects_filter="tier.docker.agent.sink.in")
    assert info.state.subjects == {"tier.docker.agent.sink.in": len(wanted)}
    delivered: list[str] = []
    sub = await js.subscribe(
        "tier.docker.agent.sink.in", stream="INBOX_DOCKER", ordered_consumer=True
    )
    while len(delivered) < len(wanted):
        msg = await sub.next_msg(timeout=10)
        delivered.append(msg.headers["Symbi-Id"])
    await sub.unsubscribe()
    assert len(set(delivered)) == len(delivered) == len(wanted)  # each exactly once
    assert set(delivered) == wanted
    assert stop_gracefully(workers[1]) == 0


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


async def _backlog_for_one_worker(
    world: World, sender: Sender, envs: list[Any], name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Publish ``envs`` with no worker running, then start one; it and its log file."""
    js = sender.nc.jetstream()
    for env in envs:
        await js.publish(sender.outbox, env.payload, headers=to_headers(env))
    log = world.up.state_dir.parent / f"{name}-worker.log"
    [worker] = world.start_workers(1, name, log)
    return worker, log


async def _assert_it_went_smoothly(
    world: World, worker: subprocess.Popen[bytes], log: Path
) -> None:
    """Under 150 MB, nothing dead-lettered, a clean stop, and no retry or lost connection."""
    peak = _peak_rss_mb(worker.pid)
    assert stop_gracefully(worker) == 0
    assert peak < 150, f"worker peak RSS {peak:.0f} MB"
    dead = await world.router.jetstream().stream_info("DEADLETTER")
    assert dead.state.messages == 0
    output = log.read_text(errors="replace")
    assert "ready" in output
    assert not [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line]


async def test_a_backlog_of_big_messages_goes_through_whole_in_bounded_memory(
    world: World,
) -> None:
    """300 messages of 1 MB waiting: all delivered once, none retried, worker under 150 MB.

    Before batches and pull requests were bounded in bytes, the worker asked for
    up to 32 MiB at once, the server cut it off as a slow consumer, and the
    messages went round the retries into the dead-letter stream.
    """
    sender = world.agents["docker.s4"]
    payload = os.urandom(1_000_000)
    envs = [sender.envelope("docker.bigsink", payload) for _ in range(300)]
    wanted = {env.id for env in envs}
    worker, log = await _backlog_for_one_worker(world, sender, envs, "big")

    def records() -> list[dict[str, Any]]:
        return [r for r in world.audit.records if r["id"] in wanted]

    await _wait("every big message audited", lambda: len(records()) == len(wanted), 120)
    assert {r["reason"] for r in records()} == {"ok"}
    info = await world.router.jetstream().stream_info(
        "INBOX_DOCKER", subjects_filter="tier.docker.agent.bigsink.in"
    )
    assert info.state.subjects == {"tier.docker.agent.bigsink.in": len(wanted)}
    await _assert_it_went_smoothly(world, worker, log)


async def test_big_events_fan_out_to_many_inboxes_without_a_retry(world: World) -> None:
    """4 events of 4 MB to 40 subscribers: 640 MB of deliveries, in waves the streams accept.

    Published all at once, a stream's ingest queue refused most of each event's
    deliveries ("too many requests"), and the events went round the retries.
    """
    publisher = world.agents["docker.s3"]
    payload = os.urandom(4_000_000)
    envs = [publisher.envelope("event.fanout.big", payload, type="event") for _ in range(4)]
    wanted = {env.id for env in envs}
    worker, log = await _backlog_for_one_worker(world, publisher, envs, "fan")

    def records() -> list[dict[str, Any]]:
        return [r for r in world.audit.records if r["id"] in wanted]

    await _wait("every delivery audited", lambda: len(records()) == 4 * FANOUT, 120)
    assert {r["reason"] for r in records()} == {"ok"}
    recipients = {r["recipient"] for r in records()}
    assert recipients == {f"docker.fan{i}" for i in range(FANOUT)}
    await _assert_it_went_smoothly(world, worker, log)
