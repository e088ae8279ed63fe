"""Argument parsing and the one place where errors become exit codes.

Every :class:`SymbiError` is printed as one line ``symbi: error: …`` on
stderr with exit code 2; nothing else is written when a command fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from agent_sdk.errors import SymbiError
from agent_sdk.names import LEVELS, TIERS


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SymbiError(f"environment variable {name}={raw!r} is not an integer") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"symbi: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="symbi", description="Secure messaging between sandboxed AI agents over NATS."
    )
    parser.add_argument("--log-level", default=os.environ.get("SYMBIONT_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-json", action="store_true", help="structured JSON logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def state_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir",
            default=None,
            help="state directory (default: $SYMBIONT_STATE_DIR, else ./.symbi)",
        )

    up = sub.add_parser("up", help="run the NATS server, gateway, policy workers and launchers")
    state_opt(up)
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="health and /metrics port (default: $SYMBIONT_COMM_BUS_PORT, else 8080)",
    )
    up.add_argument("--policies", default=None, help="communication policies (YAML)")
    up.add_argument(
        "--nats-url",
        default=os.environ.get("SYMBIONT_NATS_URL"),
        help="use this NATS server or cluster (configured with `symbi nats-config`) "
        "instead of the embedded one",
    )
    up.add_argument("--replicas", type=int, default=1, help="stream replicas on a cluster")
    up.add_argument(
        "--workers",
        type=int,
        default=None,
        help="policy worker processes (default: $SYMBIONT_COMM_BUS_THREADS, else 2)",
    )

    up.add_argument(
        "--no-launchers",
        action="store_true",
        help="do not run the launcher services (host.launcher), e.g. in tests",
    )

    agent = sub.add_parser("agent", help="register, revoke and list agents")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    reg = agent_sub.add_parser("register", help="register an agent and write its credentials")
    reg.add_argument("--tier", required=True, help=f"one of {', '.join(TIERS)}")
    reg.add_argument("--id", required=True, dest="agent_id")
    reg.add_argument("--clearance", default="restricted", help=f"one of {', '.join(LEVELS)}")
    reg.add_argument("--capability", action="append", default=[], dest="capabilities")
    reg.add_argument(
        "--subscribe",
        action="append",
        default=[],
        dest="subscriptions",
        help="event topic pattern the agent receives (may repeat)",
    )
    reg.add_argument("--out", required=True, help="directory for agent.creds and agent.json")
    state_opt(reg)
    rev = agent_sub.add_parser("revoke", help="revoke an agent's credentials")
    rev.add_argument("--tier", required=True)
    rev.add_argument("--id", required=True, dest="agent_id")
    state_opt(rev)
    ren = agent_sub.add_parser(
        "renew", help="re-issue an agent's credentials (same key) before they expire"
    )
    ren.add_argument("--tier", required=True)
    ren.add_argument("--id", required=True, dest="agent_id")
    ren.add_argument("--creds", required=True, help="the agent.creds file to renew in place")
    state_opt(ren)
    lst = agent_sub.add_parser("list", help="list registered agents")
    lst.add_argument("--json", action="store_true")
    state_opt(lst)
    from launchers.cli import add_parsers as add_launcher_parsers

    add_launcher_parsers(agent_sub)
    ncfg = sub.add_parser(
        "nats-config", help="write the trust configuration for a NATS server of your own"
    )
    ncfg.add_argument("--out", required=True, help="file to write (include it in nats-server.conf)")
    ncfg.add_argument("--jwt-dir", required=True, help="the server's resolver directory")
    state_opt(ncfg)
    demo = sub.add_parser(
        "demo", help="run the stack and six agents of three tiers, and report what happened"
    )
    demo.add_argument(
        "--state-dir",
        default=None,
        help="keep everything here (default: a temporary directory, removed afterwards)",
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    audit = sub.add_parser("audit", help="read the audit stream")
    audit.add_argument("--since", default="1h", help="how far back: 30s, 10m, 2h (default 1h)")
    audit.add_argument("--follow", action="store_true", help="keep following new records")
    audit.add_argument("--json", action="store_true", help="one JSON record per line, as stored")
    state_opt(audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "up":
            from symbi.cmd_up import run_up

            return run_up(
                state_dir=args.state_dir,
                nats_port=args.nats_port,
                http_port=args.http_port
                if args.http_port is not None
                else _env_int("SYMBIONT_COMM_BUS_PORT", 8080),
                policies=args.policies,
                nats_url=args.nats_url,
                replicas=args.replicas,
                launchers=not args.no_launchers,
                workers=args.workers
                if args.workers is not None
                else _env_int("SYMBIONT_COMM_BUS_THREADS", 2),
            )
        if args.command == "agent" and args.agent_command in ("launch", "stop", "logs"):
            from launchers import cli as launcher_cli

            return launcher_cli.run(args)
        if args.command == "agent":
            from symbi import cmd_agent

            return cmd_agent.run(args)
        if args.command == "nats-config":
            from symbi.cmd_nats_config import run as run_nats_config

            return run_nats_config(args.state_dir, args.out, args.jwt_dir)
        if args.command == "demo":
            from pathlib import Path

            from symbi.cmd_demo import run_demo
            from symbi.runner import run

            return run(run_demo(Path(args.state_dir) if args.state_dir else None, args.keep))
        if args.command == "audit":
            from symbi import cmd_audit

            return cmd_audit.run(args)
    except SymbiError as exc:
        print(f"symbi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2
