"""The receiving agents: ``python -m bench.receiver PLAN.json OUT.json``.

Each agent connects with its own credentials and holds a plain core
subscription on its inbox subject: that is the live path, and the receipt
time of each delivery (taken first thing in the callback, before any
checking) is what latency is measured to. Checking is kept off the hot path:
the first delivery of each agent is checked in full afterwards (route tag,
envelope signature, and opening the sealed box), which proves that what was
timed were genuine routed deliveries without charging the receiver's crypto
to the router. After the live phase each agent reads its durable inbox with
``pull_subscribe_bind`` and acknowledges everything, to count what was stored.

Protocol (stdin/stdout lines): prints ``ready`` once subscribed; reads
``expect <total> <count for agent 0> <count for agent 1> ...`` when the
sender has finished; prints ``live-done`` when all have arrived live (or
``grace_s`` has passed since the expectation, or nothing came for
``idle_s``); then drains the durable inboxes, writes OUT.json and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from agent_sdk.envelope import Envelope, parse, verify
from agent_sdk.headers import H_ID
from agent_sdk.route import H_ROUTE, H_SENDER_KEY, verify_route
from agent_sdk.sealing import EncryptionKeyPair
from bench.child import AgentFiles, run, say, stdin_lines
from bench.spec import ReceivePlan, load_receive_plan

DURABLE_BATCH = 256
DURABLE_WAIT_S = 1.0


class Receivers:
    """Live receipts of every agent of the plan."""

    def __init__(self, plan: ReceivePlan, agents: list[AgentFiles]) -> None:
        self.plan = plan
        self.agents = agents
        self.connections: list[Client] = []
        self.receipts: list[tuple[str, int, int]] = []
        self.seen: set[str] = set()
        self.duplicates = 0
        self.junk = 0
        self.first: dict[int, Msg] = {}
        self.expected: int | None = None
        self.last_receipt = time.monotonic()
        self.complete = asyncio.Event()
        self.live_over = False

    async def start(self) -> None:
        for index, agent in enumerate(self.agents):
            nc = await agent.connect()
            self.connections.append(nc)
            await nc.subscribe(str(agent.info["inbox"]), cb=self._callback(index))
            await nc.flush()

    def _callback(self, index: int) -> Any:
        async def on_msg(msg: Msg) -> None:
            now = time.time_ns()
            if self.live_over:  # too late to count as live; the durable count has it
                return
            msg_id = msg.headers.get(H_ID) if msg.headers else None
            if msg_id is None:
                self.junk += 1
                return
            if msg_id in self.seen:
                self.duplicates += 1
                return
            self.seen.add(msg_id)
            self.receipts.append((msg_id, now, index))
            self.last_receipt = time.monotonic()
            self.first.setdefault(index, msg)
            if self.expected is not None and len(self.seen) >= self.expected:
                self.complete.set()

        return on_msg

    def expect(self, total: int) -> None:
        self.expected = total
        # The idle clock starts now: a backlog may have taken a while to publish.
        self.last_receipt = max(self.last_receipt, time.monotonic())
        if len(self.seen) >= total:
            self.complete.set()

    async def wait_live(self) -> None:
        """Until everything expected arrived, or the grace or idle time ran out."""
        deadline = time.monotonic() + self.plan.grace_s
        while not self.complete.is_set():
            now = time.monotonic()
            if now > deadline or now - self.last_receipt > self.plan.idle_s:
                return
            try:
                await asyncio.wait_for(self.complete.wait(), 0.25)
            except TimeoutError:
                continue

    def check_first(self) -> tuple[int, list[str]]:
        """Check each agent's first delivery in full, as a careful agent would."""
        checked = 0
        failures: list[str] = []
        for index, msg in sorted(self.first.items()):
            agent = self.agents[index]
            try:
                _check(agent, msg, self.plan)
            except Exception as exc:  # report, never crash the measurement
                failures.append(f"{agent.address}: {exc!r}")
            checked += 1
        return checked, failures

    async def drain_durable(self, counts: list[int]) -> list[list[str]]:
        """Read and acknowledge each agent's durable inbox; the ids found, per agent."""
        found: list[list[str]] = []
        for agent, nc, want in zip(self.agents, self.connections, counts, strict=True):
            ids: list[str] = []
            js = nc.jetstream()
            sub = await js.pull_subscribe_bind(
                durable=str(agent.info["inbox_consumer"]), stream=str(agent.info["inbox_stream"])
            )
            while len(ids) < want:
                try:
                    msgs = await sub.fetch(DURABLE_BATCH, timeout=DURABLE_WAIT_S)
                except (TimeoutError, NatsTimeoutError):
                    break
                for msg in msgs:
                    if msg.headers and H_ID in msg.headers:
                        ids.append(msg.headers[H_ID])
                    await msg.ack()
            await sub.unsubscribe()
            found.append(ids)
        return found

    async def close(self) -> None:
        for nc in self.connections:
            await nc.flush()
            await nc.close()


def _check(agent: AgentFiles, msg: Msg, plan: ReceivePlan) -> None:
    headers = msg.headers or {}
    env = parse(headers, msg.data)
    known = plan.sender_keys.get(env.sender)
    if plan.check == "envelope":
        if known is None:
            raise ValueError(f"no key known for {env.sender}")
        verify(env, known)
        return _open(agent, env)
    sender_key = headers[H_SENDER_KEY]
    if known is not None and sender_key != known:
        raise ValueError("the route vouches for another sender key than the registered one")
    if not verify_route(
        headers[H_ROUTE],
        router_public_key=str(agent.info["router_public_key"]),
        msg_id=env.id,
        sender=env.sender,
        recipient=agent.address,
        sender_key=sender_key,
    ):
        raise ValueError("route tag does not verify")
    verify(env, sender_key)
    _open(agent, env)


def _open(agent: AgentFiles, env: Envelope) -> None:
    if env.enc == "x25519-sealed":
        EncryptionKeyPair.from_secret(str(agent.info["encryption_secret_key"])).open(env.payload)


async def _main(plan_path: Path, out_path: Path) -> None:
    plan = load_receive_plan(plan_path)
    receivers = Receivers(plan, [AgentFiles.load(d) for d in plan.agents])
    await receivers.start()
    stdin = await stdin_lines()
    say("ready")
    line = (await stdin.readline()).decode().split()
    if not line or line[0] != "expect":
        raise SystemExit(f"receiver: expected 'expect ...', got {line!r}")
    total, counts = int(line[1]), [int(n) for n in line[2:]]
    receivers.expect(total)
    await receivers.wait_live()
    receivers.live_over = True
    say("live-done")
    checked, failures = receivers.check_first() if plan.check != "none" else (0, [])
    durable = await receivers.drain_durable(counts) if plan.durable else []
    await receivers.close()
    result = {
        "receipts": receivers.receipts,
        "duplicates": receivers.duplicates,
        "junk": receivers.junk,
        "checked": checked,
        "check_failures": failures,
        "durable_ids": durable,
    }
    out_path.write_text(json.dumps(result))


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.receiver PLAN.json OUT.json")
    run(_main(Path(sys.argv[1]), Path(sys.argv[2])))


if __name__ == "__main__":
    main()
