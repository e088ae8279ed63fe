"""What is left behind when a sandbox stops, is revoked, or never starts: nothing.

- Stopping or revoking an agent stops its sandbox and removes its credential
  files from the host (every backend present here).
- A container that crashes before its command runs, and a launch while the
  runtime is down, are each a clear error to the caller (the ``Launcher``,
  or an agent asking ``host.launcher``), with no sandbox, no credential file
  and no active registration left. (A command that does not exist and an
  image that does not exist: ``test_launcher_docker.py`` and
  ``test_launcher_microvm.py``; an agent that crashes once started is reaped:
  ``test_launcher_service.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from agent_sdk import AgentClient
from agent_sdk.errors import AgentNotFoundError, SandboxError
from agent_sdk.names import Tier
from broker_gateway.gateway import Gateway
from broker_gateway.keys import write_secret
from broker_gateway.state import StateDir
from launchers.backend import BackendName, Sandbox
from launchers.host_relay import relay_alive
from launchers.launch import Launcher, LaunchRequest
from launchers.processes import process_alive
from launchers.revocation_watch import watch_revocations
from launchers.service import serve
from tests.helpers import SymbiUp
from tests.test_launcher_docker import leftovers, unique
from tests.test_launcher_e2e import DOCKER_REASON, GVISOR_REASON, VM_REASON
from tests.test_launcher_process import _skip_reason as _process_skip_reason

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(300)]

needs_docker = pytest.mark.skipif(DOCKER_REASON is not None, reason=DOCKER_REASON or "")
needs_gvisor = pytest.mark.skipif(GVISOR_REASON is not None, reason=GVISOR_REASON or "")
needs_vm = pytest.mark.skipif(VM_REASON is not None, reason=VM_REASON or "")
PROCESS_REASON = _process_skip_reason()
needs_bwrap = pytest.mark.skipif(PROCESS_REASON is not None, reason=PROCESS_REASON or "")

CONTAINERS = [
    pytest.param("docker", "docker", marks=needs_docker),
    pytest.param("gvisor", "gvisor", marks=needs_gvisor),
]
EVERY_BACKEND = [
    *CONTAINERS,
    pytest.param("firecracker", "microvm", marks=[needs_vm, pytest.mark.slow]),
    pytest.param("docker", "process", marks=needs_bwrap),
]
SLEEPER = ("python3", "-c", "import time; print('up', flush=True); time.sleep(600)")
NOT_A_SOCKET = "unix:///nonexistent/docker.sock"


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbiUp]:
    """``symbi up`` with policy workers, without launcher services (the tests run their own)."""
    up = SymbiUp(tmp_path_factory.mktemp("state"), workers=2)
    up.start()
    yield up
    assert up.stop() == 0, "".join(up.output)


@pytest.fixture
async def gateway(bus: SymbiUp) -> AsyncIterator[Gateway]:
    gw = await Gateway.connect(StateDir.open(bus.state_dir, create=False), bus.url)
    yield gw
    await gw.close()


@pytest.fixture
def launcher(bus: SymbiUp, gateway: Gateway) -> Launcher:
    return Launcher(StateDir.open(bus.state_dir, create=False), gateway)


def seed_of(root: Path) -> bytes:
    creds = (root / "launch" / "agent.creds").read_text()
    return next(line for line in creds.splitlines() if line.startswith("SU")).encode()


def files_holding(directory: Path, secret: bytes) -> list[Path]:
    """Every file under ``directory`` whose bytes contain ``secret``."""
    found = []
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(path)
    return found


def sandbox_running(sandbox: Sandbox) -> bool:
    if sandbox.backend in ("docker", "gvisor"):
        with contextlib.closing(docker.from_env()) as client:
            return leftovers(client, sandbox.tier, sandbox.agent_id) != []
    if sandbox.backend == "process":
        socket = Path(sandbox.details["relay_socket"])
        return process_alive(int(sandbox.details["pid"]), str(sandbox.dirs.launch)) or relay_alive(
            int(sandbox.details["relay_pid"]), socket
        )
    return process_alive(int(sandbox.details["pid"]), sandbox.name)


@pytest.mark.parametrize("how", ["stop", "revoke"])
@pytest.mark.parametrize(("tier", "backend"), EVERY_BACKEND)
async def test_stopping_or_revoking_removes_the_sandbox_and_its_credentials(
    tier: Tier, backend: BackendName, how: str, bus: SymbiUp, launcher: Launcher
) -> None:
    agent_id = unique(how)
    sandbox = await launcher.launch(LaunchRequest(tier, agent_id, SLEEPER, backend))
    seed = seed_of(sandbox.root)
    assert files_holding(bus.state_dir, seed) != []
    assert sandbox_running(sandbox)
    gateway = launcher.require_gateway()
    started = time.monotonic()
    if how == "stop":
        await launcher.stop(tier, agent_id, timeout=2)
    else:
        ready = asyncio.Event()
        watch = asyncio.create_task(watch_revocations(launcher, [tier], ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            await gateway.revoke_agent(tier, agent_id)
            for _ in range(200):
                if not sandbox.root.exists():
                    break
                await asyncio.sleep(0.05)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
    took = time.monotonic() - started
    assert not sandbox.root.exists()
    assert files_holding(bus.state_dir, seed) == []
    assert not sandbox_running(sandbox)
    assert (await (await gateway.registry()).get(f"{tier}.{agent_id}")).status == "revoked"
    print(f"{backend}: {how} to sandbox and credentials gone: {took:.2f} s")


# -- a container that crashes before its command runs ----------------------------


@pytest.fixture(scope="module")
def image_without_python() -> Iterator[str]:
    """An image whose root holds nothing: the sandbox's init (python3) cannot start."""
    tag = f"symbi/test-no-python:{unique('t')}"
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("etc")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    with contextlib.closing(docker.from_env()) as client:
        repository, _, version = tag.partition(":")
        client.api.import_image_from_data(data.getvalue(), repository=repository, tag=version)
        yield tag
        with contextlib.suppress(docker.errors.DockerException):
            client.images.remove(tag, force=True)


