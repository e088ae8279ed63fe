"""The launcher services of ``symbi up``, driven by control messages to ``host.launcher``.

``symbi up`` runs here with two policy workers and its launchers (one per
tier whose runtime is present). Requesters are agents with ``AgentClient``:
on the host for most tests, inside a Docker sandbox for the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import nats
import pytest

from agent_sdk import AgentClient, Message
from agent_sdk.errors import SandboxError
from agent_sdk.names import Level
from broker_gateway.gateway import Gateway
from broker_gateway.keys import write_secret
from broker_gateway.state import StateDir
from launchers.availability import probe, summary
from launchers.launch import Launcher, LaunchRequest
from launchers.processes import process_alive
from launchers.service import serve
from launchers.tier_bus import TierBus
from tests.helpers import AuditLog, SymbiUp, symbi
from tests.launcher_support import line_json, output_of
from tests.test_launcher_docker import leftovers, unique, wait_revoked
from tests.test_launcher_e2e import GVISOR_REASON, RESPONDER, VM_REASON

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.timeout(300),
    pytest.mark.skipif(GVISOR_REASON is not None, reason=GVISOR_REASON or ""),
]

SLEEPER = ("python3", "-c", "import time; print('up', flush=True); time.sleep(600)")


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbiUp]:
    """``symbi up`` with policy workers and its launcher services."""
    up = SymbiUp(tmp_path_factory.mktemp("state"), workers=2, launchers=True)
    up.start()
    yield up
    assert up.stop() == 0, "".join(up.output)


@pytest.fixture(scope="module")
async def gateway(bus: SymbiUp) -> AsyncIterator[Gateway]:
    gw = await Gateway.connect(StateDir.open(bus.state_dir, create=False), bus.url)
    yield gw
    await gw.close()


@pytest.fixture
async def audit(bus: SymbiUp) -> AsyncIterator[AuditLog]:
    nc = await nats.connect(bus.url, user_credentials=str(bus.state_dir / "creds" / "router.creds"))
    log = await AuditLog().start(nc)
    yield log
    await log.stop()
    await nc.close()


@pytest.fixture
def client() -> Iterator[Any]:
    c = docker.from_env()
    yield c
    c.close()


async def agent_files(
    gateway: Gateway, tmp_path: Path, tier: str, capabilities: tuple[str, ...], **kw: Any
) -> Path:
    agent_id = unique("boss")
    creds = await gateway.register_agent(tier, agent_id, capabilities=capabilities, **kw)
    directory = tmp_path / agent_id
    write_secret(directory / "agent.creds", creds.creds)
    write_secret(directory / "agent.json", json.dumps(creds.info))
    return directory


@contextlib.asynccontextmanager
async def requester(
    gateway: Gateway,
    tmp_path: Path,
    tier: str = "docker",
    capabilities: tuple[str, ...] = ("control", "rpc"),
    **kw: Any,
) -> AsyncIterator[AgentClient]:
    directory = await agent_files(gateway, tmp_path, tier, capabilities, **kw)
    async with await AgentClient.connect(directory) as agent:
        yield agent


async def ask(
    agent: AgentClient, body: dict[str, Any] | bytes, level: Level = "restricted"
) -> tuple[Message, dict[str, Any]]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = await agent.request("host.launcher", payload, level=level, timeout=120)
    found: dict[str, Any] = json.loads(answer.payload)
    return answer, found


async def stop_quietly(agent: AgentClient, tier: str, agent_id: str) -> None:
    with contextlib.suppress(Exception):
        await ask(agent, {"op": "stop", "tier": tier, "id": agent_id, "timeout_s": 2})


def test_up_says_which_launchers_run(bus: SymbiUp) -> None:
    expected = f"symbi: launchers: {summary(probe())}\n"
    assert expected in bus.output
    assert "docker (docker), gvisor (runsc)" in expected


async def test_launch_status_stop_over_rpc(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path, audit: AuditLog, client: Any
) -> None:
    async with requester(gateway, tmp_path) as boss:
        child = unique("child")
        started = time.monotonic()
        answer, body = await ask(
            boss,
            {"op": "launch", "tier": "gvisor", "id": child, "command": list(SLEEPER),
             "capabilities": ["rpc"], "limits": {"memory_mb": 256, "cpus": 0.5, "pids": 64}},
        )  # fmt: skip
        launch_s = time.monotonic() - started
        try:
            assert (answer.sender, answer.type, answer.reply_to is not None) == (
                "gvisor.launcher", "rpc", True,
            )  # fmt: skip
            assert body["ok"] is True, body
            assert (body["address"], body["backend"], body["state"]) == (
                f"gvisor.{child}", "gvisor", "running",
            )  # fmt: skip
            root = bus.state_dir / "sandboxes" / f"gvisor.{child}"
            assert (root / "launch" / "agent.creds").is_file()
            assert json.loads((root / "sandbox.json").read_text())["owner"] == boss.address
            record = await (await gateway.registry()).get(f"gvisor.{child}")
            assert record.capabilities == ("rpc",) and record.public_key == body["public_key"]

            _, status = await ask(boss, {"op": "status", "tier": "gvisor", "id": child})
            assert (status["ok"], status["state"]) == (True, "running")
        finally:
            _, stopped = await ask(boss, {"op": "stop", "tier": "gvisor", "id": child})
        assert stopped == {
            "request": stopped["request"],
            "op": "stop",
            "ok": True,
            "address": f"gvisor.{child}",
            "state": "stopped",
        }
        assert not root.exists()
        assert leftovers(client, "gvisor", child) == []
        assert (await (await gateway.registry()).get(f"gvisor.{child}")).status == "revoked"
        # Every request and answer passed a policy worker and was audited.
        for record in await audit.wait(
            3, to="host.launcher", reason="ok", **{"from": boss.address}
        ):
            assert record["policy"] == "docker_to_host"
        answers = await audit.wait(3, reason="ok", **{"from": "gvisor.launcher"})
        assert {a["to"] for a in answers} == {boss.address}
    print(f"launch over host.launcher, gvisor, answered after {launch_s:.2f} s")


async def test_a_control_message_is_answered_with_data(gateway: Gateway, tmp_path: Path) -> None:
    async with requester(gateway, tmp_path, capabilities=("control",)) as boss:
        sent = await boss.send(
            "host.launcher",
            json.dumps({"op": "status", "id": "nobody-here"}).encode(),
            level="restricted",
            type="control",
        )
        async with asyncio.timeout(60), boss.messages() as stream:
            msg = await anext(stream)
    assert (msg.sender, msg.type, msg.reply_to) == ("docker.launcher", "data", None)
    assert json.loads(msg.payload) == {
        "request": sent,
        "op": "status",
        "ok": False,
        "error": "not_found",
        "detail": "no sandbox for docker.nobody-here on this host",
    }


async def test_each_request_is_answered_once_by_the_launcher_of_its_tier(
    gateway: Gateway, tmp_path: Path
) -> None:
    async with requester(gateway, tmp_path) as boss:
        for tier, answering in (
            ("docker", "docker"), ("gvisor", "gvisor"), ("firecracker", "firecracker"),
            ("nope", "docker"),  # not a tier: the requester's own tier answers it
        ):  # fmt: skip
            if answering == "firecracker" and not probe()[2].available:
                continue
            answer, body = await ask(boss, {"op": "status", "tier": tier, "id": "x1"})
            assert answer.sender == f"{answering}.launcher", body
            assert body["error"] == ("invalid" if tier == "nope" else "not_found")
        await asyncio.sleep(2)  # time for any second answer to arrive
        assert boss.stats.late_replies == 0
        assert boss.stats.security_events == 0


async def test_two_instances_of_a_tier_share_its_requests(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second docker launcher (here, in-process) takes part of the work; none is done twice."""
    caplog.set_level(logging.INFO, logger="launchers.control_service")
    stop = asyncio.Event()
    second = asyncio.create_task(
        serve(StateDir.open(bus.state_dir, create=False), bus.url, ["docker"], stop=stop)
    )
    try:
        async with requester(gateway, tmp_path) as boss:
            await asyncio.sleep(2)  # the second instance connects and starts pulling
            answers = [await ask(boss, {"op": "status", "id": f"n{i}"}) for i in range(16)]
            await asyncio.sleep(1)
            assert boss.stats.late_replies == 0 and boss.stats.security_events == 0
    finally:
        stop.set()
        await second
    assert {a.sender for a, _ in answers} == {"docker.launcher"}
    assert [b["detail"] for _, b in answers] == [
        f"no sandbox for docker.n{i} on this host" for i in range(16)
    ]
    here = [r for r in caplog.records if r.getMessage().startswith("status from")]
    assert 1 <= len(here) < 16, len(here)  # the rest went to symbi up's docker launcher


