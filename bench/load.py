"""The open-loop sender: ``python -m bench.load PLAN.json OUT.json``.

Each message is published by its sender agent, with that agent's credentials,
as a signed ``symbi/1`` envelope (sealed to the recipient when the route says
so) through plain nats.py ``publish_async`` into the agent's outbox, where
the ingress stream stores it. Open-loop streams send on a fixed schedule
(message ``i`` at ``i / rate``), never waiting for a previous answer, so a
slow router shows up as latency instead of quietly lowering the offered load;
how far the sender itself fell behind its schedule is reported (``lag``), so
that a saturated machine is visible rather than mistaken for a fast router.

The clock is read once per message: ``Symbi-Time`` is that reading in ms, and
the same reading in ns is what latency is measured from, so the 0-1 ms
truncation of the header does not bias sub-millisecond figures.

Protocol: connects every sender, prints ``ready``, waits for a ``start`` line
on stdin, prints ``go`` when the schedule starts, then writes OUT.json
(``t0_ns``, per stream counts and timings, and ``messages``: one
``[id, stream, route, send_ns]`` per message that got its PubAck) and exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from agent_sdk.credentials import read_credentials
from agent_sdk.envelope import build, sign, to_headers
from agent_sdk.sealing import seal
from agent_sdk.signing import Signer
from bench.child import AgentFiles, run, say, stdin_lines
from bench.spec import Route, SendPlan, Stream, load_send_plan
from bench.stats import summarize

START_DELAY_S = 0.2
ACK_TIMEOUT_S = 30.0
_YIELD_EVERY = 32


@dataclass(slots=True)
class _Sender:
    address: str
    outbox: str
    nc: Client
    js: JetStreamContext
    signer: Signer


@dataclass(slots=True)
class _StreamLog:
    sent: int = 0
    errors: int = 0
    first_ns: int = 0
    last_ns: int = 0
    lags_ms: list[float] = field(default_factory=list)
    pending: list[tuple[str, int, int, asyncio.Future[PubAck]]] = field(default_factory=list)


class Load:
    """Runs a :class:`SendPlan`: every stream concurrently, from one common start."""

    def __init__(self, plan: SendPlan, senders: dict[str, _Sender]) -> None:
        self.plan = plan
        self.senders = senders
        self.payload = os.urandom(plan.payload_bytes)
        self.logs = [_StreamLog() for _ in plan.streams]
        self.bursts_left = sum(1 for s in plan.streams if s.is_burst)
        self.bursts_done = asyncio.Event()
        if self.bursts_left == 0:
            self.bursts_done.set()
        self.bursts_end = 0.0
        self.t0 = 0.0

    async def publish(self, index: int, i: int, stream: Stream) -> None:
        route_index = i % len(stream.routes)
        route: Route = stream.routes[route_index]
        sender = self.senders[route.sender_dir]
        body = seal(self.payload, route.to_key) if route.sealed else self.payload
        send_ns = time.time_ns()
        env = build(
            sender=sender.address,
            to=route.to,
            type="data",
            level=route.level,
            payload=body,
            enc="x25519-sealed" if route.sealed else "none",
            time_ms=send_ns // 1_000_000,
        )
        env = sign(env, sender.signer)
        log = self.logs[index]
        try:
            fut = await sender.js.publish_async(sender.outbox, env.payload, headers=to_headers(env))
        except Exception as exc:  # nats-py raises several unrelated types
            log.errors += 1
            print(f"publish failed: {exc!r}", file=sys.stderr)
            return
        log.pending.append((env.id, route_index, send_ns, fut))
        log.sent += 1
        log.first_ns = log.first_ns or send_ns
        log.last_ns = send_ns

    async def open_loop(self, index: int, stream: Stream) -> None:
        start = self.t0 + stream.start_s
        total = None if stream.tail_s is not None else round(stream.rate * stream.duration_s)
        log = self.logs[index]
        i = 0
        while True:
            now = time.monotonic()
            due = int((now - start) * stream.rate) + 1 if now >= start else 0
            if total is not None:
                due = min(due, total)
            while i < due:
                scheduled = start + i / stream.rate
                await self.publish(index, i, stream)
                log.lags_ms.append((time.monotonic() - scheduled) * 1000)
                i += 1
            if total is not None and i >= total:
                return
            tail = stream.tail_s
            if tail is not None and self.bursts_done.is_set() and now >= self.bursts_end + tail:
                return
            await asyncio.sleep(max(0.0, start + i / stream.rate - time.monotonic()))

    async def burst(self, index: int, stream: Stream) -> None:
        await asyncio.sleep(max(0.0, self.t0 + stream.start_s - time.monotonic()))
        for i in range(stream.count):
            await self.publish(index, i, stream)
            if i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the open-loop streams keep their schedule
        self.bursts_left -= 1
        if self.bursts_left == 0:
            self.bursts_end = time.monotonic()
            self.bursts_done.set()

    async def run(self) -> dict[str, object]:
        self.t0 = time.monotonic() + START_DELAY_S
        if not self.bursts_left:
            self.bursts_end = self.t0  # a tail stream then runs for its tail alone
        t0_ns = time.time_ns() + int(START_DELAY_S * 1e9)
        tasks = [
            self.burst(i, s) if s.is_burst else self.open_loop(i, s)
            for i, s in enumerate(self.plan.streams)
        ]
        await asyncio.sleep(START_DELAY_S)
        say("go")
        await asyncio.gather(*tasks)
        return await self.collect(t0_ns)

    async def collect(self, t0_ns: int) -> dict[str, object]:
        """Wait for every PubAck; report only the messages the ingress stream stored."""
        futures = [p[3] for log in self.logs for p in log.pending]
        if futures:
            await asyncio.wait(futures, timeout=ACK_TIMEOUT_S)
        messages: list[list[object]] = []
        streams: list[dict[str, object]] = []
        for index, (stream, log) in enumerate(zip(self.plan.streams, self.logs, strict=True)):
            acked = 0
            for msg_id, route_index, send_ns, fut in log.pending:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    acked += 1
                    messages.append([msg_id, index, route_index, send_ns])
                else:
                    log.errors += 1
            streams.append(
                {
                    "name": stream.name,
                    "sent": log.sent,
                    "acked": acked,
                    "errors": log.errors,
                    "first_ns": log.first_ns,
                    "last_ns": log.last_ns,
                    "lag_ms": summarize(log.lags_ms).as_dict() if log.lags_ms else None,
                }
            )
        return {"t0_ns": t0_ns, "streams": streams, "messages": messages}


async def _main(plan_path: Path, out_path: Path) -> None:
    plan = load_send_plan(plan_path)
    senders: dict[str, _Sender] = {}
    for directory in sorted({r.sender_dir for s in plan.streams for r in s.routes}):
        files = AgentFiles.load(directory)
        nc = await files.connect()
        js = nc.jetstream(publish_async_max_pending=plan.max_in_flight)
        signer = read_credentials(files.creds).signer
        senders[directory] = _Sender(files.address, str(files.info["outbox"]), nc, js, signer)
    load = Load(plan, senders)
    stdin = await stdin_lines()
    say("ready")
    if (await stdin.readline()).strip() != b"start":
        raise SystemExit("load: expected 'start' on stdin")
    result = await load.run()
    out_path.write_text(json.dumps(result))
    for sender in senders.values():
        await sender.nc.close()


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.load PLAN.json OUT.json")
    run(_main(Path(sys.argv[1]), Path(sys.argv[2])))


if __name__ == "__main__":
    main()
