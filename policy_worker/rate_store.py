"""The shared rate limiter: GCRA state per (sender, policy) in the KV bucket ``symbi_rates``.

Every worker admits a sender's messages against the same state, so the rate
holds across all workers: per batch, the messages of one sender under one
policy are admitted with ONE compare-and-set (:func:`~policy_worker.rate_limit.take`
admits up to ``n`` at once), retried on conflict with whichever worker wrote
in between.

Each worker remembers the last revision and value it saw per key and writes
with it directly, so the usual case (one worker busy with a sender) costs a
single round trip; a conflict means the memory is stale, and the entry is
read again. Skipping the write when the remembered state admits nothing is
safe: other workers only ever push the state forward, so a stale state can
only be more generous than the real one.

The key is ``<tier>.<id>.<policy name>`` and the state the theoretical arrival
time in ms; the bucket's TTL (an hour) forgets idle senders, whose state would
be "full bucket" anyway.

Local reserves
--------------
A round trip per batch is a large share of a worker's cost when batches are
small, so a worker that writes a key anyway may charge ``k`` more tokens than
the batch needs, keep them, and admit later messages of that key from them
with no round trip at all (:meth:`RateStore.admit_local`). The limit stays an
exact upper bound; the argument, with ``T`` the emission interval and ``tau``
the tolerance of :mod:`policy_worker.rate_limit`:

- *Slots.* A write that moves the TAT from ``V`` to ``tat1`` at ``now`` takes
  the slots ``[max(V, now), tat1)`` of the key's time line, ``T`` per message.
  The compare-and-set orders all writes of a key, each starting where the one
  before ended, so no two admissions, of any worker, share a slot.
- *The bound.* GCRA admits a message arriving at ``t`` only into a slot that
  starts at some ``s`` with ``t <= s <= t + tau``. The messages arriving in
  any window ``[a, b]`` then hold disjoint slots starting in ``[a, b + tau]``:
  at most ``(b - a + tau) / T + 1 = burst + rate * (b - a)`` of them.
- *A reserve* is the last ``k`` slots of a write, ``[tat_n, tat1)``, where
  ``tat_n`` is the TAT the batch's ``n`` messages alone would have written.
  A message arriving at ``u`` takes the next unused slot, or the slot starting
  at ``u`` if that one has passed (the slots behind ``u`` are lost), and only
  while the slot ends by ``tat1``: so ``u <= s`` by construction. The write
  admitted all ``n + k`` at its ``now``, so every slot it took starts by
  ``now + tau``, and a reserve is used only from that ``now`` on: so
  ``s <= u + tau``. Each local admission thus meets the very condition GCRA
  checks, and the bound above holds unchanged.

Keeping a reserve whole until ``tat1`` would not be safe: just before
``tat1`` the shared bucket has refilled to ``burst - 1`` tokens, and the
reserve would add ``k`` more at one instant. Slots passing with time is what
makes tokens charged early as good as tokens charged on use.

The reserve size is ``k = floor(min(rate * RESERVE_S, burst / 8))`` (0, no
reserve, for small bursts), so a reserve covers at most ``RESERVE_S`` of the
sender's time line. A reserve is taken only if at least half the burst is
still free after it: near its limit a sender is judged by the shared state
alone, where tokens held by one worker would be missed by the others. Unused
slots are lost, charged to the sender (they refill at its rate): with ``W``
workers each holding a reserve for one sender, that sender can be limited up
to ``W * k`` messages early, never late.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from agent_sdk.errors import BrokerError
from broker_gateway.streams import RATE_BUCKET
from policy_worker.broker import JetStreamIO, RevisionConflict
from policy_worker.rate_limit import decode_state, take

_CAS_ATTEMPTS: Final = 20
_CACHE_SIZE: Final = 10_000
RESERVE_S: Final = 0.1


def rate_key(sender: str, policy: str) -> str:
    """The KV key of ``sender``'s state under ``policy`` (both already validated)."""
    return f"{sender}.{policy}"


def reserve_size(rate: float, burst: int) -> int:
    """How many tokens a write may charge ahead for later local admissions (0: none)."""
    return math.floor(min(rate * RESERVE_S, burst / 8))