@pytest.mark.parametrize(("tier", "backend"), CONTAINERS)
async def test_a_container_that_crashes_at_start_is_a_clear_error(
    tier: Tier, backend: BackendName, bus: SymbiUp, launcher: Launcher, image_without_python: str
) -> None:
    agent_id = unique("crash")
    with pytest.raises(SandboxError, match="python3") as info:
        await launcher.launch(
            LaunchRequest(tier, agent_id, ("true",), backend, image=image_without_python)
        )
    assert f"symbi-{tier}-{agent_id}" in str(info.value)
    with contextlib.closing(docker.from_env()) as client:
        assert leftovers(client, tier, agent_id) == []
    assert not launcher.root(tier, agent_id).exists()
    registry = await launcher.require_gateway().registry()
    assert (await registry.get(f"{tier}.{agent_id}")).status == "revoked"
    print(f"{backend}: {info.value}")


# -- a launch while the runtime is down ------------------------------------------


RUNTIME_DOWN = [
    pytest.param("docker", "docker", "DOCKER_HOST", "Docker is not reachable", marks=needs_docker),
    pytest.param("gvisor", "gvisor", "DOCKER_HOST", "Docker is not reachable", marks=needs_gvisor),
    pytest.param("firecracker", "microvm", "PATH", "qemu-system-x86_64 not found", marks=needs_vm),
]


@pytest.mark.parametrize(("tier", "backend", "variable", "message"), RUNTIME_DOWN)
async def test_a_launch_while_the_runtime_is_down_leaves_nothing(
    tier: Tier,
    backend: BackendName,
    variable: str,
    message: str,
    bus: SymbiUp,
    gateway: Gateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(variable, NOT_A_SOCKET if variable == "DOCKER_HOST" else str(tmp_path))
    assert variable != "PATH" or shutil.which("qemu-system-x86_64") is None
    launcher = Launcher(StateDir.open(bus.state_dir, create=False), gateway)
    agent_id = unique("down")
    with pytest.raises(SandboxError, match=message):
        await launcher.launch(LaunchRequest(tier, agent_id, SLEEPER, backend))
    assert not launcher.root(tier, agent_id).exists()
    with pytest.raises(AgentNotFoundError):  # refused before anything was minted
        await (await gateway.registry()).get(f"{tier}.{agent_id}")


@needs_docker
async def test_the_launcher_service_answers_a_launch_while_docker_is_down(
    bus: SymbiUp, gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NOT_A_SOCKET)
    state = StateDir.open(bus.state_dir, create=False)
    stop = asyncio.Event()
    service = asyncio.create_task(serve(state, bus.url, ["docker"], stop=stop))
    boss_id, child = unique("boss"), unique("child")
    creds = await gateway.register_agent("docker", boss_id, capabilities=("control", "rpc"))
    write_secret(tmp_path / "agent.creds", creds.creds)
    write_secret(tmp_path / "agent.json", json.dumps(creds.info))
    try:
        async with await AgentClient.connect(tmp_path) as boss:
            request = {"op": "launch", "id": child, "command": list(SLEEPER)}
            answer = await boss.request(
                "host.launcher", json.dumps(request).encode(), level="restricted", timeout=60
            )
        body: dict[str, Any] = json.loads(answer.payload)
    finally:
        stop.set()
        await service
    assert answer.sender == "docker.launcher"
    assert (body["ok"], body["error"]) == (False, "failed")
    assert "Docker is not reachable" in body["detail"]
    assert not (bus.state_dir / "sandboxes" / f"docker.{child}").exists()
    with pytest.raises(AgentNotFoundError):
        await (await gateway.registry()).get(f"docker.{child}")


async def test_a_launcher_that_lost_its_identity_still_stops_sandboxes(
    bus: SymbiUp, caplog: pytest.LogCaptureFixture
) -> None:
    """It cannot answer any more, but it neither dies (to be restarted in a loop) nor idles."""
    state = StateDir.open(bus.state_dir, create=False)
    for attempt in range(2):
        stop = asyncio.Event()
        service = asyncio.create_task(serve(state, bus.url, ["firecracker"], stop=stop))
        await asyncio.sleep(2)
        assert not service.done()
        stop.set()
        await service
        if attempt == 0:  # registered: now lose its files
            identity = bus.state_dir / "launchers" / "firecracker" / "identity"
            assert (identity / "agent.creds").is_file()
            shutil.rmtree(identity)
    assert "firecracker launcher cannot serve control messages" in caplog.text
    assert "firecracker.launcher is registered but its files are missing" in caplog.text
