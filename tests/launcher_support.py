"""What the end-to-end sandbox tests share: freshness of the agent image, host probes.

The agent programs in these tests import ``agent_sdk`` from the agent image
(or the micro-VM root disk), never from a mount of this checkout, so a stale
image would test old code. ``scripts/setup-sandboxes`` labels the image with
a hash of the ``agent_sdk`` sources (``org.symbi.sdk``) and writes the same
hash beside the micro-VM root disk (``rootfs.sdk``); :func:`sdk_hash`
computes it here the same way (``find agent_sdk -name '*.py' -o -name
py.typed | LC_ALL=C sort | xargs sha256sum | sha256sum``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from launchers.launch import Launcher
from launchers.paths import DEFAULT_IMAGE, MicroVmImage
from tests.helpers import REPO

SETUP = "run scripts/setup-sandboxes"


def sdk_hash() -> str:
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "agent_sdk").rglob("*")
        if p.is_file() and (p.suffix == ".py" or p.name == "py.typed")
    )
    listing = "".join(
        f"{hashlib.sha256((REPO / f).read_bytes()).hexdigest()}  {f}\n" for f in files
    )
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def stale_image_reason(client: Any) -> str | None:
    """Why the agent image cannot run this checkout's ``agent_sdk``, or None."""
    labels = client.images.get(DEFAULT_IMAGE).labels or {}
    if labels.get("org.symbi.sdk") != sdk_hash():
        return f"{DEFAULT_IMAGE} holds another agent_sdk than this checkout: {SETUP} docker"
    return None


def stale_rootfs_reason() -> str | None:
    marker = MicroVmImage.default().rootfs.with_name("rootfs.sdk")
    try:
        built = marker.read_text().strip()
    except OSError:
        return f"no {marker}: {SETUP} microvm"
    if built != sdk_hash():
        return f"the micro-VM root disk holds another agent_sdk than this checkout: {SETUP} microvm"
    return None


async def output_of(
    launcher: Launcher, tier: str, agent_id: str, needle: str, timeout: float = 120
) -> str:
    """The agent's output once it holds ``needle`` on a complete line.

    Complete: followed by a newline. A micro-VM's output comes through its
    serial console, a kilobyte in tens of milliseconds, so a long line can be
    read half written.
    """
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = b"".join(launcher.logs(tier, agent_id)).decode(errors="replace")
        at = text.find(needle)
        if at >= 0 and "\n" in text[at:]:
            return text
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {needle!r} in the output of {tier}.{agent_id}:\n{text}")


def line_json(text: str, prefix: str) -> dict[str, Any]:
    """The JSON object after ``prefix`` on the first output line that starts with it."""
    for line in text.splitlines():
        if line.startswith(prefix):
            found: dict[str, Any] = json.loads(line.removeprefix(prefix))
            return found
    raise AssertionError(f"no line starting with {prefix!r} in:\n{text}")


def host_ip() -> str | None:
    """The host's address on its default route (nothing is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address: str = s.getsockname()[0]
        return address


@dataclass
class Listener:
    """A TCP port open on every host address; counts who got through to it."""

    port: int = 0
    accepted: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def host_listener() -> AsyncIterator[Listener]:
    listener = Listener()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.accepted.append(str(writer.get_extra_info("peername")))
        writer.close()

    server = await asyncio.start_server(on_connect, "0.0.0.0", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()
