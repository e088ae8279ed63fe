"""Start-up refusals: a bad policy file stops ``symbi up`` and a worker before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, symbi

GOOD = """
communication_policies:
  - name: docker_to_docker
    source_tier: docker
    destination_tier: docker
    allowed_message_types: [data]
    rate_limits: {messages_per_second: 10, burst_size: 20}
"""

BAD = {
    # (file text, the field the one-line error must name)
    "typo": (GOOD.replace("rate_limits:", "rate_limit:"), "rate_limit"),
    "unknown_tier": (
        GOOD.replace("destination_tier: docker", "destination_tier: kvm"),
        "destination_tier",
    ),
    "negative_rate": (
        GOOD.replace("messages_per_second: 10", "messages_per_second: -5"),
        "rate_limits.messages_per_second",
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_symbi_up_refuses_a_bad_policy_file(tmp_path: Path, kind: str) -> None:
    text, field = BAD[kind]
    policies = tmp_path / "policies.yaml"
    policies.write_text(text)
    res = symbi(
        "up",
        "--nats-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        "--workers",
        "1",
        "--policies",
        str(policies),
        state_dir=tmp_path / "state",
        timeout=60,
    )
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "policy 'docker_to_docker'" in lines[0] and field in lines[0], lines[0]
    assert str(policies) in lines[0]
    assert not (tmp_path / "state" / "runtime.json").exists()  # nothing was started


def test_worker_refuses_a_bad_policy_file(tmp_path: Path) -> None:
    text, field = BAD["negative_rate"]
    policies = tmp_path / "policies.yaml"
    policies.write_text(text)
    (tmp_path / "state").mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "policy_worker", "--name", "w", "--policies", str(policies)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"SYMBIONT_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("policy_worker: error: ") and field in line


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--batch", "0"], "batch 0"),
        (["--max-skew-ms", "-1"], "max skew"),
        (["--host-services", "Bad Name"], "host service"),
        (["--name", "a b"], "worker name"),
    ],
)
def test_worker_refuses_bad_options(tmp_path: Path, args: list[str], problem: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "policy_worker", "--state-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert problem in line, line


def test_worker_without_a_route_key_refuses_to_start(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "policy_worker", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert res.returncode == 2
    assert "route-signing key" in res.stderr