REFUSALS = [
    ({"command": ["true"], "clearance": "secret"}, "forbidden", "clearance secret"),
    ({"command": ["true"], "capabilities": ["rpc", "admin"]}, "forbidden", "lacks: admin"),
    ({"command": ["true"], "image": "busybox:latest"}, "forbidden", "not allowed"),
    ({"command": ["true"], "backend": "process"}, "invalid", "not an isolation boundary"),
    ({"command": ["true"], "limits": {"memory_mb": 65536}}, "forbidden", "above the maximum"),
    ({"command": ["true"], "app": "/"}, "invalid", "app: Extra inputs are not permitted"),
    ({"command": ["true"], "rootfs": "/etc"}, "invalid", "Extra inputs are not permitted"),
    ({"command": []}, "invalid", "command"),
    ({"command": ["true"], "env": {"BAD NAME": "x"}}, "invalid", "environment variable"),
    ({"command": ["true"], "tier": "docker", "id": "launcher"}, "forbidden", "reserved"),
]


@pytest.mark.parametrize(("extra", "code", "detail"), REFUSALS)
async def test_refused_launches_leave_nothing(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path, extra: dict[str, Any], code: str, detail: str
) -> None:
    body = {"op": "launch", "tier": "gvisor", "id": unique("refused"), **extra}
    async with requester(gateway, tmp_path) as boss:
        _, answer = await ask(boss, body)
    assert (answer["ok"], answer["error"]) == (False, code), answer
    assert detail in answer["detail"]
    if body["id"] != "launcher":
        assert not (bus.state_dir / "sandboxes" / f"{body['tier']}.{body['id']}").exists()
        assert body["id"] not in {r.id for r in await (await gateway.registry()).list()}


