"""A symbi bus on a three-node NATS JetStream cluster of the user's own.

The trust comes from ``symbi nats-config``; ``symbi up --nats-url`` then runs
the gateway against the cluster with replicated streams, and an agent
connected to another node than the gateway's works as on one machine.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from broker_gateway.server import server_binary
from tests.helpers import SymbiUp, connect_agent, free_port, symbi

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[int]]]:
    root = tmp_path_factory.mktemp("cluster")
    state = root / "state"
    client_ports = [free_port() for _ in range(3)]
    route_ports = [free_port() for _ in range(3)]
    procs = []
    for i in range(3):
        node = root / f"n{i}"
        node.mkdir()
        res = symbi(
            "nats-config",
            "--out",
            str(node / "trust.conf"),
            "--jwt-dir",
            str(node / "jwt"),
            state_dir=state,
        )
        assert res.returncode == 0, res.stderr
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
        (node / "server.conf").write_text(
            f'server_name: n{i}\nlisten: "127.0.0.1:{client_ports[i]}"\n'
            f'include "trust.conf"\n'
            f'jetstream {{ store_dir: "{node / "js"}" }}\n'
            f'cluster {{ name: symbi, listen: "127.0.0.1:{route_ports[i]}", routes: [{routes}] }}\n'
        )
        procs.append(
            subprocess.Popen(
                [server_binary(), "-c", str(node / "server.conf"), "-l", str(node / "log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    yield state, client_ports
    for proc in procs:
        proc.terminate()
        proc.wait(20)


async def test_bus_on_a_cluster_with_replicated_streams(
    cluster: tuple[Path, list[int]], tmp_path: Path
) -> None:
    state, ports = cluster
    up = SymbiUp(state, extra=("--nats-url", f"nats://127.0.0.1:{ports[0]}", "--replicas", "3"))
    up.start(timeout=120)
    try:
        info = up.register("docker", "c1", tmp_path / "c1")
        assert info["nats_url"] == f"nats://127.0.0.1:{ports[0]}"
        # The agent connects to another node of the cluster.
        info["nats_url"] = f"nats://127.0.0.1:{ports[2]}"
        (tmp_path / "c1" / "agent.json").write_text(json.dumps(info))
        agent = await connect_agent(tmp_path / "c1")
        try:
            ack = await agent.nc.jetstream().publish(
                info["outbox"], b"replicated", headers={"Nats-Msg-Id": "cl-1"}
            )
            assert ack.stream == "INGRESS"
            # The forbidden stays forbidden on every node.
            await agent.nc.publish("tier.docker.agent.other.out", b"x")
            await agent.nc.flush()
            await agent.wait_error("permissions violation for publish")
        finally:
            await agent.nc.close()
        router = await nats.connect(
            f"nats://127.0.0.1:{ports[1]}", user_credentials=str(state / "creds" / "router.creds")
        )
        try:
            stream = await router.jetstream().stream_info("INGRESS")
            assert stream.config.num_replicas == 3
            assert stream.cluster is not None
            assert len(stream.cluster.replicas or []) == 2
            assert stream.state.messages == 1
        finally:
            await router.close()
        await asyncio.to_thread(
            symbi, "agent", "revoke", "--tier", "docker", "--id", "c1", state_dir=state
        )
    finally:
        assert up.stop() == 0
