"""``symbi demo``: the whole stack and six agents of three tiers, with a readable report.

It starts the broker and two policy workers on the embedded NATS server (free
ports, a temporary state directory), registers the agents, runs each of them
as its own process (``symbi.demo_agent``), and reports what every agent saw
and every decision the workers audited: allowed data, an rpc round trip
across tiers, a sealed message into a micro-VM tier, an event fan-out, and a
compromised agent's impersonation, forged signature, replay, policy violation
and flood, each denied and audited with its reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from broker_gateway.audit_reader import read_audit
from broker_gateway.gateway import Gateway
from broker_gateway.keys import write_secret
from broker_gateway.runtime import Runtime, RuntimeConfig
from broker_gateway.server import port_free
from symbi.cmd_up import worker_children

DEMO_AGENTS: dict[str, dict[str, Any]] = {
    "docker.a1": {"clearance": "confidential", "capabilities": ("rpc",)},
    "docker.b1": {},
    "docker.sensor": {},
    "docker.mallory": {},
    "gvisor.planner": {"capabilities": ("rpc",), "subscriptions": ("alerts.>",)},
    "firecracker.vault": {"clearance": "confidential", "subscriptions": ("alerts.*",)},
}
RESPONDERS = ("docker.b1", "gvisor.planner", "firecracker.vault")
# What the run should audit: a1 (3), the planner's answer, the sensor's event to
# two subscribers, mallory's 30; the report waits for them, up to a deadline.
EXPECTED_RECORDS = 3 + 1 + 2 + 30
SETTLE_TIMEOUT_S = 30.0


def demo_policies() -> dict[str, Any]:
    """The built-in policies, with a tight rate on docker -> docker to show the limiter."""
    text = Path(__file__).resolve().parent.parent / "policy_worker" / "default_policies.yaml"
    doc: dict[str, Any] = yaml.safe_load(text.read_text())
    for policy in doc["communication_policies"]:
        if policy["name"] == "docker_to_docker":
            policy["rate_limits"] = {"messages_per_second": 2, "burst_size": 10}
    return doc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    if not port_free(port):  # pragma: no cover - raced by another process
        return _free_port()
    return port


@dataclass
class AgentProcess:
    address: str
    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def follow(self, ready: asyncio.Event | None = None) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            self.lines.append(line)
            if ready is not None and line.get("event") == "ready":
                ready.set()


async def _spawn(role: str, directory: Path, address: str, *extra: str) -> AgentProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "symbi.demo_agent",
        role,
        str(directory),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    return AgentProcess(address, proc)


async def _register_all(gateway: Gateway, root: Path) -> dict[str, Path]:
    dirs = {}
    for address, spec in DEMO_AGENTS.items():
        tier, agent_id = address.split(".")
        creds = await gateway.register_agent(
            tier,
            agent_id,
            clearance=spec.get("clearance", "restricted"),
            capabilities=spec.get("capabilities", ()),
            subscriptions=spec.get("subscriptions", ()),
        )
        directory = root / address
        write_secret(directory / "agent.creds", creds.creds)
        write_secret(directory / "agent.json", json.dumps(creds.info))
        dirs[address] = directory
    return dirs


async def _collect_audit(gateway: Gateway, since: datetime) -> list[dict[str, Any]]:
    """Wait until the expected decisions are audited (or the deadline), then read them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT_S
    records: list[dict[str, Any]] = []
    while True:
        records = [json.loads(raw) async for raw in read_audit(gateway.js, since)]
        if len(records) >= EXPECTED_RECORDS or loop.time() > deadline:
            return records
        await asyncio.sleep(0.5)


