"""``symbi agent launch | stop | logs``: command implementations for ``symbi.main``.

Wiring (in ``symbi/main.py``)::

    from launchers.cli import add_parsers          # in build_parser(), after "list"
    add_parsers(agent_sub)

    if args.command == "agent" and args.agent_command in launchers.cli.COMMANDS:
        return launchers.cli.run(args)              # in main(), before cmd_agent.run

Every function takes the parsed namespace and returns the exit code; errors
are :class:`SymbiError` subclasses for ``main`` to print.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from agent_sdk.errors import ConfigError, SandboxError
from agent_sdk.names import LEVELS, TIERS, check_agent_id, check_tier
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from launchers.backend import BACKENDS, Limits
from launchers.launch import Launcher, LaunchRequest
from launchers.selection import choose_backend
from symbi import runner

COMMANDS = ("launch", "stop", "logs")


def add_parsers(agent_sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``launch``, ``stop`` and ``logs`` to the ``symbi agent`` subcommands."""

    def identity(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tier", required=True, help=f"one of {', '.join(TIERS)}")
        p.add_argument("--id", required=True, dest="agent_id")
        p.add_argument(
            "--state-dir",
            default=None,
            help="state directory (default: $SYMBIONT_STATE_DIR, else ./.symbi)",
        )

    launch = agent_sub.add_parser(
        "launch",
        help="register an agent and run COMMAND in a sandbox of its tier",
        usage="symbi agent launch --tier TIER --id ID [options] -- COMMAND [ARG...]",
    )
    identity(launch)
    launch.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="sandbox kind (default: the tier's: docker, gvisor, firecracker or else microvm)",
    )
    launch.add_argument("--image", default=None, help="Docker image (docker, gvisor)")
    launch.add_argument("--rootfs", default=None, help="ext4 root disk (microvm, firecracker)")
    launch.add_argument("--app", default=None, help="directory mounted read-only at /app")
    launch.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="never a secret"
    )
    launch.add_argument("--memory", type=int, default=Limits.memory_mb, help="MiB")
    launch.add_argument("--cpus", type=float, default=Limits.cpus)
    launch.add_argument("--pids", type=int, default=Limits.pids)
    launch.add_argument("--clearance", default="restricted", help=f"one of {', '.join(LEVELS)}")
    launch.add_argument("--capability", action="append", default=[], dest="capabilities")
    launch.add_argument("--subscribe", action="append", default=[], dest="subscriptions")
    launch.add_argument(
        "--allow-unsandboxed",
        action="store_true",
        help="permit --backend process (bubblewrap; development only, no isolation boundary)",
    )
    launch.add_argument(
        "--wait",
        action="store_true",
        help="print the agent's output until it exits, then stop it; exit with its status",
    )
    launch.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")

    stop = agent_sub.add_parser(
        "stop", help="stop an agent's sandbox, delete its credentials and revoke them"
    )
    identity(stop)
    stop.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")

    logs = agent_sub.add_parser("logs", help="print an agent's output")
    identity(logs)
    logs.add_argument("-f", "--follow", action="store_true")


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _request(args: argparse.Namespace) -> LaunchRequest:
    tier = check_tier(args.tier)
    agent_id = check_agent_id(args.agent_id)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command: symbi agent launch --tier T --id ID -- COMMAND [ARG...]")
    if args.clearance not in LEVELS:
        raise ConfigError(f"invalid clearance {args.clearance!r}: one of {', '.join(LEVELS)}")
    backend = choose_backend(tier, args.backend, args.allow_unsandboxed)
    if args.image is not None and backend not in ("docker", "gvisor"):
        raise ConfigError(f"--image is for the docker and gvisor backends, not {backend}")
    if args.rootfs is not None and backend not in ("microvm", "firecracker"):
        raise ConfigError(f"--rootfs is for the microvm and firecracker backends, not {backend}")
    app = Path(args.app).absolute() if args.app else None
    if app is not None and not app.is_dir():
        raise ConfigError(f"--app {args.app}: not a directory")
    return LaunchRequest(
        tier=tier,
        agent_id=agent_id,
        command=tuple(command),
        backend=backend,
        image=args.image,
        rootfs=Path(args.rootfs).absolute() if args.rootfs else None,
        app_dir=app,
        env=_env(args.env),
        limits=Limits(memory_mb=args.memory, cpus=args.cpus, pids=args.pids),
        clearance=args.clearance,
        capabilities=tuple(args.capabilities),
        subscriptions=tuple(args.subscriptions),
    )


async def _connected(state_dir: str | None) -> tuple[StateDir, Gateway]:
    state = StateDir.open(state_dir, create=False)
    info = state.read_runtime()
    return state, await Gateway.connect(state, str(info["nats_url"]))


async def _launch(args: argparse.Namespace) -> int:
    request = _request(args)
    state, gateway = await _connected(args.state_dir)
    try:
        launcher = Launcher(state, gateway)
        sandbox = await launcher.launch(request)
        where = f"{request.tier}.{request.agent_id}"
        print(
            f"launched {where} in {sandbox.name} ({sandbox.backend} backend); "
            f"logs: symbi agent logs --tier {request.tier} --id {request.agent_id}",
            flush=True,
        )
        if not args.wait:
            return 0
        try:
            await asyncio.to_thread(_copy_logs, launcher, request.tier, request.agent_id, True)
            code = await launcher.wait(request.tier, request.agent_id)
        finally:
            await launcher.stop(request.tier, request.agent_id)
        print(f"{where} exited with status {code}; stopped and revoked", file=sys.stderr)
        return code
    finally:
        await gateway.close()


async def _stop(args: argparse.Namespace) -> int:
    tier, agent_id = check_tier(args.tier), check_agent_id(args.agent_id)
    state = StateDir.open(args.state_dir, create=False)
    try:
        state, gateway = await _connected(args.state_dir)
    except ConfigError as exc:
        # Without the bus the sandbox still stops; not revoking is then an error.
        await Launcher(state, None).stop(tier, agent_id, timeout=args.timeout, revoke=False)
        raise SandboxError(
            f"stopped {tier}.{agent_id}, but its credentials are not revoked: {exc}"
        ) from exc
    try:
        await Launcher(state, gateway).stop(tier, agent_id, timeout=args.timeout)
    finally:
        await gateway.close()
    print(f"stopped {tier}.{agent_id}; its credentials are deleted and revoked")
    return 0


def _copy_logs(launcher: Launcher, tier: str, agent_id: str, follow: bool) -> None:
    out = sys.stdout.buffer
    for chunk in launcher.logs(tier, agent_id, follow=follow):
        out.write(chunk)
        out.flush()


def _logs(args: argparse.Namespace) -> int:
    tier, agent_id = check_tier(args.tier), check_agent_id(args.agent_id)
    state = StateDir.open(args.state_dir, create=False)
    with contextlib.suppress(BrokenPipeError):  # e.g. piped into head
        _copy_logs(Launcher(state, None), tier, agent_id, args.follow)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``symbi agent launch | stop | logs``."""
    if args.agent_command == "launch":
        return runner.run(_launch(args))
    if args.agent_command == "stop":
        return runner.run(_stop(args))
    if args.agent_command == "logs":
        return _logs(args)
    raise ConfigError(f"unknown command agent {args.agent_command}")
