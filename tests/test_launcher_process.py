"""The process backend (bubblewrap, development only) against a real ``symbi up``."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from launchers.backend import AGENT_UID
from launchers.host_relay import relay_alive
from launchers.launch import Launcher, LaunchRequest
from launchers.process_backend import process_rootfs
from launchers.processes import process_alive
from tests.helpers import SymbiUp
from tests.test_launcher_docker import AGENT_PROGRAM, report_of, unique, wait_log


def _skip_reason() -> str | None:
    if shutil.which("bwrap") is None:
        return "bwrap missing: run scripts/setup-sandboxes process"
    if not (process_rootfs() / "usr" / "bin" / "python3").exists():
        return f"no agent rootfs in {process_rootfs()}: run scripts/setup-sandboxes process"
    return None


pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.timeout(120),
    pytest.mark.skipif((reason := _skip_reason()) is not None, reason=reason or ""),
]


@pytest.fixture
async def launcher(bus: SymbiUp) -> AsyncIterator[Launcher]:
    state = StateDir.open(bus.state_dir, create=False)
    gateway = await Gateway.connect(state, bus.url)
    try:
        yield Launcher(state, gateway)
    finally:
        await gateway.close()


async def test_bubblewrap_agent_reaches_nats_through_the_relay(
    tmp_path: Path, launcher: Launcher
) -> None:
    app = tmp_path / "app"
    app.mkdir(mode=0o755)
    (app / "agent.py").write_text(AGENT_PROGRAM)
    agent_id = unique("bw")
    sandbox = await launcher.launch(
        LaunchRequest(
            "docker",
            agent_id,
            ("python3", "/app/agent.py"),
            "process",
            app_dir=app,
            env={"PROBE_TARGETS": "1.1.1.1:53"},
        )
    )
    pid = int(sandbox.details["pid"])
    relay_pid = int(sandbox.details["relay_pid"])
    relay_socket = Path(sandbox.details["relay_socket"])
    try:
        report = report_of(await wait_log(launcher, "docker", agent_id, "connected stream="))
        assert report["uid"] == AGENT_UID
        assert report["ifaces"] == ["lo"]
        assert report["creds_writable"] is False
        assert report["files"]["agent.creds"][0] == "0o600"
        assert report["direct"]["1.1.1.1"] != "connected"
    finally:
        await launcher.stop("docker", agent_id)
    assert not process_alive(pid, str(sandbox.dirs.launch))
    assert not relay_alive(relay_pid, relay_socket)
    assert not sandbox.root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(relay_pid, 0)
