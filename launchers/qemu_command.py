"""The QEMU command line of a symbi micro-VM (``-M microvm``), as a pure function.

The guest gets: the host's wall clock (a CMOS RTC, read once at boot: envelopes
carry the sender's clock), the shared agent root disk (read-only), its own launch disk
(credentials, ``launch.json``, ``sandbox_init.py``; read-only), optionally an
app disk, a serial console written to a file, and one virtio NIC on QEMU's
user-mode network with ``restrict=on``: the guest can reach neither the host
nor anything beyond it, except ``10.0.2.100:4222``, which QEMU forwards
(``guestfwd``) by running ``sandbox_init.py pipe`` to the host's NATS for each
connection. QEMU itself runs under its seccomp sandbox and, where the host has
the user and it can run the forwarder, drops to ``nobody`` once the VM is set up.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent_sdk.errors import SandboxError

GUEST_NATS_HOST = "10.0.2.100"
GUEST_NATS_PORT = 4222
GUEST_NATS_ADDRESS = f"tcp:{GUEST_NATS_HOST}:{GUEST_NATS_PORT}"
#: ``tsc_early_khz``: without KVM the kernel cannot calibrate the TSC quickly.
KERNEL_ARGS = (
    "console=ttyS0",
    "reboot=t",
    "panic=-1",
    "quiet",
    "loglevel=1",
    "rdinit=/init",
    "tsc_early_khz=2400000",
    "random.trust_cpu=on",
)


@dataclass(frozen=True)
class Disk:
    path: Path
    name: str
    read_only: bool = True


@dataclass(frozen=True)
class QemuVm:
    """Everything that varies between two micro-VMs."""

    name: str
    kernel: Path
    initrd: Path
    disks: tuple[Disk, ...]
    console: Path
    pidfile: Path
    forward_command: Sequence[str]
    memory_mb: int = 512
    cpus: float = 1.0
    accel: str = "tcg"
    runas: str | None = None
    extra_kernel_args: tuple[str, ...] = field(default_factory=tuple)
    binary: str = "qemu-system-x86_64"

    def argv(self) -> list[str]:
        """The full command line; QEMU daemonizes once the VM is set up."""
        for path in (self.kernel, self.initrd, self.console, self.pidfile):
            _check_option_value(str(path))
        forward = shlex.join(self.forward_command)
        _check_option_value(forward)
        cpu = ["-cpu", "max"] if self.accel == "tcg" else ["-cpu", "host"]
        argv = [
            self.binary,
            "-name",
            self.name,
            "-M",
            # rtc=on: the guest reads the wall clock from the CMOS RTC at boot. Without
            # it the guest starts in 1970 and every message it signs is "stale".
            "microvm,x-option-roms=off,isa-serial=on,rtc=on",
            "-accel",
            self.accel,
            *cpu,
            "-m",
            f"{self.memory_mb}M",
            "-smp",
            str(max(1, math.ceil(self.cpus))),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            " ".join((*KERNEL_ARGS, *self.extra_kernel_args)),
            "-serial",
            f"file:{self.console}",
        ]
        for disk in self.disks:
            _check_option_value(str(disk.path))
            readonly = ",readonly=on" if disk.read_only else ""
            argv += [
                "-drive",
                f"id={disk.name},file={disk.path},format=raw,if=none{readonly}",
                "-device",
                f"virtio-blk-device,drive={disk.name}",
            ]
        argv += [
            "-netdev",
            f"user,id=net0,restrict=on,guestfwd={GUEST_NATS_ADDRESS}-cmd:{forward}",
            "-device",
            "virtio-net-device,netdev=net0",
        ]
        # QEMU's seccomp filter. With -runas it must still call setuid() itself
        # (elevateprivileges=children kills it here); it then runs as that user.
        elevate = "allow" if self.runas is not None else "deny"
        argv += ["-sandbox", f"on,obsolete=deny,elevateprivileges={elevate},resourcecontrol=deny"]
        if self.runas is not None:
            argv += ["-runas", self.runas]
        argv += ["-daemonize", "-pidfile", str(self.pidfile)]
        return argv


def _check_option_value(value: str) -> None:
    """QEMU splits option values at commas: refuse paths that would be cut in two."""
    if "," in value or "\n" in value:
        raise SandboxError(f"{value!r} cannot be passed to QEMU (it contains a comma or newline)")