async def test_who_may_ask(bus: SymbiUp, gateway: Gateway, tmp_path: Path) -> None:
    async with requester(gateway, tmp_path, capabilities=("rpc",)) as no_control:
        _, answer = await ask(no_control, {"op": "launch", "id": "x2", "command": ["true"]})
        assert (answer["error"], answer["detail"]) == (
            "forbidden", f"{no_control.address} lacks the control capability",
        )  # fmt: skip
    async with requester(gateway, tmp_path, tier="gvisor") as gvisor_boss:
        _, answer = await ask(gvisor_boss, {"op": "launch", "tier": "docker", "id": "x3",
                                            "command": ["true"]})  # fmt: skip
        assert answer["detail"] == "a gvisor agent may not launch into the docker tier"
    async with requester(gateway, tmp_path) as owner, requester(gateway, tmp_path) as other:
        child = unique("owned")
        _, launched = await ask(owner, {"op": "launch", "id": child, "command": list(SLEEPER)})
        try:
            assert launched["ok"], launched
            for op in ("status", "stop"):
                _, answer = await ask(other, {"op": op, "id": child})
                assert (answer["error"], answer["detail"]) == (
                    "forbidden", f"{other.address} did not launch symbi-docker-{child}",
                )  # fmt: skip
            assert (bus.state_dir / "sandboxes" / f"docker.{child}").exists()
        finally:
            await stop_quietly(owner, "docker", child)
    async with requester(gateway, tmp_path) as boss:
        _, answer = await ask(boss, b"not json at all")
        assert (answer["op"], answer["error"]) == ("request", "invalid")


