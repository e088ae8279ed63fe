"""The benchmark harness still runs end to end: ``python -m bench --quick``.

A quick run is a second or so of load per phase and tiny counts, so its
figures mean nothing; this test checks only the shape of the results and
that every message sent was delivered, live and durably, in every phase.
Times are never asserted: the machine is shared and they are noise here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import REPO

LATENCY_KEYS = {
    "sent",
    "delivered_live",
    "delivered_durable",
    "latency_ms",
    "by_pair",
    "sender_lag_ms",
    "relay_cpu_us_per_msg",
    "peak_rss_mb",
}
DRAIN_KEYS = {"sent", "delivered_live", "delivered_durable", "throughput", "relay_cpu_us_per_msg"}
TARGETS = 10


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results: dict[str, Any] = json.loads(out.read_text())
    return results, proc.stdout


def _phases(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for kind in ("bare", "router"):
        for section in ("latency", "throughput"):
            for name, phase in results[kind][section].items():
                found.append((f"{kind}/{section}/{name}", phase))
    found.append(("router/recovery", results["router"]["recovery"]))
    return found


def test_every_phase_is_reported(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    assert set(results) >= {"meta", "micro", "bare", "router", "ratios", "targets"}
    assert set(results["bare"]["latency"]) == {"plaintext", "sealed"}
    assert set(results["router"]["latency"]) == {"plaintext", "sealed", "tier_pairs"}
    for kind in ("bare", "router"):
        assert set(results[kind]["throughput"]) == {"1", "1_sealed", "2"}
        for phase in results[kind]["latency"].values():
            assert set(phase) >= LATENCY_KEYS
            assert set(phase["latency_ms"]) >= {"p50", "p95", "p99", "max"}
        for phase in results[kind]["throughput"].values():
            assert set(phase) >= DRAIN_KEYS
    # One row per tier pair that the built-in policies allow data on: all nine.
    assert len(results["router"]["latency"]["tier_pairs"]["by_pair"]) == 9
    assert {"idle_p50_ms", "recovered_after_s", "burst_messages"} <= set(
        results["router"]["recovery"]
    )


def test_everything_sent_was_delivered(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    for name, phase in _phases(results):
        assert phase["sent"] > 0, name
        assert phase["send_errors"] == 0, name
        assert phase["delivered_live"] == phase["sent"], name
        assert phase["delivered_durable"] == phase["sent"], name
        assert phase["denied"] == 0, name
        assert phase["duplicates"] == 0, name
        # The first delivery of each receiving agent was checked in full.
        assert phase["checked"] >= 1 and phase["check_failures"] == [], name


def test_micro_rates_and_targets(quick_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = quick_run
    micro = results["micro"]
    for name in ("decide", "envelope_parse", "envelope_verify", "ed25519_verify"):
        assert micro[name]["ops"] > 0 and micro[name]["per_cpu_s"] > 0
    assert len(results["targets"]) == TARGETS
    for row in results["targets"]:
        assert set(row) == {"target", "value", "limit", "unit", "pass"}
        assert isinstance(row["pass"], bool)
    assert set(results["ratios"]) == {"latency", "throughput", "cpu_per_msg", "scaling"}
    for heading in ("Latency", "Throughput", "Recovery", "Micro rates", "Targets"):
        assert heading in stdout


def test_bare_relay_runs_on_its_own() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bare_relay", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "bare_relay" in proc.stdout


def test_the_median_round_is_reported_with_every_rounds_throughput() -> None:
    from bench.report import _spread
    from bench.runner import median_round

    rounds = [{"throughput": t, "cpu": c} for t, c in ((5000.0, 1), (3000.0, 2), (4000.0, 3))]
    chosen = median_round(rounds)
    assert chosen["throughput"] == 4000.0 and chosen["cpu"] == 3  # the whole median round
    assert chosen["round_throughputs"] == [5000.0, 3000.0, 4000.0]
    assert median_round(rounds[:2])["throughput"] == 3000.0  # even: the lower middle
    assert median_round(rounds[:1])["round_throughputs"] == [5000.0]
    assert _spread(chosen["round_throughputs"]) == "3,000-5,000"
    assert _spread([5000.0]) is None
