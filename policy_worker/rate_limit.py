"""Rate-limit arithmetic (GCRA), pure: the worker keeps the state in a KV bucket.

The generic cell rate algorithm is a token bucket written as one number, the
*theoretical arrival time* (TAT): the instant at which the sender's bucket
would be full again. With an emission interval ``T = 1000 / rate`` ms and a
tolerance ``tau = (burst - 1) * T``, a message arriving at ``now`` is admitted
if ``max(TAT, now) - now <= tau``, and each admitted message pushes the TAT
forward by ``T``. A fresh sender can therefore send ``burst`` messages at once
and then ``rate`` per second; over any window of ``d`` seconds at most
``burst + rate * d`` messages are admitted, and under a steady overload
exactly that many. (With ``burst == 1`` there is no tolerance: a message that
comes after its slot starts the next interval from its own arrival, so the
lateness is lost, as in any bucket that holds a single token.)

One number is easy to share between workers: each reads the value, calls
:func:`take` for a whole batch of one sender's messages, and writes the new
value back with compare-and-set, retrying on conflict. The state is the TAT in
Unix milliseconds as ASCII decimal (``repr`` of a float, which round-trips
exactly), e.g. ``b"1796000000123.5"``. A state that does not parse is treated
as a fresh bucket, so a corrupt value can never wedge a sender.
"""

from __future__ import annotations

import math
from typing import Final

MAX_STATE_BYTES: Final = 32
# Guards the floor against float error, e.g. 2.9999999999999996 admitting 2.
_EPSILON: Final = 1e-9


def encode_state(tat_ms: float) -> bytes:
    """The stored form of a theoretical arrival time."""
    return repr(float(tat_ms)).encode("ascii")


def decode_state(state: bytes | None) -> float | None:
    """The theoretical arrival time in ``state``, or None if absent or unreadable."""
    if state is None or not 0 < len(state) <= MAX_STATE_BYTES:
        return None
    try:
        tat = float(state)
    except ValueError:
        return None
    return tat if math.isfinite(tat) else None


def take(
    state: bytes | None, now_ms: float, rate: float, burst: int, n: int = 1
) -> tuple[int, bytes]:
    """Admit up to ``n`` messages at ``now_ms``; return how many, and the new state.

    ``rate`` is in messages per second (> 0) and ``burst`` the bucket size
    (>= 1). Admission is all-or-some in arrival order: the first ``k`` of the
    ``n`` messages are admitted and the rest are over the limit. When nothing
    is admitted the state returned is ``state`` itself, so the caller can skip
    the write.
    """
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of messages per second, got {rate!r}")
    if burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    interval = 1000.0 / rate
    tolerance = (burst - 1) * interval
    tat = decode_state(state)
    start = now_ms if tat is None or tat < now_ms else tat
    slots = math.floor((now_ms + tolerance - start) / interval + _EPSILON) + 1
    admitted = max(0, min(n, slots))
    if admitted == 0:
        return 0, state if state is not None and tat is not None else encode_state(start)
    return admitted, encode_state(start + admitted * interval)
