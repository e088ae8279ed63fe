"""Firecracker's configuration of a symbi micro-VM, as pure functions.

``firecracker --no-api --config-file <file>`` boots what :func:`vm_config`
returns: the same kernel, initramfs and disks as the QEMU ``microvm``
backend, but **no network interface at all**. The guest reaches NATS over
vsock instead: Firecracker turns a guest connection to CID 2 (the host),
port 4222, into a connection to the host Unix socket ``<uds_path>_4222``,
where the launcher's relay listens and dials NATS. Inside the guest,
``sandbox_init.py`` relays ``127.0.0.1:4222`` to ``vsock:2:4222``.

Firecracker boots an uncompressed ELF kernel (``vmlinux``), which
``scripts/setup-sandboxes microvm`` extracts from the Debian ``vmlinuz``.
In production, start it through Firecracker's ``jailer`` (chroot, cgroups,
seccomp, an unprivileged uid): :func:`jailer_argv`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launchers.qemu_command import KERNEL_ARGS, Disk

#: The host's CID as seen from a guest, and the port the relay serves NATS on.
HOST_CID = 2
GUEST_CID = 3
VSOCK_NATS_PORT = 4222
GUEST_NATS_ADDRESS = f"vsock:{HOST_CID}:{VSOCK_NATS_PORT}"
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
#: Firecracker has no PCI and passes the virtio-mmio devices on the command line.
FIRECRACKER_KERNEL_ARGS = (*(a for a in KERNEL_ARGS if a != "reboot=t"), "reboot=k", "pci=off")


@dataclass(frozen=True)
class FirecrackerVm:
    name: str
    kernel: Path
    initrd: Path
    disks: tuple[Disk, ...]
    vsock_uds: Path
    memory_mb: int = 512
    cpus: float = 1.0
    extra_kernel_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def instance_id(self) -> str:
        """Firecracker's and jailer's ``--id``: up to 64 of ``[A-Za-z0-9-]``."""
        if _ID_RE.fullmatch(self.name):
            return self.name
        return "symbi-" + hashlib.sha256(self.name.encode()).hexdigest()[:24]

    @property
    def relay_socket(self) -> Path:
        """Where the host relay listens: Firecracker appends ``_<port>`` to ``uds_path``."""
        return self.vsock_uds.with_name(f"{self.vsock_uds.name}_{VSOCK_NATS_PORT}")


def vm_config(vm: FirecrackerVm) -> dict[str, Any]:
    """The ``--config-file`` document (Firecracker's API objects, by resource name)."""
    return {
        "boot-source": {
            "kernel_image_path": str(vm.kernel),
            "initrd_path": str(vm.initrd),
            "boot_args": " ".join((*FIRECRACKER_KERNEL_ARGS, *vm.extra_kernel_args)),
        },
        "drives": [
            {
                "drive_id": disk.name,
                "path_on_host": str(disk.path),
                "is_root_device": False,
                "is_read_only": disk.read_only,
            }
            for disk in vm.disks
        ],
        "machine-config": {
            "vcpu_count": max(1, math.ceil(vm.cpus)),
            "mem_size_mib": vm.memory_mb,
            "smt": False,
        },
        "network-interfaces": [],
        "vsock": {"guest_cid": GUEST_CID, "uds_path": str(vm.vsock_uds)},
    }


def firecracker_argv(
    config_file: Path, vm: FirecrackerVm, binary: str = "firecracker"
) -> list[str]:
    """Firecracker without its API socket, booting straight from ``config_file``."""
    return [binary, "--id", vm.instance_id, "--no-api", "--config-file", str(config_file)]


def jailer_argv(
    vm: FirecrackerVm,
    uid: int,
    gid: int,
    chroot_base: Path,
    firecracker: str = "/usr/bin/firecracker",
    jailer: str = "jailer",
    extra: Sequence[str] = (),
) -> list[str]:
    """The same VM under ``jailer``: the config file path is then relative to the chroot."""
    return [
        jailer,
        "--id",
        vm.instance_id,
        "--exec-file",
        firecracker,
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--chroot-base-dir",
        str(chroot_base),
        "--",
        "--no-api",
        "--config-file",
        "config.json",
        *extra,
    ]
