"""The ``firecracker`` backend: the micro-VM guest under Firecracker, reached over vsock.

Firecracker is not packaged for Debian and cannot be fetched on this
project's build machines, so this backend is exercised only through its
configuration (:mod:`launchers.firecracker_config`, unit-tested) and its
refusal to start without the binary. Where ``firecracker`` is on ``PATH``,
``start`` writes ``firecracker.json`` into the sandbox directory, starts the
vsock relay to NATS as a host process and boots the VM with its serial
console in ``console.log``; the rest works as for the ``microvm`` backend.
Firecracker needs ``/dev/kvm``; the kernel is the ``vmlinux`` that
``scripts/setup-sandboxes microvm`` extracts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from agent_sdk.errors import SandboxError
from launchers.backend import AGENT_GID, AGENT_UID, BackendName, Sandbox, SandboxSpec, SandboxStatus
from launchers.console import console_status, follow_console, wait_exit
from launchers.docker_backend import nats_host_port
from launchers.firecracker_config import (
    GUEST_NATS_ADDRESS,
    FirecrackerVm,
    firecracker_argv,
    vm_config,
)
from launchers.host_relay import start_behind_relay, stop_relay
from launchers.processes import kill_process
from launchers.qemu_command import Disk
from launchers.vm_backend import build_app_disk, build_launch_disk, vm_image

FIRECRACKER = "firecracker"


class FirecrackerBackend:
    """Agents in Firecracker micro-VMs."""

    name: ClassVar[BackendName] = "firecracker"
    sandbox_uid = AGENT_UID
    sandbox_gid = AGENT_GID

    def __init__(self, binary: str = FIRECRACKER) -> None:
        self.binary = binary

    def check(self, spec: SandboxSpec) -> None:
        if shutil.which(self.binary) is None:
            raise SandboxError(
                f"{self.binary} not found: Firecracker is not packaged for Debian; install a "
                "release binary from github.com/firecracker-microvm/firecracker, or use "
                "--backend microvm (QEMU, the same guest image)"
            )
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise SandboxError("Firecracker needs /dev/kvm, which is not usable here")
        image = vm_image(spec)
        if not image.kernel.with_name("vmlinux").is_file():
            raise SandboxError(
                f"no {image.kernel.with_name('vmlinux')}: run setup-sandboxes microvm"
            )
        nats_host_port(spec.nats_url)

    def vm(self, spec: SandboxSpec, disks: tuple[Disk, ...]) -> FirecrackerVm:
        image = vm_image(spec)
        return FirecrackerVm(
            name=spec.name,
            kernel=image.kernel.with_name("vmlinux"),
            initrd=image.initrd,
            disks=(Disk(image.rootfs, "root"), *disks),
            vsock_uds=spec.dirs.net / "vsock.sock",
            memory_mb=spec.limits.memory_mb,
            cpus=spec.limits.cpus,
        )

    def start(self, spec: SandboxSpec) -> Sandbox:
        self.check(spec)
        disks = [Disk(build_launch_disk(spec, GUEST_NATS_ADDRESS), "launch")]
        app = build_app_disk(spec)
        if app is not None:
            disks.append(Disk(app, "app"))
        vm = self.vm(spec, tuple(disks))
        config = spec.root / "firecracker.json"
        config.write_text(json.dumps(vm_config(vm), indent=2))
        spec.dirs.net.mkdir(mode=0o700, exist_ok=True)
        host, port = nats_host_port(spec.nats_url)
        relay_socket = vm.relay_socket
        proc, relay = start_behind_relay(
            firecracker_argv(config, vm, self.binary),
            relay_socket,
            host,
            port,
            spec.root,
            spec.dirs.console,
            spec.name,
        )
        return Sandbox(
            self.name,
            spec.tier,
            spec.agent_id,
            spec.root,
            details={
                "pid": str(proc.pid),
                "instance": vm.instance_id,
                "relay_pid": str(relay),
                "relay_socket": str(vm.relay_socket),
            },
            started_ms=int(time.time() * 1000),
        )

    def stop(self, sandbox: Sandbox, timeout: float = 10.0) -> None:
        kill_process(int(sandbox.details.get("pid", "0")), self._marker(sandbox), timeout)
        relay = sandbox.details.get("relay_pid")
        if relay:
            stop_relay(int(relay), Path(sandbox.details["relay_socket"]))

    def _marker(self, sandbox: Sandbox) -> str:
        return sandbox.details.get("instance", sandbox.name)

    def status(self, sandbox: Sandbox) -> SandboxStatus:
        return console_status(sandbox, self._marker(sandbox))

    def logs(self, sandbox: Sandbox, *, follow: bool = False) -> Iterator[bytes]:
        return follow_console(sandbox, self._marker(sandbox), follow)

    def wait(self, sandbox: Sandbox, timeout: float | None = None) -> int:
        return wait_exit(sandbox, self._marker(sandbox), timeout)
