"""Children of ``symbi up`` that die are restarted, later and later while they keep dying."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from broker_gateway.restarts import (
    BASE_DELAY_S,
    MAX_DELAY_S,
    STABLE_S,
    RestartBook,
    restart_delay,
)
from broker_gateway.runtime import ChildSpec, Runtime, RuntimeConfig
from tests.helpers import free_port


def test_delays_double_in_a_crash_loop_up_to_the_cap() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert restart_delay(50) == MAX_DELAY_S


def test_a_crash_loop_backs_off_and_a_stable_run_resets_it() -> None:
    book = RestartBook()
    now = 100.0
    book.started("w", now)
    delays = []
    for _ in range(5):  # dies at once, five times
        delays.append(book.exited("w", now))
        assert book.due(now) == []
        now = book.next_due() or now
        assert book.due(now) == ["w"]
        book.started("w", now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert book.children["w"].restarts == 5
    # It runs for longer than STABLE_S, then dies: back to the short delay.
    now += STABLE_S + 1
    assert book.exited("w", now) == BASE_DELAY_S
    # Noting the same exit twice changes nothing.
    assert abs(book.exited("w", now + 0.1) - (BASE_DELAY_S - 0.1)) < 1e-9


def test_children_are_independent() -> None:
    book = RestartBook()
    book.started("a", 0.0)
    book.started("b", 0.0)
    book.exited("a", 1.0)
    book.started("a", 1.5)
    assert book.exited("a", 2.0) == 1.0  # a's second quick failure
    assert book.exited("b", 2.0) == 0.5  # b's first
    assert book.next_due() == 2.5 and book.due(2.5) == ["b"]


async def test_a_child_that_keeps_dying_is_restarted_with_backoff(tmp_path: Path) -> None:
    config = RuntimeConfig(state_dir=tmp_path / "state", nats_port=free_port(), http_port=None)
    flaky = ChildSpec("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
    runtime = Runtime(config, children=lambda _: [flaky])
    await runtime.start()
    try:
        record = None
        for _ in range(200):
            record = runtime._restarts.children.get("flaky")
            if record is not None and record.restarts >= 2 and record.restart_at is not None:
                break
            await asyncio.sleep(0.05)
        assert record is not None and record.restarts >= 2
        assert record.quick_failures >= 3  # each exit counted as a quick one: the delay grows
        report = await runtime.health()
        assert report["workers"]["flaky"] is False and report["restarts"]["flaky"] >= 2
        assert report["ok"] is False
    finally:
        await runtime.stop()