@dataclass(slots=True)
class Reserve:
    """Slots of a key's time line that this worker charged and has not used yet.

    The unused slots are ``left`` intervals from ``next_ms`` on, all ending by
    ``end_ms`` (the TAT the charging write stored); ``charged_ms`` is that
    write's ``now``, before which the reserve must not be used (see module doc).
    """

    charged_ms: float
    next_ms: float
    end_ms: float
    interval_ms: float
    left: int

    def take_local(self, now_ms: float, n: int) -> int:
        """Use up to ``n`` slots for messages arriving at ``now_ms``; how many were used."""
        if now_ms < self.charged_ms:
            return 0
        if now_ms > self.next_ms:  # the slots behind now are gone; plain floor errs low
            fit = math.floor((self.end_ms - now_ms) / self.interval_ms)
            self.next_ms, self.left = now_ms, max(0, min(self.left, fit))
        used = min(n, self.left)
        self.next_ms += used * self.interval_ms
        self.left -= used
        return used


def charge_reserve(
    state: bytes | None, admitted_state: bytes, now_ms: float, rate: float, burst: int, n: int
) -> tuple[bytes, Reserve] | None:
    """The state that admits ``n`` plus a reserve, and the reserve; None if none is due.

    ``admitted_state`` is what :func:`take` wrote for the ``n`` alone. None when
    the key gets no reserve (``k == 0``) or the bucket would be less than half
    free after it: near its limit, a sender is judged by the shared state only.
    """
    k = reserve_size(rate, burst)
    if k == 0:
        return None
    got, charged = take(state, now_ms, rate, burst, n + k)
    if got < n + k or take(charged, now_ms, rate, burst, burst)[0] < burst / 2:
        return None
    tat_n, tat1 = decode_state(admitted_state), decode_state(charged)
    if tat_n is None or tat1 is None:  # never: take writes readable states
        return None
    return charged, Reserve(now_ms, tat_n, tat1, 1000.0 / rate, k)


class RateStore:
    """Admits batches of messages against the shared GCRA state, and from local reserves."""

    def __init__(self, io: JetStreamIO, bucket: str = RATE_BUCKET) -> None:
        self.io = io
        self.bucket = bucket
        # key -> (revision, value); revision 0 means "no entry".
        self._seen: OrderedDict[str, tuple[int, bytes | None]] = OrderedDict()
        self._reserves: dict[str, Reserve] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.conflicts = 0
        self.local_admissions = 0

    def admit_local(self, key: str, now_ms: float, n: int) -> int:
        """How many of ``n`` messages (the first ones) this worker's reserve admits.

        Synchronous and without I/O: the rest, if any, must go through
        :meth:`admit`. A reserve that has run out or expired is forgotten.
        """
        reserve = self._reserves.get(key)
        if reserve is None or n <= 0:
            return 0
        used = reserve.take_local(now_ms, n)
        if reserve.left == 0:
            del self._reserves[key]
        self.local_admissions += used
        return used

    async def admit(self, key: str, *, now_ms: float, rate: float, burst: int, n: int) -> int:
        """How many of ``n`` messages (the first ones) are within the rate; records them.

        The reserve serves first, the shared state the rest.
        """
        if n <= 0:
            return 0
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:  # overlapping batches of this worker take turns, not conflicts
            # Again under the lock: the batch ahead of this one may have left a reserve.
            local = self.admit_local(key, now_ms, n)
            if local == n:
                return n
            return local + await self._admit(key, now_ms, rate, burst, n - local)

    async def _admit(self, key: str, now_ms: float, rate: float, burst: int, n: int) -> int:
        for _ in range(_CAS_ATTEMPTS):
            seen = self._seen.get(key)
            if seen is None:
                entry = await self.io.kv_get(self.bucket, key)
                seen = (0, None) if entry is None else (entry.revision, entry.value)
            revision, state = seen
            admitted, new_state = take(state, now_ms, rate, burst, n)
            if admitted == 0:
                self._remember(key, seen)
                return 0
            charged = None
            if admitted == n:
                charged = charge_reserve(state, new_state, now_ms, rate, burst, n)
            if charged is not None:
                new_state = charged[0]
            try:
                new_revision = await self.io.kv_write(self.bucket, key, new_state, revision)
            except RevisionConflict:
                self.conflicts += 1
                self._seen.pop(key, None)
                continue
            self._remember(key, (new_revision, new_state))
            if charged is not None:
                self._keep(key, charged[1])
            return admitted
        raise BrokerError(f"rate state {key} is contended: gave up after {_CAS_ATTEMPTS} tries")

    def _remember(self, key: str, seen: tuple[int, bytes | None]) -> None:
        self._seen[key] = seen
        self._seen.move_to_end(key)
        while len(self._seen) > _CACHE_SIZE:
            self._seen.popitem(last=False)

    def _keep(self, key: str, reserve: Reserve) -> None:
        """Hold ``reserve`` for ``key``, replacing any older one (its slots are lost)."""
        self._reserves.pop(key, None)
        self._reserves[key] = reserve
        while len(self._reserves) > _CACHE_SIZE:
            del self._reserves[next(iter(self._reserves))]
