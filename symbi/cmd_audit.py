"""``symbi audit``: read the audit stream from a given age, or follow it.

Reads through an ephemeral consumer that starts at ``now - since``; without
``--follow`` it stops once it has caught up with what the stream held when the
command started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

from agent_sdk.errors import ConfigError
from broker_gateway.audit_reader import read_audit
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from symbi import runner

_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COLUMNS = ("time", "decision", "reason", "from", "to", "type", "level", "policy", "worker")


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``1d`` in seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 30s, 10m, 2h")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def format_row(record: dict[str, Any]) -> str:
    cells = []
    for column in COLUMNS:
        value = record.get(column)
        if column == "time" and isinstance(value, int):
            value = datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        cells.append("-" if value is None else str(value))
    widths = (23, 8, 19, 22, 22, 7, 12, 20, 10)
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


async def _read(args: argparse.Namespace) -> int:
    since_s = parse_duration(args.since)
    state = StateDir.open(args.state_dir, create=False)
    gateway = await Gateway.connect(state, str(state.read_runtime()["nats_url"]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not args.json:
            print(format_row({c: c.upper() for c in COLUMNS}))
        since = datetime.fromtimestamp(time.time() - since_s, UTC)
        async for raw in read_audit(gateway.js, since, follow=args.follow, stop=stop):
            if args.json:
                sys.stdout.write(raw.decode(errors="replace") + "\n")
            else:
                try:
                    print(format_row(json.loads(raw)))
                except ValueError:
                    print("(unreadable record)")
            sys.stdout.flush()
    finally:
        await gateway.close()
    return 0


def run(args: argparse.Namespace) -> int:
    return runner.run(_read(args))
