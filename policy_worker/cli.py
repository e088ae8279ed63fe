"""The command line of one policy worker process.

``symbi up`` runs ``python -m policy_worker --name worker-<i> [--policies
FILE]`` with ``SYMBIONT_STATE_DIR``, ``SYMBIONT_NATS_URL`` and
``PROMETHEUS_MULTIPROC_DIR`` set; every option can also be given by hand, to
run workers elsewhere (``--creds`` for a cluster's router credentials).
Everything is validated before connecting: a bad option or policy file is one
line ``policy_worker: error: ...`` on stderr and exit code 2. SIGTERM or
SIGINT drains the worker and exits 0. A worker whose parent process goes
away (``symbi up`` killed) stops too, so none is left running orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent_sdk.errors import ConfigError, SymbiError
from broker_gateway.state import ENV_STATE_DIR, StateDir
from policy_worker.config import (
    DEFAULT_BATCH,
    DEFAULT_HOST_SERVICES,
    DEFAULT_INFLIGHT,
    DEFAULT_LINGER_US,
    DEFAULT_MAX_SKEW_MS,
    WorkerConfig,
)
from policy_worker.metrics import WorkerMetrics
from policy_worker.policy import default_policies, load_policies

log = logging.getLogger(__name__)

ENV_NATS_URL = "SYMBIONT_NATS_URL"
ENV_MAX_SKEW = "SYMBIONT_MAX_SKEW_MS"
ENV_HOST_SERVICES = "SYMBIONT_HOST_SERVICES"
ENV_INFLIGHT = "SYMBIONT_WORKER_INFLIGHT"
ENV_LINGER = "SYMBIONT_WORKER_LINGER_US"
ENV_CRYPTO_THREADS = "SYMBIONT_WORKER_CRYPTO_THREADS"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m policy_worker",
        description="A symbi policy worker: checks, routes and audits every agent message.",
    )
    p.add_argument("--name", default=None, help="worker name (default: worker-<pid>)")
    p.add_argument("--policies", default=None, help="policy file, YAML (default: built-ins)")
    p.add_argument("--state-dir", default=None, help=f"default: ${ENV_STATE_DIR}, else ./.symbi")
    p.add_argument(
        "--nats-url",
        default=None,
        help=f"default: ${ENV_NATS_URL}, else the running `symbi up`'s, else {DEFAULT_NATS_URL}",
    )
    p.add_argument("--creds", default=None, help="NATS credentials (default: the router's)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="max messages per batch")
    p.add_argument(
        "--inflight",
        type=int,
        default=None,
        help="batches processed at once (default: $SYMBIONT_WORKER_INFLIGHT, else 4)",
    )
    p.add_argument(
        "--linger-us",
        type=int,
        default=None,
        help="while a batch is in flight, how long the next waits for company "
        f"(default: ${ENV_LINGER}, else {DEFAULT_LINGER_US}; 0: never)",
    )
    p.add_argument(
        "--crypto-threads",
        type=int,
        default=None,
        help="extra threads that verify signatures of large batches "
        f"(default: ${ENV_CRYPTO_THREADS}, else 0)",
    )
    p.add_argument(
        "--max-skew-ms",
        type=int,
        default=None,
        help=f"allowed clock skew (default: ${ENV_MAX_SKEW}, else {DEFAULT_MAX_SKEW_MS})",
    )
    p.add_argument(
        "--host-services",
        default=None,
        help=f"comma-separated host services (default: ${ENV_HOST_SERVICES}, else "
        f"{','.join(sorted(DEFAULT_HOST_SERVICES))})",
    )
    p.add_argument("--log-level", default=os.environ.get("SYMBIONT_LOG_LEVEL", "INFO"))
    return p


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> WorkerConfig:
    """Validate the options (with their environment fallbacks) into a :class:`WorkerConfig`."""
    state = StateDir.open(args.state_dir or env.get(ENV_STATE_DIR) or None, create=False)
    policies = load_policies(args.policies) if args.policies else default_policies()
    max_skew_ms = _int_option(
        args.max_skew_ms, env.get(ENV_MAX_SKEW), ENV_MAX_SKEW, DEFAULT_MAX_SKEW_MS
    )
    services_text = args.host_services or env.get(ENV_HOST_SERVICES)
    services = (
        frozenset(s.strip() for s in services_text.split(",") if s.strip())
        if services_text
        else DEFAULT_HOST_SERVICES
    )
    inflight = _int_option(args.inflight, env.get(ENV_INFLIGHT), ENV_INFLIGHT, DEFAULT_INFLIGHT)
    crypto_threads = _int_option(
        args.crypto_threads, env.get(ENV_CRYPTO_THREADS), ENV_CRYPTO_THREADS, 0
    )
    linger_us = _int_option(args.linger_us, env.get(ENV_LINGER), ENV_LINGER, DEFAULT_LINGER_US)
    creds = Path(args.creds) if args.creds else state.service_creds("router")
    if not creds.is_file():
        raise ConfigError(f"credentials file {creds} not found")
    return WorkerConfig(
        name=args.name or f"worker-{os.getpid()}",
        state_dir=state.root,
        nats_url=args.nats_url or env.get(ENV_NATS_URL) or _running_url(state),
        creds=creds,
        policies=policies,
        batch=args.batch,
        inflight=inflight,
        linger_s=linger_us / 1e6,
        crypto_threads=crypto_threads,
        max_skew_ms=max_skew_ms,
        host_services=services,
    )


def _int_option(given: int | None, env_value: str | None, env_name: str, default: int) -> int:
    if given is not None:
        return given
    if env_value in (None, ""):
        return default
    try:
        return int(env_value)
    except ValueError:
        raise ConfigError(f"{env_name}={env_value!r} is not an integer") from None


def _running_url(state: StateDir) -> str:
    with contextlib.suppress(ConfigError):
        url = state.read_runtime().get("nats_url")
        if isinstance(url, str):
            return url
    return DEFAULT_NATS_URL


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args, os.environ)
        return _run(_serve(config))
    except SymbiError as exc:
        print(f"policy_worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop (a dependency on Linux), else on the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


async def _serve(config: WorkerConfig) -> int:
    from policy_worker.worker import Worker  # imports nats: keep --help fast

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = await Worker.start(config, WorkerMetrics(CollectorRegistry()))
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop))
    try:
        await worker.serve(stop)
    finally:
        orphan_watch.cancel()
        await worker.close()
    return 0


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            log.warning("parent process %d is gone; stopping", parent)
            stop.set()
