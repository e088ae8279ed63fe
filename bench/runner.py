"""A whole run: micro rates, then every phase, bare relay and router interleaved.

Order matters on a shared machine, where background load comes and goes
over tens of seconds: the micro rates are measured first, while nothing of
the bench runs; then each measurement is made with the bare relay and, right
after it, with the router (the same phase, fresh agents), so that every
router figure is set against a baseline taken seconds earlier rather than
minutes. The latency phases use ``latency_workers`` relays, the drains 1 and
then 2. With ``--profile``, two extra router phases run under py-spy: a drain
(large batches) and the open-loop load (small batches), whose costs differ.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import phases
from bench.bus import Bus
from bench.config import BenchConfig
from bench.micro import run_micro
from bench.plans import Pair, pair, tier_pairs
from bench.procs import RelayKind, RelayPool
from bench.profile import Profiler
from bench.targets import evaluate, ratios
from bench.traffic import Context
from broker_gateway.server import server_binary
from policy_worker.policy import PolicySet, default_policies, load_policies

log = logging.getLogger(__name__)

# (results key, relay processes, sealed) of the throughput phases.
DRAINS = (("1", 1, False), ("1_sealed", 1, True), ("2", 2, False))
KINDS: tuple[RelayKind, ...] = ("bare", "router")


async def run_phases(
    ctx: Context, pool: RelayPool, config: BenchConfig, pairs: list[Pair], main_pair: Pair
) -> dict[str, Any]:
    """Every phase; ``{"bare": {...}, "router": {...}}``."""
    out: dict[str, Any] = {k: {"latency": {}, "throughput": {}} for k in KINDS}
    n = config.latency_workers
    for name, sealed in (("plaintext", False), ("sealed", True)):
        for kind in KINDS:
            relays = await pool.use(kind, n)
            out[kind]["latency"][name] = await phases.latency(
                ctx, kind, relays, name, [main_pair], sealed=sealed, config=config
            )
    relays = await pool.use("router", n)
    router = out["router"]
    router["latency"]["tier_pairs"] = await phases.latency(
        ctx, "router", relays, "tier_pairs", pairs, sealed=False, config=config
    )
    router["recovery"] = await phases.recovery(ctx, "router", relays, main_pair, config=config)
    drains: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(config.drain_rounds):  # rounds alternate, so both kinds share the noise
        for key, workers, sealed in DRAINS:
            for kind in KINDS:
                relays = await pool.use(kind, workers)
                phase = await phases.drain(
                    ctx, kind, relays, main_pair, sealed=sealed, config=config
                )
                drains.setdefault((kind, key), []).append(phase)
    for (name, key), rounds in drains.items():
        out[name]["throughput"][key] = median_round(rounds)
    if config.profile_dir is not None:
        router["profile"] = await _profiled(ctx, pool, main_pair, config)
    return out


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (the lower middle one of an even count),
    with every round's throughput beside it."""
    ordered = sorted(rounds, key=lambda phase: float(phase["throughput"]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["round_throughputs"] = [phase["throughput"] for phase in rounds]
    return chosen


async def _profiled(
    ctx: Context, pool: RelayPool, main_pair: Pair, config: BenchConfig
) -> dict[str, Any]:
    """Extra router phases under py-spy; their figures are reported but not compared."""
    assert config.profile_dir is not None
    config.profile_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for what in ("drain", "latency"):
        [relay] = await pool.use("router", 1)
        profiler = Profiler(relay.pid, config.profile_dir / f"{what}-{relay.name}.collapsed.txt")
        await profiler.start()
        try:
            if what == "drain":
                phase = await phases.drain(
                    ctx, "router", [relay], main_pair, sealed=False, config=config
                )
            else:
                phase = await phases.latency(
                    ctx, "router", [relay], "profiled", [main_pair], sealed=False, config=config
                )
        finally:
            summary = await profiler.stop()
        out[what] = {"phase": phase, "profile": summary}
    return out


def _meta(config: BenchConfig, policies: PolicySet) -> dict[str, Any]:
    try:
        server = subprocess.run(
            [server_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        server = "unknown"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()}
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "config": settings,
        "policies": policies.source,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": server,
        "nats_py": importlib.metadata.version("nats-py"),
        "pynacl": importlib.metadata.version("pynacl"),
    }


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run everything ``config`` asks for; the results as one JSON-able dict."""
    policies = load_policies(config.policies) if config.policies else default_policies()
    pairs = tier_pairs(policies)
    main_pair = pair(policies, "docker", "docker")
    results: dict[str, Any] = {"meta": _meta(config, policies)}
    began = time.monotonic()
    log.info("micro: decisions and verifications, %g s each", config.micro_s)
    results["micro"] = run_micro(policies, [(p.src, p.dst) for p in pairs], config.micro_s)
    bus = await Bus.start(keep=config.keep)
    try:
        ctx = Context(bus, bus.root / "work")
        ctx.work.mkdir()
        pool = RelayPool(bus, ctx.work, config.policies)
        try:
            results.update(await run_phases(ctx, pool, config, pairs, main_pair))
        finally:
            await pool.close()
    finally:
        await bus.stop()
    results["meta"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["elapsed_s"] = round(time.monotonic() - began, 1)
    if config.keep:
        results["meta"]["kept"] = str(bus.root)
    results["ratios"] = ratios(results)
    results["targets"] = evaluate(results)
    return results
