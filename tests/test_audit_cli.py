"""``symbi audit``: records exactly as stored, from a given age, or followed live."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import nats
import pytest

from tests.helpers import REPO, SymbiUp, symbi


def record(i: int, decision: str = "deny", reason: str = "no_policy") -> dict[str, object]:
    return {
        "id": f"rec-{i}",
        "from": "docker.a1",
        "to": "gvisor.b1",
        "type": "data",
        "level": "public",
        "decision": decision,
        "reason": reason,
        "policy": None,
        "worker": "w-test",
        "time": int(time.time() * 1000),
        "sent_time": 1,
        "size": 3,
        "payload_sha256": "00" * 32,
    }


@pytest.fixture(scope="module")
async def router(bus: SymbiUp) -> nats.NATS:
    nc = await bus.connect_router()
    yield nc  # type: ignore[misc]
    await nc.close()


async def test_json_output_is_exactly_what_is_stored(bus: SymbiUp, router: nats.NATS) -> None:
    raw = [json.dumps(record(i)).encode() for i in range(3)]
    for data in raw:
        await router.jetstream().publish("audit.deny.docker.gvisor", data)
    res = await asyncio.to_thread(symbi, "audit", "--json", state_dir=bus.state_dir)
    assert res.returncode == 0, res.stderr
    lines = [line.encode() for line in res.stdout.splitlines()]
    assert lines[-3:] == raw
    table = await asyncio.to_thread(symbi, "audit", state_dir=bus.state_dir)
    assert table.stdout.splitlines()[0].split()[:3] == ["TIME", "DECISION", "REASON"]
    assert sum("rec-" not in row and "no_policy" in row for row in table.stdout.splitlines()) >= 3


async def test_since_excludes_older_records(bus: SymbiUp, router: nats.NATS) -> None:
    await router.jetstream().publish(
        "audit.allow.docker.docker", json.dumps(record(100, "allow", "ok")).encode()
    )
    await asyncio.sleep(2.5)
    await router.jetstream().publish(
        "audit.allow.docker.docker", json.dumps(record(101, "allow", "ok")).encode()
    )
    res = await asyncio.to_thread(
        symbi, "audit", "--json", "--since", "2s", state_dir=bus.state_dir
    )
    ids = [json.loads(line)["id"] for line in res.stdout.splitlines()]
    assert ids == ["rec-101"]


async def test_follow_prints_new_records(bus: SymbiUp, router: nats.NATS) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "symbi",
            "audit",
            "--json",
            "--follow",
            "--since",
            "1s",
            "--state-dir",
            str(bus.state_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        await asyncio.sleep(2.0)
        await router.jetstream().publish(
            "audit.deny.gvisor.docker", json.dumps(record(200)).encode()
        )
        assert proc.stdout is not None
        seen: list[str] = []
        while "rec-200" not in seen:  # records of the last second may come first
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
            assert line, "audit --follow ended"
            seen.append(json.loads(line)["id"])
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else None


def test_bad_duration_is_one_line(bus: SymbiUp) -> None:
    res = symbi("audit", "--since", "ten", state_dir=bus.state_dir)
    assert res.returncode != 0
    assert res.stderr.strip() == "symbi: error: invalid duration 'ten': expected e.g. 30s, 10m, 2h"
