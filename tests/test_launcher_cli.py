"""``symbi agent launch | stop | logs`` as processes, with the docker backend.

Until ``symbi.main`` wires these commands in, the tests run them through the
same small wiring that ``launchers/cli.py`` documents.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import docker
import pytest

from tests.helpers import REPO, SymbiUp
from tests.test_launcher_docker import _docker_skip_reason, unique

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.timeout(240),
    pytest.mark.skipif((reason := _docker_skip_reason()) is not None, reason=reason or ""),
]

WIRING = """
import argparse, sys
from agent_sdk.errors import SymbiError
from launchers import cli
parser = argparse.ArgumentParser(prog="symbi")
sub = parser.add_subparsers(dest="command", required=True)
agent = sub.add_parser("agent").add_subparsers(dest="agent_command", required=True)
cli.add_parsers(agent)
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(cli.run(args))
except SymbiError as exc:
    print(f"symbi: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def symbi_agent(bus: SymbiUp, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # Options before "--": everything after it is the agent's command.
        [
            sys.executable,
            "-c",
            WIRING,
            "agent",
            args[0],
            "--state-dir",
            str(bus.state_dir),
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ},
        check=False,
    )


def containers(agent_id: str) -> list[Any]:
    client = docker.from_env()
    try:
        found: list[Any] = client.containers.list(
            all=True, filters={"label": f"org.symbi.agent={agent_id}"}
        )
        return found
    finally:
        client.close()


def test_launch_wait_runs_to_the_end_and_cleans_up(bus: SymbiUp) -> None:
    agent_id = unique("cliwait")
    code = (
        "import json; print('cli agent', json.load(open('/run/symbi/agent.json'))['id']);"
        "raise SystemExit(4)"
    )
    res = symbi_agent(
        bus, "launch", "--tier", "docker", "--id", agent_id, "--wait", "--", "python3", "-c", code
    )
    assert res.returncode == 4, res.stderr
    assert f"launched docker.{agent_id}" in res.stdout
    assert f"cli agent {agent_id}" in res.stdout
    assert "stopped and revoked" in res.stderr
    assert containers(agent_id) == []
    assert not (bus.state_dir / "sandboxes" / f"docker.{agent_id}").exists()


def test_launch_logs_stop(bus: SymbiUp) -> None:
    agent_id = unique("clid")
    res = symbi_agent(
        bus, "launch", "--tier", "docker", "--id", agent_id, "--",
        "python3", "-c", "import time; print('up', flush=True); time.sleep(600)",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        logs = symbi_agent(bus, "logs", "--tier", "docker", "--id", agent_id)
        assert logs.returncode == 0, logs.stderr
        assert "symbi-init: started python3" in logs.stdout
    finally:
        stop = symbi_agent(bus, "stop", "--tier", "docker", "--id", agent_id)
    assert stop.returncode == 0, stop.stderr
    assert "deleted and revoked" in stop.stdout
    assert containers(agent_id) == []
    again = symbi_agent(bus, "stop", "--tier", "docker", "--id", agent_id)
    assert again.returncode == 2
    assert again.stderr.startswith("symbi: error: no sandbox for docker.")
    # The id stays revoked: launching it again is refused, and nothing is started.
    relaunch = symbi_agent(bus, "launch", "--tier", "docker", "--id", agent_id, "--", "true")
    assert relaunch.returncode == 2
    assert "already registered" in relaunch.stderr
    assert containers(agent_id) == []


def test_launch_refuses_bad_input_before_anything(bus: SymbiUp) -> None:
    res = symbi_agent(
        bus, "launch", "--tier", "docker", "--id", "x", "--backend", "process", "--", "true"
    )
    assert res.returncode == 2
    assert "not an isolation boundary" in res.stderr
    res = symbi_agent(
        bus, "launch", "--tier", "docker", "--id", "x", "--image", "nope:1", "--", "true"
    )
    assert res.returncode == 2
    assert "image 'nope:1' not found" in res.stderr