async def wait_gone(path: Path, timeout: float = 20.0) -> float:
    started = time.monotonic()
    for _ in range(int(timeout / 0.05)):
        if not path.exists():
            break
        await asyncio.sleep(0.05)
    assert not path.exists(), f"{path} is still there"
    return time.monotonic() - started


async def test_revoking_a_launched_agent_stops_its_sandbox(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path, client: Any
) -> None:
    async with requester(gateway, tmp_path) as boss:
        child = unique("revoked")
        _, body = await ask(boss, {"op": "launch", "tier": "gvisor", "id": child,
                                   "command": list(SLEEPER)})  # fmt: skip
        assert body["ok"], body
        root = bus.state_dir / "sandboxes" / f"gvisor.{child}"
        try:
            res = await asyncio.to_thread(
                symbi, "agent", "revoke", "--tier", "gvisor", "--id", child,
                state_dir=bus.state_dir,
            )  # fmt: skip
            assert res.returncode == 0, res.stderr
            took = await wait_gone(root)
            assert leftovers(client, "gvisor", child) == []
        finally:
            await stop_quietly(boss, "gvisor", child)
    print(f"revocation to sandbox and credentials gone: {took:.2f} s")


async def test_an_agent_that_crashes_is_reaped(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path, client: Any
) -> None:
    async with requester(gateway, tmp_path) as boss:
        child = unique("crash")
        crash = ["python3", "-c", "import os; os.abort()"]
        _, body = await ask(boss, {"op": "launch", "id": child, "command": crash})
        assert body["ok"], body  # its command did start
        await wait_gone(bus.state_dir / "sandboxes" / f"docker.{child}")
        assert leftovers(client, "docker", child) == []
        await wait_revoked(await gateway.registry(), f"docker.{child}")
        _, status = await ask(boss, {"op": "status", "id": child})
        assert status["error"] == "not_found"


async def test_the_launcher_user_can_do_no_more_than_its_tier_needs(bus: SymbiUp) -> None:
    state = StateDir.open(bus.state_dir, create=False)
    tier_bus = await TierBus.connect(state, "docker", bus.url)
    try:
        with pytest.raises(SandboxError, match="cannot act on gvisor agents"):
            await tier_bus.register_agent("gvisor", "x4")
    finally:
        await tier_bus.close()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        bus.url,
        user_credentials=str(tier_bus.files.creds),
        inbox_prefix=b"_LAUNCHER_docker",
        error_cb=on_error,
    )
    try:
        for subject in (
            "$SYS.REQ.CLAIMS.UPDATE",  # pushing account JWTs
            "symbi.admin.revoke.gvisor",  # another tier's revocations
            "$KV.symbi_registry.gvisor.x5",  # another tier's registry records
            "$JS.API.CONSUMER.CREATE.INBOX_GVISOR.x5",  # another tier's inboxes
            "$JS.API.CONSUMER.CREATE.HOST.launcher-gvisor",  # another tier's requests
            "$JS.API.CONSUMER.CREATE.HOST.bus",  # another host service's requests
            "$JS.API.STREAM.DELETE.AUDIT",
            "tier.docker.agent.x5.in",  # forging a delivery
            "audit.allow.docker.docker",
        ):
            before = len(errors)
            await nc.publish(subject, b"{}")
            await nc.flush()
            for _ in range(40):
                if len(errors) > before:
                    break
                await asyncio.sleep(0.05)
            assert "permissions violation" in " ".join(errors[before:]), subject
        before = len(errors)
        await nc.subscribe("_INBOX.>")  # other router users' replies
        await nc.flush()
        await asyncio.sleep(0.3)
        assert "permissions violation for subscription" in " ".join(errors[before:])
    finally:
        await nc.close()