async def run_demo(state_dir: Path | None, keep: bool) -> int:
    # The report is the output: the services' own INFO lines would drown it.
    os.environ.setdefault("SYMBIONT_LOG_LEVEL", "WARNING")
    logging.getLogger().setLevel(os.environ["SYMBIONT_LOG_LEVEL"])
    root = Path(tempfile.mkdtemp(prefix="symbi-demo-")) if state_dir is None else state_dir
    root.mkdir(parents=True, exist_ok=True)
    policy_file = root / "demo-policies.yaml"
    policy_file.write_text(yaml.safe_dump(demo_policies(), sort_keys=False))
    config = RuntimeConfig(
        state_dir=root / "state",
        nats_port=_free_port(),
        http_port=None,
        workers=2,
        policies=policy_file,
    )
    runtime = Runtime(config, children=worker_children)
    print(f"symbi demo: starting NATS, the gateway and 2 policy workers in {root}", flush=True)
    await runtime.start()
    processes: list[AgentProcess] = []
    try:
        assert runtime.gateway is not None
        gateway = runtime.gateway
        print(f"symbi demo: ready on {runtime.url}", flush=True)
        dirs = await _register_all(gateway, root / "agents")
        since = datetime.now(UTC)
        for address in RESPONDERS:
            agent = await _spawn("responder", dirs[address], address)
            ready = asyncio.Event()
            agent.reader = asyncio.create_task(agent.follow(ready))
            await asyncio.wait_for(ready.wait(), 30)
            processes.append(agent)
        vault_key = json.loads((dirs["firecracker.vault"] / "agent.json").read_text())[
            "encryption_public_key"
        ]
        for role, address, extra in (
            ("a1", "docker.a1", (vault_key,)),
            ("sensor", "docker.sensor", ()),
            ("mallory", "docker.mallory", ()),
        ):
            agent = await _spawn(role, dirs[address], address, *extra)
            agent.reader = asyncio.create_task(agent.follow())
            await asyncio.wait_for(agent.proc.wait(), 60)
            processes.append(agent)
        records = await _collect_audit(gateway, since)
    finally:
        for agent in processes:
            if agent.proc.returncode is None:
                agent.proc.terminate()
        for agent in processes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agent.proc.wait(), 10)
            if agent.reader is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(agent.reader, 5)
        await runtime.stop()
    print(render_report(processes, records))
    if not keep and state_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    denied = {r["reason"] for r in records if r.get("decision") == "deny"}
    wanted = {"from_mismatch", "bad_signature", "replay", "type_not_allowed", "rate_limited"}
    return 0 if wanted <= denied and any(r.get("decision") == "allow" for r in records) else 1


def _describe(line: dict[str, Any]) -> str | None:
    event = line["event"]
    if event == "received":
        what = line["type"] if line["type"] != "event" else f"event {line['to'][6:]}"
        sealed = " (sealed, opened by the recipient)" if line.get("sealed") else ""
        return f"received {what} from {line['sender']}{sealed}: {line['payload']!r}"
    if event == "answered":
        return f"answered the rpc request of {line['to']}"
    if event == "rpc_answer":
        return (
            f"got the rpc answer of {line['sender']} in {line['round_trip_ms']} ms: "
            f"{line['payload']!r}"
        )
    return None


def render_report(processes: list[AgentProcess], records: list[dict[str, Any]]) -> str:
    out = ["", "What the agents saw"]
    for agent in processes:
        for line in agent.lines:
            text = _describe(line)
            if text is not None:
                out.append(f"  {agent.address:<18} {text}")
    attacks = [line for a in processes for line in a.lines if line["event"] == "attack"]
    attack_of: dict[str, str] = {}
    for line in attacks:  # a replay reuses the original's id: the original names it
        attack_of.setdefault(line["id"], line["attack"])
    out += ["", "What the policy workers decided (audit stream)"]
    grouped: collections.Counter[tuple[str, str, str, str, str, str]] = collections.Counter()
    for r in records:
        label = attack_of.get(str(r.get("id")), "")
        if r.get("reason") == "replay":
            label = "replay"
        to = r.get("recipient") or r.get("to") or "-"
        grouped[
            (
                str(r.get("decision")),
                str(r.get("from")),
                str(to),
                str(r.get("type")),
                str(r.get("reason")),
                label,
            )
        ] += 1
    for (decision, sender, to, mtype, reason, label), count in sorted(
        grouped.items(), key=lambda item: (item[0][0] != "allow", item[0][1], item[0][4])
    ):
        verdict = "DELIVERED" if decision == "allow" else "DENIED   "
        times = f" x{count}" if count > 1 else ""
        note = f"  <- {label}" if label else ""
        out.append(f"  {verdict} {sender:>16} -> {to:<18} {mtype:<8} {reason}{times}{note}")
    allowed = sum(1 for r in records if r.get("decision") == "allow")
    reasons = collections.Counter(
        str(r.get("reason")) for r in records if r.get("decision") == "deny"
    )
    out += [
        "",
        f"{allowed} delivered, {sum(reasons.values())} denied: "
        + ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())),
    ]
    return "\n".join(out)
