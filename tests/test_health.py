"""``symbi up``'s HTTP endpoint: /healthz says whether the broker and its streams are there."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from tests.helpers import SymbiUp


def get(up: SymbiUp, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_healthz_reports_broker_and_streams(bus: SymbiUp) -> None:
    status, body = await asyncio.to_thread(get, bus, "/healthz")
    report = json.loads(body)
    assert status == 200
    assert report["ok"] is True
    assert report["nats"] is True
    assert set(report["streams"]) >= {
        "INGRESS",
        "AUDIT",
        "INBOX_DOCKER",
        "INBOX_GVISOR",
        "INBOX_FIRECRACKER",
    }


async def test_metrics_are_prometheus_text(bus: SymbiUp) -> None:
    status, body = await asyncio.to_thread(get, bus, "/metrics")
    assert status == 200
    assert "symbi_up 1.0" in body.splitlines()


@pytest.mark.parametrize("path", ["/", "/admin", "/healthz/../keys"])
async def test_other_paths_are_not_found(bus: SymbiUp, path: str) -> None:
    status, _ = await asyncio.to_thread(get, bus, path)
    assert status == 404