PARENT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from agent_sdk import AgentClient

    CHILD = {CHILD!r}

    async def launcher(client, body):
        answer = await client.request(
            "host.launcher", json.dumps(body).encode(), level="restricted", timeout=120)
        print("launcher said " + answer.payload.decode(), flush=True)
        return json.loads(answer.payload)

    async def main():
        child_id = os.environ["CHILD_ID"]
        async with await AgentClient.connect() as client:
            launched = await launcher(client, {{
                "op": "launch", "tier": "gvisor", "id": child_id, "capabilities": ["rpc"],
                "command": ["python3", "-c", CHILD]}})
            assert launched["ok"], launched
            answer = await client.request(
                launched["address"], b"2+2?", level="restricted", timeout=120)
            print("child said " + answer.payload.decode(), flush=True)
            stopped = await launcher(client, {{"op": "stop", "tier": "gvisor", "id": child_id}})
            print("result " + json.dumps({{"answer": answer.payload.decode(),
                                          "stopped": stopped["ok"]}}), flush=True)
            await asyncio.sleep(3600)  # exited, the launcher service would reap it at once

    asyncio.run(main())
    """
)


async def test_an_agent_in_a_sandbox_launches_calls_and_stops_another(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path, client: Any
) -> None:
    state = StateDir.open(bus.state_dir, create=False)
    launcher = Launcher(state, gateway)
    app = tmp_path / "parent"
    app.mkdir(mode=0o755)
    (app / "main.py").write_text(PARENT.format(CHILD=RESPONDER))
    (app / "main.py").chmod(0o644)
    parent, child = unique("parent"), unique("child")
    started = time.monotonic()
    await launcher.launch(
        LaunchRequest("docker", parent, ("python3", "/app/main.py"), "docker", app_dir=app,
                      env={"CHILD_ID": child}, capabilities=("control", "rpc"))
    )  # fmt: skip
    try:
        result = line_json(await output_of(launcher, "docker", parent, "result ", 240), "result ")
    finally:
        with contextlib.suppress(SandboxError):
            await launcher.stop("docker", parent)
        with contextlib.suppress(SandboxError):
            await launcher.stop("gvisor", child)
    assert result == {"answer": "4, you asked 2+2?", "stopped": True}
    assert leftovers(client, "gvisor", child) == []
    assert not (bus.state_dir / "sandboxes" / f"gvisor.{child}").exists()
    took = time.monotonic() - started
    print(f"docker agent launched, called and stopped a gvisor agent: {took:.1f} s")


@pytest.mark.slow
@pytest.mark.skipif(VM_REASON is not None, reason=VM_REASON or "")
async def test_a_microvm_launched_over_host_launcher(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path
) -> None:
    async with requester(gateway, tmp_path) as boss:
        child = unique("vm")
        started = time.monotonic()
        answer, body = await ask(
            boss, {"op": "launch", "tier": "firecracker", "id": child, "command": list(SLEEPER)}
        )
        boot_s = time.monotonic() - started
        root = bus.state_dir / "sandboxes" / f"firecracker.{child}"
        try:
            assert answer.sender == "firecracker.launcher"
            assert (body["ok"], body["backend"]) == (True, "microvm"), body
            _, status = await ask(boss, {"op": "status", "tier": "firecracker", "id": child})
            assert status["state"] == "running"
            pid = int(json.loads((root / "sandbox.json").read_text())["details"]["pid"])
        finally:
            _, stopped = await ask(boss, {"op": "stop", "tier": "firecracker", "id": child})
        assert stopped["ok"], stopped
        assert not root.exists()
        assert not process_alive(pid, f"symbi-firecracker-{child}")
    print(f"micro-VM launched over host.launcher in {boot_s:.1f} s")
