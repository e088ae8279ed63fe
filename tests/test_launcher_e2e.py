"""Agents in real sandboxes talking through real policy workers, end to end.

Every agent program here imports ``agent_sdk`` from the agent image (or the
micro-VM root disk): only its ``main.py`` is mounted at ``/app``. Messages go
agent -> outbox -> INGRESS -> a policy worker (checks, audit) -> the
recipient's durable inbox, and the agents verify what they receive.
"""

from __future__ import annotations

import contextlib
import hashlib
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import nats
import pytest
from nats.js.errors import NotFoundError

from agent_sdk.errors import SandboxError
from agent_sdk.names import Tier
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from launchers.backend import BackendName
from launchers.launch import Launcher, LaunchRequest
from tests.helpers import AuditLog, SymbiUp
from tests.launcher_support import (
    host_ip,
    host_listener,
    line_json,
    output_of,
    stale_image_reason,
    stale_rootfs_reason,
)
from tests.test_launcher_docker import _docker_skip_reason, unique
from tests.test_launcher_microvm import _skip_reason as _microvm_skip_reason


def _image_reason(runtime: str | None = None) -> str | None:
    reason = _docker_skip_reason(runtime)
    if reason is None:
        with contextlib.closing(docker.from_env(timeout=10)) as client:
            reason = stale_image_reason(client)
    return reason


def _vm_reason() -> str | None:
    return _microvm_skip_reason() or stale_rootfs_reason() or _image_reason()


DOCKER_REASON = _image_reason()
GVISOR_REASON = _image_reason("runsc")
VM_REASON = _vm_reason()
needs_docker = pytest.mark.skipif(DOCKER_REASON is not None, reason=DOCKER_REASON or "")
needs_gvisor = pytest.mark.skipif(GVISOR_REASON is not None, reason=GVISOR_REASON or "")
needs_vm = pytest.mark.skipif(VM_REASON is not None, reason=VM_REASON or "")

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(420)]

RESPONDER = textwrap.dedent(
    """
    import asyncio
    from agent_sdk import AgentClient

    async def main():
        async with await AgentClient.connect() as client:
            print("ready", flush=True)
            async for msg in client.messages():
                if msg.is_request:
                    await client.reply(msg, b"4, you asked " + msg.payload)
                elif msg.type == "data":
                    await client.send(msg.sender, b"pong: " + msg.payload, level=msg.level)
                print(f"answered {msg.type} {msg.id} from {msg.sender}", flush=True)

    asyncio.run(main())
    """
)

REQUESTER = textwrap.dedent(
    """
    import asyncio, json, os
    from agent_sdk import AgentClient

    async def main():
        peer = os.environ["PEER"]
        async with await AgentClient.connect() as client:
            if os.environ["MODE"] == "rpc":
                answer = await client.request(peer, b"2+2?", level="restricted", timeout=240)
                request_id = answer.reply_to
            else:
                request_id = await client.send(peer, b"ping", level="restricted")
                async with asyncio.timeout(240), client.messages() as stream:
                    async for answer in stream:
                        if answer.sender == peer:
                            break
            print("result " + json.dumps({
                "request": request_id, "answer": answer.id, "from": answer.sender,
                "type": answer.type, "payload": answer.payload.decode(),
                "sender_key": answer.sender_key,
            }), flush=True)

    asyncio.run(main())
    """
)

