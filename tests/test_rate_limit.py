"""The GCRA arithmetic that the workers share through a KV value."""

from __future__ import annotations

import math

import pytest

from policy_worker.rate_limit import MAX_STATE_BYTES, decode_state, encode_state, take

T0 = 1_796_000_000_000  # a realistic Unix time in ms, so float precision is exercised


def offer(
    rate: float, burst: int, per_second: int, seconds: int, batch: int = 1
) -> tuple[int, bytes | None]:
    """Offer ``per_second`` messages a second in batches, from 0 to ``seconds`` inclusive."""
    state: bytes | None = None
    admitted = 0
    step_ms = 1000 * batch / per_second
    for i in range(round(seconds * per_second / batch) + 1):
        got, state = take(state, T0 + i * step_ms, rate, burst, batch)
        admitted += got
    return admitted, state


def test_fresh_sender_gets_its_burst_at_once() -> None:
    admitted, state = take(None, T0, rate=10, burst=5, n=8)
    assert admitted == 5
    assert take(state, T0, rate=10, burst=5, n=1)[0] == 0


def test_then_one_message_per_interval() -> None:
    _, state = take(None, T0, rate=10, burst=5, n=5)
    # 10/s is one every 100 ms: nothing at 99 ms, one at 100 ms, none again right after.
    assert take(state, T0 + 99, 10, 5, 1)[0] == 0
    got, state = take(state, T0 + 100, 10, 5, 1)
    assert got == 1
    assert take(state, T0 + 100, 10, 5, 1)[0] == 0
    assert take(state, T0 + 200, 10, 5, 3)[0] == 1


def test_idle_sender_refills_up_to_the_burst_only() -> None:
    _, state = take(None, T0, rate=10, burst=5, n=5)
    assert take(state, T0 + 60_000, 10, 5, 100)[0] == 5


def test_batch_admission_is_partial() -> None:
    admitted, state = take(None, T0, rate=100, burst=200, n=300)
    assert admitted == 200
    # 50 ms later, 5 more slots have opened: a batch of 20 gets 5.
    assert take(state, T0 + 50, 100, 200, 20)[0] == 5


def test_nothing_admitted_returns_the_same_state() -> None:
    _, state = take(None, T0, rate=1, burst=1, n=1)
    got, again = take(state, T0 + 10, 1, 1, 4)
    assert got == 0
    assert again is state  # no write needed


def test_zero_messages_change_nothing() -> None:
    _, state = take(None, T0, rate=5, burst=2, n=1)
    assert take(state, T0 + 1, 5, 2, 0) == (0, state)
    assert take(None, T0, 5, 2, 0)[0] == 0


@pytest.mark.parametrize(
    ("rate", "burst", "offered", "batch"),
    [
        (100, 200, 1000, 1),
        (100, 200, 1000, 50),
        (3, 5, 100, 1),
        (7.5, 2, 40, 4),
        (0.5, 2, 10, 1),
        (1000, 2000, 5000, 50),
        (30, 2, 1000, 1),
    ],
)
def test_ten_seconds_above_the_limit_admit_burst_plus_rate_times_ten(
    rate: float, burst: int, offered: int, batch: int
) -> None:
    admitted, _ = offer(rate, burst, offered, seconds=10, batch=batch)
    # Offers run from t=0 to t=10 s inclusive: the burst at once, then one
    # every 1/rate s, the last of them exactly at t=10 s.
    assert admitted == math.floor(burst + rate * 10)


def test_a_burst_of_one_loses_the_lateness_of_each_arrival() -> None:
    # With no tolerance nothing is banked: at 30/s (every 33.3 ms) and offers
    # on a 1 ms grid, each admission waits for the next whole ms (34 ms apart).
    admitted, _ = offer(rate=30, burst=1, per_second=1000, seconds=10)
    assert admitted == 1 + 10_000 // 34


def test_below_the_limit_everything_passes() -> None:
    admitted, _ = offer(rate=100, burst=10, per_second=50, seconds=10)
    assert admitted == 501


def test_workers_sharing_the_state_admit_what_one_would() -> None:
    """Two workers with their own batches, one value updated by compare-and-set."""
    kv: bytes | None = None
    admitted = 0
    for i in range(1000):
        now = T0 + i * 10  # each worker takes a batch of 8 every 20 ms, interleaved
        got, new = take(kv, now, rate=50, burst=20, n=8)
        if new != kv:
            kv = new  # the CAS write; a real conflict re-reads and re-takes
        admitted += got
    assert abs(admitted - (20 + 50 * 10)) <= 1


def test_clock_skew_between_workers_does_not_over_admit() -> None:
    _, state = take(None, T0, rate=10, burst=3, n=3)
    # A worker whose clock is 1 s behind sees a full bucket ahead of it.
    assert take(state, T0 - 1000, 10, 3, 10)[0] == 0


def test_state_round_trips_exactly_and_is_compact() -> None:
    for tat in (T0 + 1 / 3, float(T0), T0 + 123.456789, 0.0):
        state = encode_state(tat)
        assert decode_state(state) == tat
        assert len(state) <= MAX_STATE_BYTES
        assert state.isascii()


def test_take_then_decode_gives_the_theoretical_arrival_time() -> None:
    _, state = take(None, T0, rate=4, burst=2, n=2)
    assert decode_state(state) == T0 + 500.0


@pytest.mark.parametrize("bad", [b"", b"junk", b"nan", b"inf", b"1" * 100, None])
def test_unreadable_state_counts_as_a_fresh_bucket(bad: bytes | None) -> None:
    assert decode_state(bad) is None
    admitted, state = take(bad, T0, rate=10, burst=4, n=10)
    assert admitted == 4
    assert math.isfinite(decode_state(state) or math.nan)


@pytest.mark.parametrize(
    ("rate", "burst", "n"), [(0, 1, 1), (-1, 1, 1), (math.inf, 1, 1), (1, 0, 1), (1, 1, -1)]
)
def test_bad_arguments_are_refused(rate: float, burst: int, n: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        take(None, T0, rate, burst, n)
