"""``python -m bench``: run the benchmark, print the tables, write the JSON.

Everything runs on this machine: a ``symbi up``-equivalent on random ports in
a temporary state directory (removed afterwards unless ``--keep``), relays,
a sender and receivers as separate processes. The full run takes about
three minutes; ``--quick`` takes well under one and only proves that the
harness works (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent_sdk.errors import SymbiError
from bench.bus import BenchError
from bench.config import BenchConfig, quick
from bench.profile import py_spy
from bench.report import render, write_json
from bench.runner import run_bench


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Latency, throughput and cost of the policy workers against a bare relay.",
    )
    p.add_argument("--rate", type=float, default=d.rate, help="offered msg/s (%(default)s)")
    p.add_argument(
        "--duration", type=float, default=d.duration_s, help="s per latency phase (%(default)s)"
    )
    p.add_argument(
        "--drain-messages", type=int, default=d.drain_messages, help="backlog size (%(default)s)"
    )
    p.add_argument(
        "--drain-rounds",
        type=int,
        default=d.drain_rounds,
        help="alternating bare/router rounds of every drain; the median is reported (%(default)s)",
    )
    p.add_argument(
        "--recovery-burst",
        type=int,
        default=d.recovery_burst,
        help="burst in the recovery phase (%(default)s)",
    )
    p.add_argument(
        "--latency-workers",
        type=int,
        default=d.latency_workers,
        help="relay processes during the latency phases (%(default)s)",
    )
    p.add_argument("--payload-bytes", type=int, default=d.payload_bytes)
    p.add_argument("--micro-seconds", type=float, default=d.micro_s, help="per micro rate")
    p.add_argument("--policies", type=Path, default=None, help="policy file (default: built-ins)")
    p.add_argument(
        "--quick", action="store_true", help="a second of load and tiny counts (smoke test)"
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="two extra 1-worker router phases (a drain, the offered load) under py-spy;"
        " profiles kept in DIR",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: bench/results/<time>.json)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    p.add_argument(
        "--verbose", action="store_true", help="progress on stderr (always on for a full run)"
    )
    p.add_argument("--show", metavar="FILE", help="print the table of a saved results file")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig(
        rate=args.rate,
        duration_s=args.duration,
        drain_messages=args.drain_messages,
        drain_rounds=args.drain_rounds,
        recovery_burst=args.recovery_burst,
        latency_workers=args.latency_workers,
        payload_bytes=args.payload_bytes,
        micro_s=args.micro_seconds,
        policies=args.policies.absolute() if args.policies else None,
        profile_dir=args.profile.absolute() if args.profile else None,
        keep=args.keep,
    )
    return quick(config) if args.quick else config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show is not None:  # re-render a saved run, e.g. for the README
        print(render(json.loads(Path(args.show).read_text()), Path(args.show)))
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose or not args.quick else logging.WARNING,
        stream=sys.stderr,
        format="bench: %(relativeCreated)7.0f ms %(message)s",
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        if config.profile_dir is not None:
            py_spy()  # fail now rather than after the other phases
        results = asyncio.run(run_bench(config))
    except (BenchError, SymbiError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    path = write_json(results, args.out)
    print(render(results, path))
    return 0