PROBE = textwrap.dedent(
    """
    import asyncio, errno, hashlib, json, os, socket
    import nats

    def tcp(target):
        host, _, port = target.rpartition(":")
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((host, int(port)))
            return "connected"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else "timeout"
        finally:
            s.close()

    def unix(path):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return "connected"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, type(exc).__name__)
        finally:
            s.close()

    def seeds(own):
        paths = [p for p in os.environ["OTHER_CREDS"].split(",") if p]
        for top in ("/run", "/tmp", "/app", "/opt", "/home", "/var", "/srv", "/mnt", "/root",
                    "/etc", "/media"):
            for folder, _, names in os.walk(top):
                paths.extend(os.path.join(folder, n) for n in names)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            paths += [f"/proc/{pid}/environ", f"/proc/{pid}/cmdline"]
        found, refused = {}, {}
        for path in paths:
            try:
                with open(path, "rb") as f:
                    data = f.read(1 << 16)
            except OSError as exc:
                if path in os.environ["OTHER_CREDS"].split(","):
                    refused[path] = errno.errorcode.get(exc.errno, str(exc))
                continue
            for word in data.replace(b"\\0", b"\\n").split():
                if word.startswith(b"SU") and len(word) == 58:  # an nkey user seed
                    found.setdefault(hashlib.sha256(word).hexdigest(), []).append(path)
        return found, refused

    async def main():
        d = os.environ["SYMBIONT_AGENT_DIR"]
        info = json.load(open(os.path.join(d, "agent.json")))
        found, refused = seeds(os.path.join(d, "agent.creds"))
        ports = {t: tcp(t) for t in os.environ["HOST_TARGETS"].split(",")}
        sockets = {p: unix(p) for p in ("/var/run/docker.sock", "/run/docker.sock")}
        errors = []

        async def on_error(exc):
            errors.append(str(exc))

        nc = await nats.connect(
            info["nats_url"], user_credentials=os.path.join(d, "agent.creds"),
            inbox_prefix=info["inbox_prefix"].encode(), error_cb=on_error,
            max_reconnect_attempts=0,
        )
        ack = await nc.jetstream().publish(info["outbox"], b"not an envelope")
        refused_subjects = {}
        for subject in os.environ["FOREIGN_SUBJECTS"].split(","):
            before = len(errors)
            if subject.endswith(".in"):
                await nc.subscribe(subject)
            else:
                await nc.publish(subject, b"forged")
            await nc.flush()
            for _ in range(40):
                if len(errors) > before:
                    break
                await asyncio.sleep(0.05)
            refused_subjects[subject] = errors[before:]
        print("probe " + json.dumps({
            "address": info["address"], "own_outbox": ack.stream, "seeds": found,
            "refused_files": refused, "ports": ports, "sockets": sockets,
            "subjects": refused_subjects, "connected": nc.is_connected,
        }), flush=True)
        await nc.close()

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbiUp]:
    """``symbi up`` with two real policy workers (overrides conftest's worker-less bus)."""
    up = SymbiUp(tmp_path_factory.mktemp("state"), workers=2)
    up.start()
    yield up
    assert up.stop() == 0, "".join(up.output)


@pytest.fixture
async def launcher(bus: SymbiUp) -> AsyncIterator[Launcher]:
    state = StateDir.open(bus.state_dir, create=False)
    gateway = await Gateway.connect(state, bus.url)
    try:
        yield Launcher(state, gateway)
    finally:
        await gateway.close()


@pytest.fixture
async def audit(bus: SymbiUp) -> AsyncIterator[AuditLog]:
    nc = await nats.connect(bus.url, user_credentials=str(bus.state_dir / "creds" / "router.creds"))
    log = await AuditLog().start(nc)
    try:
        yield log
    finally:
        await log.stop()
        await nc.close()


def app(tmp_path: Path, name: str, program: str) -> Path:
    directory = tmp_path / name
    directory.mkdir(mode=0o755)
    (directory / "main.py").write_text(program)
    (directory / "main.py").chmod(0o644)
    return directory


class Sandboxes:
    """Launches agents for one test and stops whatever is left at the end."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.started: list[tuple[str, str]] = []

    async def launch(
        self,
        tier: Tier,
        prefix: str,
        backend: BackendName,
        app_dir: Path | None = None,
        command: tuple[str, ...] = ("python3", "/app/main.py"),
        **env: str,
    ) -> str:
        agent_id = unique(prefix)
        self.started.append((tier, agent_id))
        await self.launcher.launch(
            LaunchRequest(
                tier,
                agent_id,
                command,
                backend,
                app_dir=app_dir,
                env=env,
                capabilities=("rpc",),
            )
        )
        return agent_id

    async def stop_all(self) -> None:
        for tier, agent_id in self.started:
            with contextlib.suppress(SandboxError):
                await self.launcher.stop(tier, agent_id, timeout=2)


@pytest.fixture
async def sandboxes(launcher: Launcher) -> AsyncIterator[Sandboxes]:
    found = Sandboxes(launcher)
    try:
        yield found
    finally:
        await found.stop_all()


async def answered(
    launcher: Launcher, audit: AuditLog, agents: tuple[tuple[str, str], ...], timeout: float
) -> str:
    """The requester's (first agent's) output once it has its result, else explain why not."""
    try:
        return await output_of(launcher, *agents[0], "result ", timeout)
    except AssertionError:
        raise AssertionError(explain(launcher, audit, *agents)) from None


def explain(launcher: Launcher, audit: AuditLog, *agents: tuple[str, str]) -> str:
    """The agents' output and the audit records, for a failure message."""
    parts = [
        f"--- {tier}.{agent_id}:\n"
        + b"".join(launcher.logs(tier, agent_id)).decode(errors="replace")
        for tier, agent_id in agents
    ]
    parts += ["--- audit:", *(str(r) for r in audit.records)]
    return "\n".join(parts)


async def check_audited(audit: AuditLog, result: dict[str, Any], sender: str, peer: str) -> None:
    """Both messages of the exchange passed a worker and were audited ``ok``."""
    (request,) = await audit.wait(id=result["request"], decision="allow")
    (answer,) = await audit.wait(id=result["answer"], decision="allow")
    assert (request["from"], request["to"], request["reason"]) == (sender, peer, "ok")
    assert (answer["from"], answer["to"], answer["reason"]) == (peer, sender, "ok")
    assert request["worker"] and answer["worker"]


@needs_gvisor
async def test_docker_agent_calls_a_gvisor_agent_over_rpc(
    tmp_path: Path, sandboxes: Sandboxes, launcher: Launcher, audit: AuditLog
) -> None:
    started = time.monotonic()
    server = await sandboxes.launch("gvisor", "rpc-srv", "gvisor", app(tmp_path, "s", RESPONDER))
    client = await sandboxes.launch(
        "docker", "rpc-cli", "docker", app(tmp_path, "c", REQUESTER),
        PEER=f"gvisor.{server}", MODE="rpc",
    )  # fmt: skip
    agents = (("docker", client), ("gvisor", server))
    result = line_json(await answered(launcher, audit, agents, 240), "result ")
    elapsed = time.monotonic() - started
    assert await launcher.wait("docker", client, timeout=30) == 0  # and it closed cleanly
    assert result["from"] == f"gvisor.{server}"
    assert result["type"] == "rpc"
    assert result["payload"] == "4, you asked 2+2?"
    await check_audited(audit, result, f"docker.{client}", f"gvisor.{server}")
    served = await output_of(launcher, "gvisor", server, f"answered rpc {result['request']}")
    assert f"from docker.{client}" in served
    print(f"docker -> gvisor rpc, both sandboxes started and answered: {elapsed:.1f} s")


@pytest.mark.slow
@needs_vm
async def test_microvm_agent_answers_a_docker_agent(
    tmp_path: Path, sandboxes: Sandboxes, launcher: Launcher, audit: AuditLog
) -> None:
    started = time.monotonic()
    vm = await sandboxes.launch("firecracker", "vm-srv", "microvm", app(tmp_path, "s", RESPONDER))
    booted = time.monotonic() - started
    client = await sandboxes.launch(
        "docker", "vm-cli", "docker", app(tmp_path, "c", REQUESTER),
        PEER=f"firecracker.{vm}", MODE="data",
    )  # fmt: skip
    agents = (("docker", client), ("firecracker", vm))
    result = line_json(await answered(launcher, audit, agents, 300), "result ")
    assert await launcher.wait("docker", client, timeout=30) == 0  # and it closed cleanly
    assert (result["from"], result["type"]) == (f"firecracker.{vm}", "data")
    assert result["payload"] == "pong: ping"
    await check_audited(audit, result, f"docker.{client}", f"firecracker.{vm}")
    print(
        f"docker -> micro-VM data and back: VM started in {booted:.1f} s, "
        f"exchange done after {time.monotonic() - started:.1f} s"
    )


PROBE_PARAMS = [
    pytest.param("docker", "docker", marks=needs_docker),
    pytest.param("gvisor", "gvisor", marks=needs_gvisor),
    pytest.param("firecracker", "microvm", marks=[needs_vm, pytest.mark.slow]),
]


@pytest.mark.parametrize(("tier", "backend"), PROBE_PARAMS)
async def test_inside_the_sandbox_only_nats_and_only_its_own_subjects(
    tier: Tier,
    backend: BackendName,
    tmp_path: Path,
    bus: SymbiUp,
    sandboxes: Sandboxes,
    launcher: Launcher,
) -> None:
    if DOCKER_REASON is not None:  # the neighbour whose credentials it looks for
        pytest.skip(DOCKER_REASON)
    neighbour = await sandboxes.launch("docker", "neighbour", "docker", command=("sleep", "600"))
    neighbour_creds = launcher.root("docker", neighbour) / "launch" / "agent.creds"
    neighbour_seed = next(
        line for line in neighbour_creds.read_text().splitlines() if line.startswith("SU")
    )
    gateway = launcher.require_gateway()
    bridge = "172.17.0.1"
    targets = {f"{ip}:{port}" for ip in ("127.0.0.1", bridge, "10.0.2.2", "10.0.2.100")
               for port in ("LISTENER", bus.nats_port, bus.http_port)}  # fmt: skip
    targets |= {"10.0.2.3:53", "1.1.1.1:53", "8.8.8.8:443"}
    if (ip := host_ip()) is not None:
        targets |= {f"{ip}:LISTENER", f"{ip}:{bus.nats_port}", f"{ip}:{bus.http_port}"}
    foreign = [
        f"tier.{tier}.agent.{neighbour}-twin.out",  # another agent of its own tier
        f"tier.docker.agent.{neighbour}.out",  # the neighbour's outbox
        f"tier.docker.agent.{neighbour}.in",  # the neighbour's inbox (subscribe)
        f"tier.{tier}.agent.{neighbour}-twin.in",
        "audit.allow.docker.docker",
        "host.launcher.in",
        "$KV.symbi_registry.docker.x",
        "$JS.API.STREAM.LIST",
    ]
    async with host_listener() as listener:
        probe = await sandboxes.launch(
            tier, "probe", backend, app(tmp_path, "p", PROBE),
            HOST_TARGETS=",".join(sorted(targets)).replace("LISTENER", str(listener.port)),
            # Its host path, and the same path relative to its own credentials' mount.
            OTHER_CREDS=f"{neighbour_creds},/run/symbi/../../docker.{neighbour}/launch/agent.creds",
            FOREIGN_SUBJECTS=",".join(foreign),
        )  # fmt: skip
        report = line_json(await output_of(launcher, tier, probe, "probe ", 300), "probe ")
        assert listener.accepted == []
    own_seed = next(
        line
        for line in (launcher.root(tier, probe) / "launch" / "agent.creds").read_text().splitlines()
        if line.startswith("SU")
    )
    assert report["address"] == f"{tier}.{probe}"
    assert report["own_outbox"] == "INGRESS" and report["connected"]
    # Only its own seed is readable anywhere it can look.
    assert set(report["seeds"]) == {hashlib.sha256(own_seed.encode()).hexdigest()}
    assert hashlib.sha256(neighbour_seed.encode()).hexdigest() not in report["seeds"]
    assert set(report["refused_files"].values()) <= {"ENOENT", "EACCES"}
    assert all(state != "connected" for state in report["ports"].values()), report["ports"]
    assert all(state != "connected" for state in report["sockets"].values()), report["sockets"]
    for subject, errors in report["subjects"].items():
        assert any("permissions violation" in e for e in errors), (subject, errors)
    # The server, not the client, refused them: nothing forged reached the bus.
    with pytest.raises(NotFoundError):
        await gateway.js.get_last_msg("INGRESS", f"tier.docker.agent.{neighbour}.out")
