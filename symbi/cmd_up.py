"""``symbi up``: the whole host side in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from agent_sdk.errors import ConfigError
from broker_gateway.runtime import ChildSpec, Runtime, RuntimeConfig, check_ports
from broker_gateway.state import StateDir
from broker_gateway.streams import StreamSettings
from symbi.runner import run


def worker_children(runtime: Runtime) -> list[ChildSpec]:
    return [
        ChildSpec(
            f"worker-{i}",
            [sys.executable, "-m", "policy_worker", "--name", f"worker-{i}"]
            + (["--policies", str(runtime.config.policies)] if runtime.config.policies else []),
        )
        for i in range(runtime.config.workers)
    ]


def run_up(
    state_dir: str | None,
    nats_port: int,
    http_port: int,
    policies: str | None,
    workers: int,
    nats_url: str | None = None,
    replicas: int = 1,
    launchers: bool = True,
) -> int:
    for name, port in (("--nats-port", nats_port), ("--http-port", http_port)):
        if not 1 <= port <= 65535:
            raise ConfigError(f"{name} {port}: not a TCP port")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be 0 or more")
    if not 1 <= replicas <= 5:
        raise ConfigError(f"--replicas {replicas}: must be 1 to 5")
    if replicas > 1 and nats_url is None:
        raise ConfigError("--replicas above 1 needs a NATS cluster (--nats-url)")
    # Everything is checked before anything is written or started.
    policy_path = Path(policies).absolute() if policies else None
    if policy_path is not None:
        from policy_worker.policy import load_policies

        load_policies(policy_path)
    check_ports(None if nats_url else nats_port, http_port)
    state = StateDir.open(state_dir)
    config = RuntimeConfig(
        state_dir=state.root,
        nats_port=nats_port,
        http_port=http_port,
        workers=workers,
        policies=policy_path,
        external_url=nats_url,
        streams=StreamSettings(replicas=replicas),
    )
    return run(_serve(config, launchers))


async def _serve(config: RuntimeConfig, launchers: bool = True) -> int:
    from launchers.children import LauncherChildren

    plan = LauncherChildren.plan(launchers)
    runtime = Runtime(config, children=lambda rt: worker_children(rt) + plan.children(rt))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start()
    try:
        assert runtime.gateway is not None
        await plan.ensure_consumers(runtime.gateway.js)
        print(f"symbi: {plan.summary()}", flush=True)
        http = f", http://127.0.0.1:{config.http_port}" if config.http_port else ""
        print(
            f"symbi: ready on {runtime.url}{http} (state {runtime.state.root}, "
            f"{config.workers} workers)",
            flush=True,
        )
        await stop.wait()
    finally:
        await runtime.stop()
    print("symbi: stopped", flush=True)
    return 0
