"""The launcher service of one tier (``python -m launchers --tier T``), as far as it goes.

What it does now, for the sandboxes of its tier on this host:

- stops a sandbox as soon as its agent's credentials are revoked
  (:func:`launchers.revocation_watch.watch_revocations`);
- reaps sandboxes whose agent exited: stops them, deletes the credential
  files and revokes the credentials (every ``reap_interval`` seconds).

Meant to run as a child of ``symbi up`` (which sets ``SYMBIONT_STATE_DIR``
and ``SYMBIONT_NATS_URL``). Not yet: control messages at ``host.launcher``
(launch/stop requests from agents), and holding only its tier's signing key
(it still reaches the state directory through the gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence

from agent_sdk.errors import ConfigError, SymbiError
from agent_sdk.names import TIERS, check_tier
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from launchers.launch import Launcher
from launchers.revocation_watch import watch_revocations

log = logging.getLogger(__name__)


async def reap_forever(launcher: Launcher, tiers: Sequence[str], interval: float) -> None:
    while True:
        try:
            for sandbox in await launcher.reap(tiers):
                log.info("reaped %s: its agent exited", sandbox.name)
        except SymbiError as exc:
            log.warning("reaping failed: %s", exc)
        await asyncio.sleep(interval)


async def serve(
    state: StateDir,
    nats_url: str,
    tiers: Sequence[str],
    reap_interval: float = 2.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    gateway = await Gateway.connect(state, nats_url)
    launcher = Launcher(state, gateway)
    tasks = [
        asyncio.create_task(watch_revocations(launcher, tiers)),
        asyncio.create_task(reap_forever(launcher, tiers, reap_interval)),
    ]
    log.info("launcher service for %s running", ", ".join(tiers))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers")
    parser.add_argument("--tier", action="append", choices=TIERS, dest="tiers")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--nats-url", default=os.environ.get("SYMBIONT_NATS_URL"))
    parser.add_argument("--reap-interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SYMBIONT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        tiers = [check_tier(t) for t in (args.tiers or TIERS)]
        state = StateDir.open(args.state_dir, create=False)
        url = args.nats_url or str(state.read_runtime()["nats_url"])
        if not url:
            raise ConfigError("no NATS URL: pass --nats-url or set SYMBIONT_NATS_URL")
        from symbi.runner import run

        run(serve(state, url, tiers, args.reap_interval))
    except SymbiError as exc:
        log.error("%s", exc)
        return 2
    return 0
