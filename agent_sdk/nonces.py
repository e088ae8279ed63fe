"""Nonces for ``Symbi-Nonce``: unique per sender, also across restarts.

Policy workers reject a (sender, nonce) pair seen before within the clock-skew
window, so a restarted agent must not reuse a nonce from its previous run. The
nonce is therefore the wall clock in nanoseconds, bumped by one whenever the
clock has not moved on since the last one: a process never issues anywhere near
one nonce per nanosecond, so the counter stays at the clock and a new process
starts above everything the old one issued. That holds unless the clock is
stepped back across a restart, or two processes share one identity at once;
both are outside what an agent is expected to do.
"""

from __future__ import annotations

import threading
import time
from typing import Final

from agent_sdk.errors import ConfigError

MAX_NONCE: Final = 2**64 - 1


class NonceSource:
    """A strictly increasing, thread-safe source of unsigned 64-bit nonces."""

    __slots__ = ("_last", "_lock")

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        """A nonce greater than every nonce this source has returned before."""
        with self._lock:
            nonce = max(self._last + 1, time.time_ns())
            if nonce > MAX_NONCE:  # year 2554, or a clock set far ahead
                raise ConfigError("the system clock is beyond the 64-bit nonce range")
            self._last = nonce
            return nonce
