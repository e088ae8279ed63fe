"""The microvm backend (QEMU ``-M microvm``) against a real ``symbi up``.

Slow: each test boots a VM under software emulation (about 10-15 s here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_sdk.errors import SandboxError
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from launchers.backend import AGENT_UID
from launchers.launch import Launcher, LaunchRequest
from launchers.paths import MicroVmImage
from launchers.processes import process_alive
from tests.helpers import SymbiUp
from tests.test_launcher_docker import AGENT_PROGRAM, report_of, unique, wait_log


def _skip_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing: run scripts/setup-sandboxes microvm"
    try:
        MicroVmImage.default().check()
    except SandboxError as exc:
        return str(exc)
    if os.geteuid() != 0:
        return "the launch disk hands credentials to uid 10001, which needs root"
    return None


pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.slow,
    pytest.mark.timeout(300),
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


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir(mode=0o755)
    (app / "agent.py").write_text(AGENT_PROGRAM)
    (app / "agent.py").chmod(0o644)
    return app


async def test_agent_in_a_microvm_reaches_nats_and_nothing_else(
    bus: SymbiUp, launcher: Launcher, app_dir: Path
) -> None:
    agent_id = unique("vm")
    started = time.monotonic()
    sandbox = await launcher.launch(
        LaunchRequest(
            "firecracker",
            agent_id,
            ("python3", "/app/agent.py"),
            "microvm",
            app_dir=app_dir,
            # The host through QEMU's gateway and DNS addresses, and the internet.
            env={"PROBE_TARGETS": f"10.0.2.2:{bus.nats_port},10.0.2.3:53,1.1.1.1:53"},
        )
    )
    boot_s = time.monotonic() - started
    pid = int(sandbox.details["pid"])
    try:
        text = await wait_log(launcher, "firecracker", agent_id, "connected stream=INGRESS", 120)
        report = report_of(text)
        assert report["uid"] == AGENT_UID
        assert report["files"] == {
            "agent.creds": ["0o600", AGENT_UID],
            "agent.json": ["0o600", AGENT_UID],
        }
        assert report["creds_writable"] is False
        assert report["rootfs_writable"] is False
        assert all(v != "connected" for v in report["direct"].values()), report["direct"]
        assert report["nats_url"] == "nats://127.0.0.1:4222"
        assert report["env_has_secret"] is False
        # Neither the seed nor the JWT is on QEMU's command line.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        creds = (sandbox.root / "launch" / "agent.creds").read_text()
        assert all(line.encode() not in cmdline for line in creds.splitlines() if len(line) > 40)

        import nats

        router = await nats.connect(
            bus.url, user_credentials=str(bus.state_dir / "creds" / "router.creds")
        )
        try:
            await router.publish(f"tier.firecracker.agent.{agent_id}.in", b"hello vm")
            await router.flush()
        finally:
            await router.close()
        await wait_log(launcher, "firecracker", agent_id, "got hello vm", 60)
        assert launcher.status(sandbox).state == "running"
    finally:
        await launcher.stop("firecracker", agent_id)
    assert not process_alive(pid, sandbox.name)
    assert not sandbox.root.exists()
    record = await (await launcher.require_gateway().registry()).get(f"firecracker.{agent_id}")
    assert record.status == "revoked"
    print(f"microvm: launch to running command {boot_s:.1f} s")


async def test_exit_status_logs_and_missing_command(launcher: Launcher) -> None:
    agent_id = unique("vmexit")
    await launcher.launch(
        LaunchRequest(
            "firecracker",
            agent_id,
            ("python3", "-c", "print('bye from the vm'); raise SystemExit(5)"),
            "microvm",
        )
    )
    try:
        assert await launcher.wait("firecracker", agent_id, timeout=120) == 5
        out = b"".join(launcher.logs("firecracker", agent_id)).decode()
        assert "bye from the vm" in out
        sandbox = launcher.sandbox("firecracker", agent_id)
        assert launcher.status(sandbox).state == "exited"
        assert launcher.status(sandbox).exit_code == 5
    finally:
        with contextlib.suppress(SandboxError):
            await launcher.stop("firecracker", agent_id)
    assert not launcher.root("firecracker", agent_id).exists()

    missing = unique("vmnocmd")
    with pytest.raises(SandboxError, match="cannot run 'no-such-program'"):
        await launcher.launch(
            LaunchRequest("firecracker", missing, ("no-such-program",), "microvm")
        )
    assert not launcher.root("firecracker", missing).exists()
    record = await (await launcher.require_gateway().registry()).get(f"firecracker.{missing}")
    assert record.status == "revoked"
