"""The launcher service of one tier: ``python -m launchers --tier T``.

For the sandboxes of its tier on this host, it:

- serves control messages to ``host.launcher`` (launch, stop, status;
  :mod:`launchers.control_service`) and answers as ``T.launcher``;
- stops a sandbox as soon as its agent's credentials are revoked
  (:func:`launchers.revocation_watch.watch_revocations`);
- reaps sandboxes whose agent exited: stops them, deletes the credential
  files and revokes the credentials (every ``reap_interval`` seconds).

It holds only its tier's scoped signing key and the restricted NATS user
that ``symbi up`` prepares for it (:mod:`launchers.service_files`); it
revokes through the gateway of ``symbi up``. Several instances of one tier
share the work; instances of different tiers coexist, each acting only on
its own tier. ``symbi up`` runs one per tier whose runtime is present, with
``SYMBIONT_STATE_DIR`` and ``SYMBIONT_NATS_URL`` set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from agent_sdk.errors import ConfigError, SymbiError
from agent_sdk.names import TIERS, check_tier
from broker_gateway.state import StateDir
from launchers.answers import Answerer
from launchers.control import ServicePolicy
from launchers.control_service import ControlService
from launchers.identity import ensure_identity
from launchers.launch import Launcher
from launchers.paths import DEFAULT_IMAGE
from launchers.revocation_watch import watch_revocations
from launchers.tier_bus import TierBus

log = logging.getLogger(__name__)

RETRY_MAX_S = 10.0


async def reap_forever(launcher: Launcher, tiers: Sequence[str], interval: float) -> None:
    while True:
        try:
            for sandbox in await launcher.reap(tiers):
                log.info("reaped %s: its agent exited", sandbox.name)
        except SymbiError as exc:
            log.warning("reaping failed: %s", exc)
        await asyncio.sleep(interval)


async def _connect(state: StateDir, tier: str, url: str) -> TierBus:
    """Connect, retrying while the bus is not there yet (``symbi up`` may be starting)."""
    delay = 0.5
    while True:
        try:
            return await TierBus.connect(state, tier, url)
        except ConfigError:
            raise
        except SymbiError as exc:
            log.warning("%s launcher: %s; retrying in %.0f s", tier, exc, delay)
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)


Job = Callable[[], Coroutine[Any, Any, None]]


async def _tier_jobs(
    state: StateDir,
    url: str,
    tier: str,
    reap_interval: float,
    policy: ServicePolicy,
    stack: contextlib.AsyncExitStack,
) -> list[Job]:
    bus = await _connect(state, tier, url)
    stack.push_async_callback(bus.close)
    launcher = Launcher(state, bus)
    jobs: list[Job] = [
        functools.partial(watch_revocations, launcher, [tier]),
        functools.partial(reap_forever, launcher, [tier], reap_interval),
    ]
    try:
        answerer = await Answerer.connect(await ensure_identity(bus, state.root))
    except SymbiError as exc:
        # Keep stopping revoked and exited sandboxes; exiting would only be
        # restarted by `symbi up` into the same failure.
        log.error("%s launcher cannot serve control messages: %s", tier, exc)
        return jobs
    stack.push_async_callback(answerer.close)
    return [ControlService(launcher, bus, answerer, policy).run, *jobs]


async def _run_all(
    state: StateDir, url: str, tiers: Sequence[str], reap_interval: float, policy: ServicePolicy
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        jobs: list[Job] = []
        for tier in tiers:
            jobs += await _tier_jobs(state, url, tier, reap_interval, policy, stack)
        log.info("launcher service for %s running", ", ".join(tiers))
        try:
            async with asyncio.TaskGroup() as group:
                for job in jobs:
                    group.create_task(job())
        except ExceptionGroup as failed:  # the first failure ends the service: say which
            raise failed.exceptions[0] from None


async def serve(
    state: StateDir,
    nats_url: str,
    tiers: Sequence[str],
    reap_interval: float = 2.0,
    stop: asyncio.Event | None = None,
    policy: ServicePolicy | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    service = asyncio.create_task(
        _run_all(state, nats_url, tiers, reap_interval, policy or ServicePolicy())
    )
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({service, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (service, stopped):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
        with contextlib.suppress(asyncio.CancelledError):
            await service  # re-raises what ended it, if anything did
        log.info("launcher service for %s stopped", ", ".join(tiers))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers")
    parser.add_argument("--tier", action="append", choices=TIERS, dest="tiers")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--nats-url", default=os.environ.get("SYMBIONT_NATS_URL"))
    parser.add_argument("--reap-interval", type=float, default=2.0)
    parser.add_argument(
        "--allow-image",
        action="append",
        default=[],
        dest="images",
        help=f"an image agents may ask for besides {DEFAULT_IMAGE} (may repeat)",
    )
    parser.add_argument("--max-per-owner", type=int, default=ServicePolicy.max_per_owner)
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
        policy = ServicePolicy(
            images=(DEFAULT_IMAGE, *args.images), max_per_owner=args.max_per_owner
        )
        from symbi.runner import run

        run(serve(state, url, tiers, args.reap_interval, policy=policy))
    except SymbiError as exc:
        log.error("%s", exc)
        return 2
    return 0
