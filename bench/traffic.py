"""One phase of traffic: receivers up, the sender's plan run, everything counted.

Every phase goes the same way, so that the bare relay and the router are
measured by exactly the same procedure:

1. the receiving agents subscribe (their process says ``ready``);
2. the sender runs its plan. For a *backlog* phase the workers' consumer is
   paused first, so the whole plan is stored in the ingress stream before any
   relay sees a message, and it is resumed once every relay has a pull
   request open: all relays start on the backlog at the same instant;
3. the relays' and the server's CPU time is read when the relays are let
   loose (the sender's ``go``, or the resume) and again when the last message
   has arrived live; peak RSS at the end;
4. the receivers drain their durable inboxes, and the phase waits until the
   ingress consumer has nothing left, so the next phase starts clean.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bus import AgentRef, Bus
from bench.procs import Child, Relay
from bench.procstats import MachineSample, busy_cores, cpu_total, machine, peak_rss_mb
from bench.spec import CheckMode, ReceivePlan, SendPlan, dump
from bench.stats import Sample, join

STEP_TIMEOUT_S = 60.0


@dataclass
class Context:
    """What every phase needs: the bus, a scratch directory, unique tags."""

    bus: Bus
    work: Path
    serial: int = 0

    def tag(self, name: str) -> str:
        self.serial += 1
        return f"{self.serial:02d}-{name}"


@dataclass
class Traffic:
    """The raw outcome of one phase; every reported figure is computed from these."""

    name: str
    relays: int
    sent: int
    send_errors: int
    live: int
    durable: int
    duplicates: int
    samples: list[Sample]
    streams: list[dict[str, Any]]
    release_ns: int
    done_ns: int
    relay_cpu_s: float
    server_cpu_s: float
    relay_peak_rss_mb: float
    checked: int
    check_failures: list[str]
    denied: int
    batches: tuple[float, float] = (0.0, 0.0)
    machine_busy_cores: float = 0.0
    steal_share: float = 0.0
    missing_live: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def window_s(self) -> float:
        return (self.done_ns - self.release_ns) / 1e9

    def last_receipt_ns(self) -> int:
        return max((s.recv_ns for s in self.samples), default=self.release_ns)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The counters read when the relays are let loose and when the last message is in."""

    relays_cpu_s: float
    server_cpu_s: float
    machine: MachineSample
    batches: tuple[float, float]

    @classmethod
    def take(cls, bus: Bus, pids: list[int]) -> _Snapshot:
        return cls(cpu_total(pids), cpu_total([bus.server_pid]), machine(), bus.worker_batches())


async def run_traffic(
    ctx: Context,
    name: str,
    plan: SendPlan,
    receivers: list[AgentRef],
    relays: list[Relay],
    *,
    backlog: bool,
    check: CheckMode,
    senders: list[AgentRef],
) -> Traffic:
    """Run one phase (see the module doc) and return what it measured."""
    bus = ctx.bus
    tag = ctx.tag(name)
    expected = sum(s.count for s in plan.streams if s.is_burst) + sum(
        round(s.rate * s.duration_s) for s in plan.streams if not s.is_burst
    )
    receive_plan = ReceivePlan(
        agents=tuple(str(r.directory) for r in receivers),
        check=check,
        sender_keys={s.address: s.public_key for s in senders},
        grace_s=max(60.0, expected / 200),
    )
    send_path, receive_path = ctx.work / f"{tag}.send.json", ctx.work / f"{tag}.recv.json"
    dump(plan, send_path)
    dump(receive_plan, receive_path)
    pids = [r.pid for r in relays]
    denied_before = (await bus.audit_counts())["deny"]

    # Both start at once (each takes a moment to import and connect); the
    # sender waits for "start", which comes once the receivers listen.
    receiver = await Child.start(bus, "bench.receiver", receive_path, ctx.work, f"{tag}-recv")
    sender = await Child.start(bus, "bench.load", send_path, ctx.work, f"{tag}-send")
    try:
        await receiver.wait_line("ready", STEP_TIMEOUT_S)
        await sender.wait_line("ready", STEP_TIMEOUT_S)
        if backlog:
            await bus.pause_ingress()
        await sender.send("start")
        await sender.wait_line("go", STEP_TIMEOUT_S)
        before = _Snapshot.take(bus, pids)
        release_ns = time.time_ns()
        run_s = max((s.start_s + s.duration_s for s in plan.streams), default=0.0)
        load = await sender.result(run_s + expected / 500 + STEP_TIMEOUT_S)
        sent = sum(int(s["acked"]) for s in load["streams"])
        if backlog:
            await bus.wait_ingress(pending=sent, waiting=len(relays), timeout=STEP_TIMEOUT_S)
            before = _Snapshot.take(bus, pids)
            release_ns = await bus.release_ingress()
        await receiver.send("expect " + " ".join(map(str, _counts(plan, load, receivers, sent))))
        await receiver.wait_line("live-done", receive_plan.grace_s + STEP_TIMEOUT_S)
        done_ns = time.time_ns()
        after = _Snapshot.take(bus, pids)
        rss = max(peak_rss_mb(pid) for pid in pids)
        received = await receiver.result(expected / 1000 + STEP_TIMEOUT_S)
    finally:
        for child in (receiver, sender):
            with contextlib.suppress(ProcessLookupError):
                await child.kill()
        if backlog:
            await bus.resume_ingress()
    await bus.wait_ingress(pending=0, timeout=STEP_TIMEOUT_S)
    samples, missing = join(load["messages"], received["receipts"])
    return Traffic(
        name=name,
        relays=len(relays),
        sent=sent,
        send_errors=sum(int(s["errors"]) for s in load["streams"]),
        live=len(samples),
        durable=sum(len(ids) for ids in received["durable_ids"]),
        duplicates=int(received["duplicates"]),
        samples=samples,
        streams=list(load["streams"]),
        release_ns=release_ns,
        done_ns=done_ns,
        relay_cpu_s=after.relays_cpu_s - before.relays_cpu_s,
        server_cpu_s=after.server_cpu_s - before.server_cpu_s,
        relay_peak_rss_mb=rss,
        checked=int(received["checked"]),
        check_failures=list(received["check_failures"]),
        denied=(await bus.audit_counts())["deny"] - denied_before,
        batches=(after.batches[0] - before.batches[0], after.batches[1] - before.batches[1]),
        machine_busy_cores=busy_cores(before.machine, after.machine),
        steal_share=(after.machine.steal - before.machine.steal)
        / max(1, after.machine.total - before.machine.total),
        missing_live=missing,
    )


def _counts(
    plan: SendPlan, load: dict[str, Any], receivers: list[AgentRef], sent: int
) -> list[int]:
    """``[total, per receiver...]``: how many stored messages each receiver should get."""
    per_address: Counter[str] = Counter()
    for _, stream, route, _ in load["messages"]:
        per_address[plan.streams[stream].routes[route].to] += 1
    return [sent, *(per_address[r.address] for r in receivers)]
