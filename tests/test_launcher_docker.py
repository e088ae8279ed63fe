"""The docker and gvisor backends against a real dockerd, runsc and ``symbi up``.

Each agent is a small nats.py program inside the agent image that reports what
it sees (its credential files, its network interfaces, whether it can dial out
directly), connects with its credentials through the relay, publishes to its
outbox through JetStream and prints what arrives on its inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import nats
import pytest

from agent_sdk.errors import AgentNotFoundError, SandboxError
from agent_sdk.names import Tier
from broker_gateway.gateway import Gateway
from broker_gateway.registry import Registry
from broker_gateway.state import StateDir
from launchers.backend import AGENT_UID, BackendName, Limits
from launchers.docker_backend import LABEL
from launchers.gvisor_backend import PIDS_OVERHEAD
from launchers.launch import Launcher, LaunchRequest
from launchers.paths import DEFAULT_IMAGE
from launchers.revocation_watch import watch_revocations
from launchers.service import serve
from tests.helpers import SymbiUp


def _docker_skip_reason(runtime: str | None = None) -> str | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        return f"dockerd not reachable ({type(exc).__name__}): run scripts/setup-sandboxes docker"
    try:
        with contextlib.closing(client):
            client.images.get(DEFAULT_IMAGE)
            if runtime is not None and runtime not in (client.info().get("Runtimes") or {}):
                return f"dockerd has no {runtime} runtime: run scripts/setup-sandboxes gvisor"
    except docker.errors.ImageNotFound:
        return f"image {DEFAULT_IMAGE} missing: run scripts/setup-sandboxes docker"
    if os.geteuid() != 0:
        return "the docker backend hands credentials to uid 10001, which needs root"
    return None


BACKEND_PARAMS = [
    pytest.param(
        "docker",
        marks=pytest.mark.skipif(
            (reason := _docker_skip_reason()) is not None, reason=reason or ""
        ),
    ),
    pytest.param(
        "gvisor",
        marks=pytest.mark.skipif(
            (reason_g := _docker_skip_reason("runsc")) is not None, reason=reason_g or ""
        ),
    ),
]

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(240)]

AGENT_PROGRAM = textwrap.dedent(
    """
    import asyncio, errno, json, os, signal, socket, stat, sys
    import nats

    def report(**kw):
        print("report " + json.dumps(kw), flush=True)

    async def main():
        d = os.environ["SYMBIONT_AGENT_DIR"]
        info = json.load(open(os.path.join(d, "agent.json")))
        files = {}
        for name in ("agent.creds", "agent.json"):
            st = os.stat(os.path.join(d, name))
            files[name] = [oct(stat.S_IMODE(st.st_mode)), st.st_uid]
        try:
            open(os.path.join(d, "agent.json"), "a").close()
            writable = True
        except OSError:
            writable = False
        direct = {}
        for target in os.environ["PROBE_TARGETS"].split(","):
            host, _, port = target.rpartition(":")
            port = int(port)
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((host, port))
                direct[host] = "connected"
            except OSError as exc:
                direct[host] = errno.errorcode.get(exc.errno, str(exc))
            finally:
                s.close()
        try:
            open("/probe", "w").close()
            rootfs_writable = True
        except OSError:
            rootfs_writable = False
        report(
            uid=os.getuid(), files=files, creds_writable=writable, direct=direct,
            ifaces=sorted(n for _, n in socket.if_nameindex()), nats_url=info["nats_url"],
            env_has_secret=any("SEED" in v or "eyJ" in v for v in os.environ.values()),
            argv=sys.argv, rootfs_writable=rootfs_writable,
        )
        nc = await nats.connect(
            info["nats_url"], user_credentials=os.path.join(d, "agent.creds"),
            inbox_prefix=info["inbox_prefix"].encode(), max_reconnect_attempts=0,
        )
        got = asyncio.Event()
        async def on_msg(msg):
            print("got " + msg.data.decode(), flush=True)
            got.set()
        await nc.subscribe(info["inbox"], cb=on_msg)
        ack = await nc.jetstream().publish(info["outbox"], b"hello from the sandbox")
        print(f"connected stream={ack.stream}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await nc.close()
        print("bye", flush=True)

    asyncio.run(main())
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    (app / "agent.py").write_text(AGENT_PROGRAM)
    app.chmod(0o755)
    (app / "agent.py").chmod(0o644)
    return app


@pytest.fixture
async def launcher(bus: SymbiUp) -> AsyncIterator[Launcher]:
    state = StateDir.open(bus.state_dir, create=False)
    gateway = await Gateway.connect(state, bus.url)
    try:
        yield Launcher(state, gateway)
    finally:
        await gateway.close()


@pytest.fixture
def client() -> Iterator[Any]:
    c = docker.from_env()
    yield c
    c.close()


async def wait_log(
    launcher: Launcher, tier: str, agent_id: str, needle: str, timeout: float = 60
) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = b"".join(launcher.logs(tier, agent_id)).decode(errors="replace")
        if needle in text:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {needle!r} in the agent's output:\n{text}")


async def wait_revoked(registry: Registry, address: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if (await registry.get(address)).status == "revoked":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{address} is still active")


def unique(prefix: str) -> str:
    """Docker is host-wide: concurrent test runs must not share container names."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def report_of(text: str) -> dict[str, Any]:
    line = next(line for line in text.splitlines() if line.startswith("report "))
    report: dict[str, Any] = json.loads(line.removeprefix("report "))
    return report


def leftovers(client: Any, tier: str, agent_id: str) -> list[str]:
    return [
        c.name
        for c in client.containers.list(
            all=True, filters={"label": f"{LABEL}=symbi-{tier}-{agent_id}"}
        )
    ]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
async def test_agent_runs_hardened_and_talks_through_the_relay(
    backend: BackendName, bus: SymbiUp, launcher: Launcher, app_dir: Path, client: Any
) -> None:
    tier: Tier = "docker" if backend == "docker" else "gvisor"
    agent_id = unique(f"relay-{backend}")
    started = time.monotonic()
    sandbox = await launcher.launch(
        LaunchRequest(
            tier=tier,
            agent_id=agent_id,
            command=("python3", "/app/agent.py"),
            backend=backend,
            app_dir=app_dir,
            # The host's NATS through the docker bridge, and the internet.
            env={"PROBE_TARGETS": f"172.17.0.1:{bus.nats_port},1.1.1.1:53"},
            limits=Limits(memory_mb=256, cpus=0.5, pids=64),
        )
    )
    start_s = time.monotonic() - started
    root = sandbox.root
    try:
        text = await wait_log(launcher, tier, agent_id, "connected stream=INGRESS")
        report = report_of(text)
        assert report["uid"] == AGENT_UID
        assert report["files"] == {
            "agent.creds": ["0o600", AGENT_UID],
            "agent.json": ["0o600", AGENT_UID],
        }
        assert report["creds_writable"] is False
        assert report["rootfs_writable"] is False
        assert report["ifaces"] == ["lo"]
        assert all(v != "connected" for v in report["direct"].values()), report["direct"]
        assert report["nats_url"] == "nats://127.0.0.1:4222"
        assert report["env_has_secret"] is False
        assert not any("creds" in a and a != "/app/agent.py" for a in report["argv"])

        # The container's configuration, as Docker reports it.
        attrs = client.containers.get(f"symbi-{tier}-{agent_id}").attrs
        host = attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert host["NetworkMode"] == "none"
        assert host["Memory"] == 256 * 1024 * 1024
        assert host["NanoCpus"] == 500_000_000
        assert host["PidsLimit"] == 64 + (PIDS_OVERHEAD if backend == "gvisor" else 0)
        assert host["Privileged"] is False
        assert "/tmp" in host["Tmpfs"]
        assert host["Runtime"] == ("runsc" if backend == "gvisor" else "runc")
        assert attrs["Config"]["User"] == f"{AGENT_UID}:{AGENT_UID}"
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert set(mounts) == {"/run/symbi", "/run/symbi-net", "/opt/symbi/sandbox_init.py", "/app"}
        assert all(m["RW"] is False for m in mounts.values())
        env = "\n".join(attrs["Config"]["Env"])
        cmd = " ".join(attrs["Config"]["Entrypoint"] + attrs["Config"]["Cmd"])
        creds_text = (root / "launch" / "agent.creds").read_text()
        seed_line = next(line for line in creds_text.splitlines() if line.startswith("SU"))
        assert seed_line not in env and seed_line not in cmd

        # From the bus to the agent's inbox, through the tier account's import.
        router = await nats.connect(
            bus.url, user_credentials=str(bus.state_dir / "creds" / "router.creds")
        )
        try:
            await router.publish(f"tier.{tier}.agent.{agent_id}.in", b"hello agent")
            await router.flush()
        finally:
            await router.close()
        await wait_log(launcher, tier, agent_id, "got hello agent")
        assert launcher.status(sandbox).state == "running"
    finally:
        await launcher.stop(tier, agent_id)
    assert leftovers(client, tier, agent_id) == []
    assert not root.exists()
    record = await (await launcher.require_gateway().registry()).get(f"{tier}.{agent_id}")
    assert record.status == "revoked"
    print(f"{backend}: launch to running command {start_s:.2f} s")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
async def test_missing_command_is_a_clear_error_and_leaves_nothing(
    backend: BackendName, launcher: Launcher, client: Any
) -> None:
    tier: Tier = "docker" if backend == "docker" else "gvisor"
    agent_id = unique(f"nocmd-{backend}")
    with pytest.raises(SandboxError, match="cannot run 'no-such-program'"):
        await launcher.launch(
            LaunchRequest(tier, agent_id, ("no-such-program", "--flag"), backend=backend)
        )
    assert leftovers(client, tier, agent_id) == []
    assert not launcher.root(tier, agent_id).exists()
    record = await (await launcher.require_gateway().registry()).get(f"{tier}.{agent_id}")
    assert record.status == "revoked"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
async def test_missing_image_is_refused_before_registering(
    backend: BackendName, launcher: Launcher, client: Any
) -> None:
    tier: Tier = "docker" if backend == "docker" else "gvisor"
    agent_id = unique(f"noimage-{backend}")
    with pytest.raises(SandboxError, match="image 'symbi/no-such-image:1' not found"):
        await launcher.launch(
            LaunchRequest(tier, agent_id, ("true",), backend=backend, image="symbi/no-such-image:1")
        )
    assert leftovers(client, tier, agent_id) == []
    assert not launcher.root(tier, agent_id).exists()
    with pytest.raises(AgentNotFoundError):
        await (await launcher.require_gateway().registry()).get(f"{tier}.{agent_id}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
async def test_exit_status_and_logs_after_the_agent_exits(
    backend: BackendName, launcher: Launcher, client: Any
) -> None:
    tier: Tier = "docker" if backend == "docker" else "gvisor"
    agent_id = unique(f"exit-{backend}")
    await launcher.launch(
        LaunchRequest(
            tier, agent_id, ("python3", "-c", "print('done here'); raise SystemExit(3)"), backend
        )
    )
    try:
        assert await launcher.wait(tier, agent_id, timeout=60) == 3
        out = b"".join(launcher.logs(tier, agent_id)).decode()
        assert "done here" in out
        sandbox = launcher.sandbox(tier, agent_id)
        assert launcher.status(sandbox).state == "exited"
        assert launcher.status(sandbox).exit_code == 3
        reaped = await launcher.reap()
        assert [s.agent_id for s in reaped] == [agent_id]
    finally:
        with contextlib.suppress(SandboxError):
            await launcher.stop(tier, agent_id)
    assert leftovers(client, tier, agent_id) == []
    assert not launcher.root(tier, agent_id).exists()


@pytest.mark.parametrize("backend", BACKEND_PARAMS[:1])
async def test_revoking_the_agent_stops_its_sandbox(
    backend: BackendName, launcher: Launcher, client: Any
) -> None:
    agent_id = unique("revoked")
    sandbox = await launcher.launch(
        LaunchRequest("docker", agent_id, ("sleep", "600"), backend=backend)
    )
    ready = asyncio.Event()
    watch = asyncio.create_task(watch_revocations(launcher, ["docker"], ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        assert leftovers(client, "docker", agent_id) != []
        revoked_at = time.monotonic()
        await launcher.require_gateway().revoke_agent("docker", agent_id)
        for _ in range(200):
            if not sandbox.root.exists():
                break
            await asyncio.sleep(0.1)
        assert not sandbox.root.exists()
        assert leftovers(client, "docker", agent_id) == []
        print(f"revocation to sandbox gone: {time.monotonic() - revoked_at:.2f} s")
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        with contextlib.suppress(SandboxError):
            await launcher.stop("docker", agent_id)


@pytest.mark.parametrize("backend", BACKEND_PARAMS[:1])
async def test_the_service_reaps_exited_agents(
    backend: BackendName, bus: SymbiUp, launcher: Launcher, client: Any
) -> None:
    stop = asyncio.Event()
    service = asyncio.create_task(
        serve(launcher.state, bus.url, ["docker"], reap_interval=0.2, stop=stop)
    )
    agent_id = unique("reaped")
    try:
        sandbox = await launcher.launch(
            LaunchRequest("docker", agent_id, ("python3", "-c", "print('short life')"), backend)
        )
        for _ in range(100):
            if not sandbox.root.exists():
                break
            await asyncio.sleep(0.1)
        assert not sandbox.root.exists()
        assert leftovers(client, "docker", agent_id) == []
        # Files first, then the revocation (a round trip to the gateway of `symbi up`).
        registry = await launcher.require_gateway().registry()
        await wait_revoked(registry, f"docker.{agent_id}")
    finally:
        stop.set()
        await service
