"""What the micro-VM backends share: the guest's image and disks.

A micro-VM boots the kernel and initramfs that ``scripts/setup-sandboxes``
built, with three virtio disks:

``rootfs.ext4`` (label ``symbi-root``)
    the agent root filesystem, shared by every VM and attached read-only;
``launch.ext4`` (``symbi-boot``, per VM)
    ``agent.creds`` and ``agent.json`` (uid 10001, mode 0600), ``launch.json``
    (command, environment, user, relay) and ``sandbox_init.py``; mounted
    read-only at ``/run/symbi``;
``app.ext4`` (``symbi-app``, optional)
    the agent's own files, read-only at ``/app``.

The VM runs as a detached process (:mod:`launchers.processes`) whose serial
console goes to ``console.log`` (:mod:`launchers.console`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from agent_sdk.errors import SandboxError
from launchers import sandbox_init
from launchers.backend import (
    AGENT_GID,
    AGENT_UID,
    SANDBOX_APP_DIR,
    SANDBOX_NATS_LISTEN,
    SandboxSpec,
)
from launchers.credentials import remove_tree
from launchers.disk_image import make_ext4
from launchers.paths import MicroVmImage


def launch_json(spec: SandboxSpec, relay_connect: str) -> dict[str, object]:
    """What ``sandbox_init.py guest`` runs: never a secret (those are files beside it)."""
    return {
        "argv": list(spec.command),
        "env": {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/home/agent",
            "PYTHONUNBUFFERED": "1",
            **spec.sandbox_env(),
        },
        "uid": AGENT_UID,
        "gid": AGENT_GID,
        "workdir": SANDBOX_APP_DIR if spec.app_dir is not None else "/home/agent",
        "hostname": spec.agent_id,
        "relay": {"listen": SANDBOX_NATS_LISTEN, "connect": relay_connect},
    }


def build_launch_disk(spec: SandboxSpec, relay_connect: str) -> Path:
    """``<root>/launch.ext4`` from the launch directory plus launch.json and sandbox_init.py."""
    staging = spec.root / "guest-launch"
    image = spec.root / "launch.ext4"
    try:
        staging.mkdir(mode=0o700)
        for name in ("agent.creds", "agent.json"):
            src = spec.dirs.launch / name
            dst = staging / name
            shutil.copyfile(src, dst)
            os.chown(dst, AGENT_UID, AGENT_GID)
            os.chmod(dst, 0o600)
        (staging / "launch.json").write_text(json.dumps(launch_json(spec, relay_connect)))
        os.chmod(staging / "launch.json", 0o444)
        shutil.copyfile(sandbox_init.__file__, staging / "sandbox_init.py")
        os.chmod(staging / "sandbox_init.py", 0o444)
        os.chown(staging, AGENT_UID, AGENT_GID)
        os.chmod(staging, 0o500)
        make_ext4(staging, image, "symbi-boot")
    except OSError as exc:
        raise SandboxError(f"cannot prepare the launch disk of {spec.name}: {exc}") from exc
    finally:
        remove_tree(staging)
    return image


def build_app_disk(spec: SandboxSpec) -> Path | None:
    if spec.app_dir is None:
        return None
    if not spec.app_dir.is_dir():
        raise SandboxError(f"--app {spec.app_dir}: not a directory")
    image = spec.root / "app.ext4"
    make_ext4(spec.app_dir, image, "symbi-app")
    return image


def vm_image(spec: SandboxSpec) -> MicroVmImage:
    image = MicroVmImage.default()
    if spec.rootfs is not None:
        image = MicroVmImage(image.kernel, image.initrd, spec.rootfs)
    image.check()
    return image
