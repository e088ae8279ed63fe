"""The ``microvm`` backend: a QEMU ``-M microvm`` virtual machine per agent.

The same guest image as Firecracker (a Debian kernel, the initramfs and the
agent root disk from ``scripts/setup-sandboxes microvm``), under QEMU, which
is packaged for Debian. Without usable KVM it runs under TCG software
emulation (``-accel tcg -cpu max``: about 5 s to boot here); set
``SYMBIONT_MICROVM_ACCEL=kvm`` where KVM works.

The guest has no route anywhere except the address that QEMU forwards to the
host's NATS (see :mod:`launchers.qemu_command`); inside, ``sandbox_init.py``
relays ``127.0.0.1:4222`` to it, so agents use the same URL as in containers.
Stopping kills QEMU at once: the guest's disks are read-only, nothing is lost
but the agent's chance to say goodbye.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from agent_sdk.errors import SandboxError
from launchers import sandbox_init
from launchers.backend import (
    AGENT_GID,
    AGENT_UID,
    BackendName,
    Sandbox,
    SandboxSpec,
    SandboxStatus,
)
from launchers.console import console_status, follow_console, wait_exit, wait_started
from launchers.docker_backend import nats_host_port
from launchers.paths import SETUP_HINT
from launchers.processes import kill_process, process_alive, read_pid
from launchers.qemu_command import GUEST_NATS_ADDRESS, Disk, QemuVm
from launchers.vm_backend import build_app_disk, build_launch_disk, vm_image

ENV_ACCEL = "SYMBIONT_MICROVM_ACCEL"
QEMU = "qemu-system-x86_64"


def _world_usable(path: Path) -> bool:
    """Whether a user with no groups could read ``path`` (and traverse its parents)."""
    try:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents)
    except OSError:
        return False


def _forward_python() -> str:
    """A Python for the forwarder: the system's, which ``nobody`` can run, else ours."""
    for candidate in ("/usr/bin/python3", sys.executable):
        if Path(candidate).exists():
            return candidate
    return sys.executable


class MicroVmBackend:
    """Agents in QEMU micro-VMs."""

    name: ClassVar[BackendName] = "microvm"
    sandbox_uid = AGENT_UID
    sandbox_gid = AGENT_GID

    def __init__(self, accel: str | None = None) -> None:
        self.accel = accel or os.environ.get(ENV_ACCEL) or "tcg"

    def check(self, spec: SandboxSpec) -> None:
        if shutil.which(QEMU) is None:
            raise SandboxError(f"{QEMU} not found: {SETUP_HINT} microvm")
        if self.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise SandboxError(f"{ENV_ACCEL}=kvm but /dev/kvm is not usable")
        vm_image(spec)
        nats_host_port(spec.nats_url)

    def qemu(self, spec: SandboxSpec, disks: tuple[Disk, ...]) -> QemuVm:
        host, port = nats_host_port(spec.nats_url)
        python = _forward_python()
        init = Path(sandbox_init.__file__)
        runas = None
        if os.geteuid() == 0 and _world_usable(Path(python)) and _world_usable(init):
            try:
                pwd.getpwnam("nobody")
                runas = "nobody"
            except KeyError:
                pass
        image = vm_image(spec)
        return QemuVm(
            name=spec.name,
            kernel=image.kernel,
            initrd=image.initrd,
            disks=(Disk(image.rootfs, "root"), *disks),
            console=spec.dirs.console,
            pidfile=spec.root / "vm.pid",
            forward_command=(python, "-I", str(init), "pipe", "--connect", f"tcp:{host}:{port}"),
            memory_mb=spec.limits.memory_mb,
            cpus=spec.limits.cpus,
            accel=self.accel,
            runas=runas,
        )

    def start(self, spec: SandboxSpec) -> Sandbox:
        self.check(spec)
        disks = [Disk(build_launch_disk(spec, GUEST_NATS_ADDRESS), "launch")]
        app = build_app_disk(spec)
        if app is not None:
            disks.append(Disk(app, "app"))
        vm = self.qemu(spec, tuple(disks))
        try:
            result = subprocess.run(
                vm.argv(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"cannot start QEMU for {spec.name}: {exc}") from exc
        if result.returncode != 0:
            raise SandboxError(f"QEMU refused to start {spec.name}: {result.stderr.strip()[-400:]}")
        pid = read_pid(vm.pidfile)
        try:
            wait_started(spec.dirs.console, lambda: process_alive(pid, spec.name), spec.name)
        except BaseException:
            kill_process(pid, spec.name, 5.0)
            raise
        return Sandbox(
            self.name,
            spec.tier,
            spec.agent_id,
            spec.root,
            details={"pid": str(pid), "accel": self.accel},
            started_ms=int(time.time() * 1000),
        )

    def stop(self, sandbox: Sandbox, timeout: float = 10.0) -> None:
        kill_process(int(sandbox.details.get("pid", "0")), sandbox.name, timeout)

    def status(self, sandbox: Sandbox) -> SandboxStatus:
        return console_status(sandbox, sandbox.name)

    def logs(self, sandbox: Sandbox, *, follow: bool = False) -> Iterator[bytes]:
        return follow_console(sandbox, sandbox.name, follow)

    def wait(self, sandbox: Sandbox, timeout: float | None = None) -> int:
        return wait_exit(sandbox, sandbox.name, timeout)
