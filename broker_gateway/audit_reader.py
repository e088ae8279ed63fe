"""Reading the AUDIT stream from a point in time, once or following it.

Used by ``symbi audit`` and the demo's report: an ephemeral consumer that
starts at ``since``; it stops once it has caught up with what the stream held
when reading began, unless ``follow`` is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker_gateway.streams import AUDIT


async def read_audit(
    js: JetStreamContext,
    since: datetime,
    follow: bool = False,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """Yield each audit record (raw JSON bytes, exactly as stored) from ``since`` on."""
    last = (await js.stream_info(AUDIT)).state.last_seq
    sub = await js.pull_subscribe(
        "audit.>",
        durable=None,
        stream=AUDIT,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
        ),
    )
    try:
        caught_up = False
        while stop is None or not stop.is_set():
            try:
                batch = await sub.fetch(256, timeout=1.0)
            except (NatsTimeout, TimeoutError):  # nats.py raises either
                batch = []
                caught_up = True
            for msg in batch:
                yield msg.data
                if msg.metadata.sequence.stream >= last:
                    caught_up = True
            if caught_up and not follow:
                return
    finally:
        await sub.unsubscribe()
