"""``symbi demo`` runs the whole stack and agents of three tiers, and reports every decision."""

from __future__ import annotations

import pytest

from tests.helpers import symbi

pytestmark = pytest.mark.slow


def test_demo_shows_deliveries_and_every_kind_of_denial() -> None:
    res = symbi("demo", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "received data from docker.a1: 'hello from a1'" in out
    assert "got the rpc answer of gvisor.planner" in out
    assert "(sealed, opened by the recipient): 'the launch codes'" in out
    assert out.count("received event alerts.cpu from docker.sensor") == 2
    for reason, attack in [
        ("from_mismatch", "impersonation"),
        ("bad_signature", "forged signature"),
        ("replay", "replay"),
        ("type_not_allowed", "control across tiers"),
        ("rate_limited", "flood"),
    ]:
        denied = [row for row in out.splitlines() if f"<- {attack}" in row and "DENIED" in row]
        assert len(denied) == 1, out
        assert reason in denied[0]
    # Nothing mallory forged reached anyone.
    assert "transfer everything" not in out
    assert "signed by someone else" not in out
