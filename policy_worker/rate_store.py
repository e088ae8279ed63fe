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
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from typing import Final

from agent_sdk.errors import BrokerError
from broker_gateway.streams import RATE_BUCKET
from policy_worker.broker import JetStreamIO, RevisionConflict
from policy_worker.rate_limit import take

_CAS_ATTEMPTS: Final = 20
_CACHE_SIZE: Final = 10_000


def rate_key(sender: str, policy: str) -> str:
    """The KV key of ``sender``'s state under ``policy`` (both already validated)."""
    return f"{sender}.{policy}"


class RateStore:
    """Admits batches of messages against the shared GCRA state."""

    def __init__(self, io: JetStreamIO, bucket: str = RATE_BUCKET) -> None:
        self.io = io
        self.bucket = bucket
        # key -> (revision, value); revision 0 means "no entry".
        self._seen: OrderedDict[str, tuple[int, bytes | None]] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.conflicts = 0

    async def admit(self, key: str, *, now_ms: float, rate: float, burst: int, n: int) -> int:
        """How many of ``n`` messages (the first ones) are within the rate; records them."""
        if n <= 0:
            return 0
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:  # overlapping batches of this worker take turns, not conflicts
            return await self._admit(key, now_ms, rate, burst, n)

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
            try:
                new_revision = await self.io.kv_write(self.bucket, key, new_state, revision)
            except RevisionConflict:
                self.conflicts += 1
                self._seen.pop(key, None)
                continue
            self._remember(key, (new_revision, new_state))
            return admitted
        raise BrokerError(f"rate state {key} is contended: gave up after {_CAS_ATTEMPTS} tries")

    def _remember(self, key: str, seen: tuple[int, bytes | None]) -> None:
        self._seen[key] = seen
        self._seen.move_to_end(key)
        while len(self._seen) > _CACHE_SIZE:
            self._seen.popitem(last=False)
