"""The fetch loop: pull requests kept open on the shared ``workers`` consumer.

nats-py's ``fetch(n, timeout)`` returns only when ``n`` messages have come or
the timeout has passed, so under light load every message would wait for the
timeout (see the team's measurement notes). Instead, this consumer keeps its
own pull requests open on the durable consumer (exactly what
``pull_subscribe_bind`` + ``fetch`` send, on a private inbox) and hands out
*whatever has arrived* as soon as at least one message is there: a batch is
one message under light load and up to ``window`` under a backlog, with no
waiting either way.

Accounting: ``outstanding`` counts messages requested but not yet received.
It drops by one per message and, when a request ends early, by the
``Nats-Pending-Messages`` of its 408/409 status. New requests top it up to
``window`` (counting messages received but not yet taken) once half of it is
used, so the next messages are already on their way while a batch is being
processed. Requests expire after ``expires_s``: that bounds how long a
stopping worker waits for messages already assigned to it (none are stranded
until the 30 s ack wait), and a lost request (after a reconnect) is renewed
after the watchdog interval.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from agent_sdk.errors import BrokerError
from broker_gateway.server import MAX_PAYLOAD
from policy_worker.direct_client import DirectClient

log = logging.getLogger(__name__)

STATUS: Final = "Status"
PENDING_MESSAGES: Final = "Nats-Pending-Messages"


def request_bytes(max_payload: int) -> int:
    """Bytes per pull request, for a server whose largest message is ``max_payload``.

    More than that message, so one always fits (a request too small for the
    next message would wait for it forever), and small enough that the two
    requests a worker may have open stay well under the bytes the server
    queues for one connection (``max_pending``: MAX_PENDING in ``symbi up``'s
    server, 64 MiB by default in one's own): past it the server cuts the
    worker off as a slow consumer, and every PubAck of its batches in flight
    is lost.
    """
    largest = max(max_payload, MAX_PAYLOAD)
    return largest + largest // 4


# A batch stops growing past this many bytes (it holds at least one message),
# so that a backlog of big messages is processed a few MiB at a time: its
# publishes get their PubAcks well within the operation timeout, and the
# worker's memory stays bounded whatever the message size.
MAX_BYTES_PER_BATCH: Final = MAX_PAYLOAD
_ERROR_BACKOFF_S: Final = 0.5


class PullConsumer:
    """A stream of batches from one durable pull consumer."""

    def __init__(
        self, nc: DirectClient, stream: str, consumer: str, *, window: int, expires_s: float
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self.window = window
        self.expires_s = expires_s
        self.outstanding = 0
        self.requests = 0
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._buffer: collections.deque[Msg] = collections.deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._last_request = 0.0
        self._last_activity = 0.0
        self._paused_until = 0.0
        self._oldest_at = 0.0  # when the oldest message in the buffer arrived

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        try:  # pulled messages straight from the read loop, without nats-py's queue
            self._sub = await self.nc.subscribe(self._inbox)
            self.nc.on_msg(self._sub, self._take)
        except NatsError as exc:
            raise BrokerError(f"cannot subscribe for pulled messages: {exc!r}") from exc

    @property
    def idle(self) -> bool:
        """Nothing requested is still on its way, and nothing received is left."""
        return self.outstanding == 0 and not self._buffer

    def stop_requesting(self) -> None:
        """Ask for nothing more; what was already requested still arrives."""
        self._stopping = True
        self._wakeup.set()

    def reset(self) -> None:
        """Forget open requests (after a reconnect the server has dropped them)."""
        self.outstanding = 0
        self._wakeup.set()

    async def release(self) -> int:
        """Hand back received but unprocessed messages at once (no waiting out the ack wait)."""
        released = 0
        while self._buffer:
            msg = self._buffer.popleft()
            try:
                await msg.nak()
            except NatsError as exc:
                log.debug("handing back a message failed: %r", exc)
                continue
            released += 1
        return released

    async def close(self) -> None:
        await self.release()
        if self._sub is not None:
            self.nc.forget(self._sub)
            try:
                await self._sub.unsubscribe()
            except NatsError as exc:
                log.debug("unsubscribing the pull inbox failed: %r", exc)
            self._sub = None

    async def next_batch(
        self, limit: int, wait_s: float, *, linger_s: float = 0.0, linger_below: int = 0
    ) -> list[Msg]:
        """Up to ``limit`` messages, as soon as one is there; [] after ``wait_s`` without any.

        With ``linger_s``, fewer than ``linger_below`` messages are handed out only
        once the oldest of them has waited that long, so that the messages coming
        meanwhile join the same batch (the caller asks for it while another batch
        is in flight, i.e. when starting this one at once would not finish it sooner).
        """
        deadline = time.monotonic() + wait_s
        while not self._buffer:
            await self._top_up()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._wakeup.clear()
            if self._buffer:
                break
            try:
                await asyncio.wait_for(self._wakeup.wait(), min(remaining, self.expires_s))
            except TimeoutError:
                self._watchdog()
        if linger_s > 0 and len(self._buffer) < linger_below:
            await self._linger(self._oldest_at + linger_s, linger_below)
        batch = take_batch(self._buffer, limit)
        if self._buffer:
            self._oldest_at = time.monotonic()
        await self._top_up()
        return batch

    async def _linger(self, until: float, enough: int) -> None:
        while len(self._buffer) < enough and not self._stopping:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _top_up(self) -> None:
        if self._stopping or self.nc.is_closed or not self.nc.is_connected:
            return
        now = time.monotonic()
        if now < self._paused_until:
            return
        free = self.window - self.outstanding - len(self._buffer)
        if free <= 0 or (self.outstanding > 0 and free < max(1, self.window // 2)):
            return
        request = {
            "batch": free,
            "expires": int(self.expires_s * 1e9),
            "max_bytes": request_bytes(self.nc.max_payload),
        }
        try:
            await self.nc.publish(
                self._next_subject, json.dumps(request).encode(), reply=self._inbox
            )
        except NatsError as exc:
            log.warning("pull request failed: %r", exc)
            self._paused_until = now + _ERROR_BACKOFF_S
            return
        self.outstanding += free
        self.requests += 1
        self._last_request = now

    def _watchdog(self) -> None:
        """Renew requests that neither delivered nor expired in time (lost on a reconnect)."""
        now = time.monotonic()
        silent = now - max(self._last_request, self._last_activity)
        if self.outstanding > 0 and silent > self.expires_s + 2.0:
            log.info("renewing %d pulled messages that never came", self.outstanding)
            self.outstanding = 0

    def _take(self, msg: Msg) -> None:
        self._last_activity = time.monotonic()
        if msg.reply:  # a message to process: it has its acknowledgement subject
            self.outstanding = max(0, self.outstanding - 1)
            if not self._buffer:
                self._oldest_at = self._last_activity
            self._buffer.append(msg)
            self._wakeup.set()
            return
        headers = msg.headers or {}
        status = headers.get(STATUS, "")
        if status == "100":  # idle heartbeat
            return
        try:
            left = int(headers.get(PENDING_MESSAGES, ""))
        except ValueError:
            left = self.outstanding  # unknown: assume the whole request is over
        self.outstanding = max(0, self.outstanding - left)
        description = headers.get("Description", "")
        if status not in ("404", "408", "409") or _abnormal_409(description):
            # No JetStream (503), a bad request, the consumer gone: not the normal end
            # of a request ("Batch Completed", "Request Timeout", "... MaxBytes"), so
            # don't ask again at once.
            log.warning("pull request ended: %s %s", status, description)
            self._paused_until = time.monotonic() + _ERROR_BACKOFF_S
        self._wakeup.set()


def take_batch(buffer: collections.deque[Msg], limit: int) -> list[Msg]:
    """Up to ``limit`` messages off ``buffer``, and at most MAX_BYTES_PER_BATCH (one at least)."""
    batch: list[Msg] = []
    size = 0
    while buffer and len(batch) < limit:
        size += len(buffer[0].data)  # headers are small and bounded; payloads are not
        if batch and size > MAX_BYTES_PER_BATCH:
            break
        batch.append(buffer.popleft())
    return batch


def _abnormal_409(description: str) -> bool:
    return any(word in description for word in ("Deleted", "push", "MaxWaiting", "Leadership"))
