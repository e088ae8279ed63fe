"""Local rate reserves: fewer writes, and never a message more than the shared limit allows."""

from __future__ import annotations

import random

import pytest

from policy_worker.rate_limit import decode_state, take
from policy_worker.rate_store import RESERVE_S, RateStore, reserve_size
from tests.test_worker_units import NOW_MS, FakeIO

KEY = "docker.alice.docker_to_docker"


def _tat(io: FakeIO) -> float | None:
    return decode_state(io.data[KEY][1])


def test_reserve_size_follows_rate_and_burst() -> None:
    assert RESERVE_S == 0.1
    assert reserve_size(1000, 2000) == 100  # 100 ms of the rate
    assert reserve_size(1000, 800) == 100
    assert reserve_size(40, 20) == 2  # an eighth of the burst
    assert reserve_size(10, 5) == 0  # small bursts: no reserve at all
    assert reserve_size(5, 200) == 0


async def test_a_full_bucket_charges_a_reserve_then_admits_without_writes() -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    assert await rates.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=1) == 1
    assert io.writes == 1
    assert _tat(io) == NOW_MS + 101  # the message and 100 reserved slots, 1 ms each
    assert rates.admit_local(KEY, NOW_MS, 30) == 30
    for _ in range(70):
        assert await rates.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=1) == 1
    assert (io.writes, rates.local_admissions) == (1, 100)
    assert rates.admit_local(KEY, NOW_MS, 1) == 0  # used up: the shared state again
    assert await rates.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=1) == 1
    assert io.writes == 2


async def test_reserve_slots_pass_with_time() -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    await rates.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=1)
    # Slots [NOW+1, NOW+101): at NOW+50.5 only the 50 starting from then still fit.
    assert rates.admit_local(KEY, NOW_MS + 50.5, 100) == 50
    assert rates.admit_local(KEY, NOW_MS + 50.5, 1) == 0
    assert io.writes == 1


async def test_expired_reserve_is_dropped_and_the_shared_state_decides() -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    await rates.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=1)
    tat1 = _tat(io)
    assert tat1 == NOW_MS + 101
    assert rates.admit_local(KEY, tat1, 1) == 0
    assert rates.admit_local(KEY, NOW_MS + 1, 1) == 0  # forgotten, not merely skipped
    assert await rates.admit(KEY, now_ms=tat1, rate=1000, burst=800, n=1) == 1
    assert (io.writes, rates.local_admissions) == (2, 0)


async def test_reserve_never_adds_to_a_refilled_bucket() -> None:
    """Just before tat1 the shared bucket is nearly full again: the reserve must add nothing."""
    io = FakeIO()
    mine, theirs = RateStore(io), RateStore(io)  # type: ignore[arg-type]
    await mine.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=1)
    late = NOW_MS + 100.5  # before tat1 = NOW + 101, but every reserved slot has begun
    got = await theirs.admit(KEY, now_ms=late, rate=1000, burst=800, n=800)
    assert got == 799
    assert mine.admit_local(KEY, late, 100) == 0
    assert got + await mine.admit(KEY, now_ms=late, rate=1000, burst=800, n=100) <= 800


async def test_reserve_is_not_used_before_the_write_that_charged_it() -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    await rates.admit(KEY, now_ms=NOW_MS + 10, rate=1000, burst=800, n=1)
    assert rates.admit_local(KEY, NOW_MS, 5) == 0
    assert rates.admit_local(KEY, NOW_MS + 10, 5) == 5


@pytest.mark.parametrize(("n", "reserved"), [(300, True), (301, False)])
async def test_reserve_only_while_half_the_burst_stays_free(n: int, reserved: bool) -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    assert await rates.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=n) == n
    # n + 100 taken of 800 leaves 400 (half) for n = 300, and 399 for 301.
    assert _tat(io) == NOW_MS + n + (100 if reserved else 0)
    assert rates.admit_local(KEY, NOW_MS, 1) == int(reserved)


async def test_no_reserve_near_the_limit() -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    assert await rates.admit(KEY, now_ms=NOW_MS, rate=1000, burst=800, n=450) == 450
    for i in range(1, 21):
        assert await rates.admit(KEY, now_ms=NOW_MS + i, rate=1000, burst=800, n=1) == 1
        assert io.writes == 1 + i  # every admission is judged by the shared state
    assert rates.local_admissions == 0


async def test_small_bursts_behave_as_without_reserves() -> None:
    io = FakeIO()
    rates = RateStore(io)  # type: ignore[arg-type]
    for i in range(5):
        assert await rates.admit(KEY, now_ms=NOW_MS, rate=10, burst=5, n=1) == 1
        assert _tat(io) == NOW_MS + 100 * (i + 1)
    assert (io.writes, rates.local_admissions) == (5, 0)


def _worst_excess(events: list[tuple[float, int]], rate: float, burst: int) -> float:
    """Max over windows [a, b] of admitted - (burst + rate * (b - a)); times strictly increase.

    Over the window of events i..j that is ``(P[j+1] - r t_j) - (P[i] - r t_i) - burst``
    with P the prefix sums, so one pass with a running minimum covers every pair.
    """
    per_ms = rate / 1000
    worst = float("-inf")
    low = float("inf")
    total = 0
    for t, admitted in events:
        low = min(low, total - per_ms * t)
        total += admitted
        worst = max(worst, total - per_ms * t - low - burst)
    return worst


async def _run(seed: int, rate: float, burst: int, workers: int) -> None:
    rng = random.Random(seed)
    io = FakeIO()
    stores = [RateStore(io) for _ in range(workers)]  # type: ignore[arg-type]
    k = reserve_size(rate, burst)
    interval = 1000 / rate
    now = float(NOW_MS)
    events: list[tuple[float, int]] = []
    requests: list[tuple[float, int]] = []
    for _ in range(3000):
        # Bursts faster than the rate, steady sending near it, and idle gaps that refill.
        mode = rng.random()
        if mode < 0.6:
            now += rng.uniform(0.01, 0.5) * interval
        elif mode < 0.95:
            now += rng.uniform(0.5, 3) * interval
        else:
            now += rng.uniform(0, burst) * interval
        n = 1 if rng.random() < 0.6 else rng.randint(1, max(2, k))
        store = rng.choice(stores)
        if rng.random() < 0.5:  # as the rate stage does it: the reserve first, then the rest
            got = store.admit_local(KEY, now, n)
            if got < n:
                got += await store.admit(KEY, now_ms=now, rate=rate, burst=burst, n=n - got)
        else:
            got = await store.admit(KEY, now_ms=now, rate=rate, burst=burst, n=n)
        assert 0 <= got <= n
        events.append((now, got))
        requests.append((now, n))
    # The slot argument makes the bound exact; the margin only absorbs float noise.
    assert _worst_excess(events, rate, burst) <= 0.01, "a window admitted more than GCRA allows"
    state: bytes | None = None
    ideal = 0
    for t, n in requests:  # one ideal bucket, judging the same requests
        got, state = take(state, t, rate, burst, n)
        ideal += got
    assert sum(got for _, got in events) <= ideal
    assert sum(s.local_admissions for s in stores) > 0  # not vacuous: reserves served some


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("rate", "burst", "workers"), [(1000, 800, 2), (1000, 2000, 3), (40, 20, 2), (100, 200, 3)]
)
async def test_reserves_never_exceed_the_shared_limit(
    seed: int, rate: float, burst: int, workers: int
) -> None:
    await _run(seed, rate, burst, workers)
