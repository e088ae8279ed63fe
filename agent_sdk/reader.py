"""Reading the durable inbox: fetch, verify, deduplicate, and acknowledge only once handled.

One background task pulls from the agent's durable consumer (bound by name:
the credentials refuse ``CONSUMER.INFO``, which a plain ``pull_subscribe``
needs), one message per pull so that a lone message is never held back
waiting for a batch to fill. Each delivery then goes one of three ways:

- rejected by :class:`~agent_sdk.inbox.InboxVerifier`: reported, acknowledged
  and dropped, so junk cannot wedge the inbox by being redelivered for ever;
- an rpc answer, or a (sender, id) already handled: given to ``on_reply`` or
  dropped, and acknowledged at once;
- otherwise queued for the user, and acknowledged only when the user's code
  has handled it (:meth:`InboxReader.ack`), or negatively acknowledged for
  redelivery when it failed.

At most ``prefetch`` deliveries are held unacknowledged at a time; while one
is held, the server is told every ``progress_interval_s`` that it is still in
progress, so a slow handler does not get it redelivered behind its back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agent_sdk.errors import BrokerError
from agent_sdk.inbox import DedupWindow, InboxVerifier, Message, SecurityEvent
from agent_sdk.options import ClientOptions

log = logging.getLogger(__name__)

_CLOSED: Final = object()


@dataclass(eq=False, slots=True)
class Delivery:
    """One verified message held unacknowledged, with the NATS message that settles it."""

    message: Message
    raw: Msg = field(repr=False)
    seq: int
    num_delivered: int
    progress_at: float
    settled: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.message.sender, self.message.id)


class InboxReader:
    """The durable inbox of one agent, as a queue of :class:`Delivery` objects."""

    def __init__(
        self,
        psub: JetStreamContext.PullSubscription,
        verifier: InboxVerifier,
        options: ClientOptions,
        *,
        stream: str,
        consumer: str,
        on_reply: Callable[[Message], None],
        on_rejected: Callable[[SecurityEvent], None],
        dedup: DedupWindow,
        counters: collections.Counter[str],
    ) -> None:
        self._psub = psub
        self._verifier = verifier
        self._options = options
        self._stream = stream
        self._consumer = consumer
        self._on_reply = on_reply
        self._on_rejected = on_rejected
        self._dedup = dedup
        self._counters = counters
        self._queue: asyncio.Queue[Delivery | object] = asyncio.Queue()
        self._held: dict[tuple[str, str], Delivery] = {}
        self._permits = asyncio.Semaphore(options.prefetch)
        self._abandoned: list[Delivery] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._failure: BrokerError | None = None
        self._tasks = [
            asyncio.create_task(self._fetch_loop(), name="symbi-inbox-fetch"),
            asyncio.create_task(self._keepalive_loop(), name="symbi-inbox-keepalive"),
        ]

    # -- consumer side --------------------------------------------------------

    async def next(self) -> Delivery | None:
        """The next delivery to handle, or None once the reader is closed.

        Raises :class:`BrokerError` if the connection closed for good under it
        (rather than ending quietly, which would look like an empty inbox).
        """
        item = _CLOSED if self._closed else await self._queue.get()
        if isinstance(item, Delivery):
            return item
        self._queue.put_nowait(_CLOSED)  # let every other waiting consumer see it too
        if self._failure is not None:
            raise self._failure
        return None

    async def ack(self, delivery: Delivery) -> None:
        """Handled: acknowledge, and remember its (sender, id) against redeliveries."""
        if not delivery.settled:  # not handed back meanwhile (by close)
            self._dedup.add(delivery.key)
        await self._settle(delivery, "ack")

    async def nak(self, delivery: Delivery, delay_s: float | None = None) -> None:
        """Not handled: ask for redelivery, after ``delay_s`` if given."""
        await self._settle(delivery, "nak", delay_s)

    async def term(self, delivery: Delivery) -> None:
        """Give up on it: no redelivery (remembered like a handled message)."""
        if not delivery.settled:
            self._dedup.add(delivery.key)
        await self._settle(delivery, "term")

    def abandon(self, delivery: Delivery) -> None:
        """Synchronous hand-back (from a finaliser): the reader asks for redelivery soon."""
        if delivery.settled:
            return
        self._abandoned.append(delivery)
        with contextlib.suppress(RuntimeError):  # the loop is already gone: nothing to wake
            asyncio.get_running_loop().call_soon(self._wake.set)

    async def close(self) -> None:
        """Stop fetching and hand every held delivery back for redelivery."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for delivery in list(self._held.values()):
            await self._settle(delivery, "nak")
        self._queue.put_nowait(_CLOSED)

    # -- settling ---------------------------------------------------------------

    async def _settle(self, delivery: Delivery, how: str, delay_s: float | None = None) -> None:
        if delivery.settled:
            return
        delivery.settled = True
        if self._held.get(delivery.key) is delivery:
            del self._held[delivery.key]
            self._permits.release()
        try:
            if how == "ack":
                await delivery.raw.ack()
                self._counters["acked"] += 1
            elif how == "term":
                await delivery.raw.term()
            else:
                await delivery.raw.nak(delay=delay_s)
        except nats.errors.Error as exc:
            # Only the ack is lost: the server redelivers, and the dedup window catches it.
            log.warning("could not %s message %s: %s", how, delivery.message.id, exc)

    async def _ack_raw(self, msg: Msg) -> None:
        with contextlib.suppress(nats.errors.Error):
            await msg.ack()

    # -- background tasks ---------------------------------------------------------

    async def _fetch_loop(self) -> None:
        try:
            await self._fetch_forever()
        except nats.errors.ConnectionClosedError as exc:
            self._fail(BrokerError("the connection to NATS is closed"), exc)
        except Exception as exc:  # a bug: end the consumers' wait instead of hanging them
            log.exception("the inbox reader stopped")
            self._fail(BrokerError("the inbox reader stopped unexpectedly"), exc)

    def _fail(self, error: BrokerError, cause: BaseException) -> None:
        error.__cause__ = cause
        self._failure = error
        self._closed = True
        self._queue.put_nowait(_CLOSED)

    async def _fetch_forever(self) -> None:
        failures = 0
        # Not only cancellation ends it: on Python 3.11, asyncio.wait_for (inside
        # nats-py's fetch) swallows a cancel that races a message arriving.
        while not self._closed:
            await self._permits.acquire()
            queued = False
            try:
                try:
                    [msg] = await self._psub.fetch(1, timeout=self._options.fetch_timeout_s)
                except TimeoutError:  # nats-py's and asyncio's: an empty inbox, not a fault
                    failures = 0
                    continue
                except nats.errors.ConnectionClosedError:
                    raise
                except (nats.errors.Error, OSError) as exc:
                    failures += 1
                    wait = min(2.0, 0.1 * 2 ** min(failures, 5))
                    log.warning("reading the inbox failed (%s); retrying in %.1f s", exc, wait)
                    await asyncio.sleep(wait)
                    continue
                failures = 0
                queued = await self._accept(msg)
            finally:
                if not queued:
                    self._permits.release()

    async def _accept(self, msg: Msg) -> bool:
        """Sort one fetched message; True if it was queued for the user (holding a permit)."""
        if not self._is_own_ack(msg.reply):
            # Not from the inbox consumer: it cannot be acknowledged, nor trusted.
            self._on_rejected(
                SecurityEvent("malformed", "not a delivery of this agent's inbox", msg.subject)
            )
            return False
        result = self._verifier.check(msg.subject, msg.headers, msg.data)
        if isinstance(result, SecurityEvent):
            self._on_rejected(result)
            await self._ack_raw(msg)
            return False
        if result.is_reply:
            key = (result.sender, result.id)
            if key in self._dedup:
                self._counters["duplicates"] += 1
            else:
                self._dedup.add(key)
                self._on_reply(result)
            await self._ack_raw(msg)
            return False
        meta = msg.metadata
        delivery = Delivery(result, msg, meta.sequence.stream, meta.num_delivered, time.monotonic())
        held = self._held.get(delivery.key)
        if held is not None or delivery.key in self._dedup:
            self._counters["duplicates"] += 1
            if held is None or held.seq != delivery.seq:
                await self._ack_raw(msg)  # another stored copy; the held one decides
            return False  # else: a redelivery of the one being handled, settled with it
        self._held[delivery.key] = delivery
        self._queue.put_nowait(delivery)
        return True

    def _is_own_ack(self, reply: str) -> bool:
        """Whether ``reply`` acknowledges to this agent's consumer (v1 or v2 ack subject)."""
        tokens = reply.split(".")
        if len(tokens) < 9 or tokens[:2] != ["$JS", "ACK"]:
            return False
        at = 2 if len(tokens) == 9 else 4  # v2 adds a domain and an account hash
        return tokens[at : at + 2] == [self._stream, self._consumer]

    async def _keepalive_loop(self) -> None:
        interval = self._options.progress_interval_s
        while not self._closed:  # see _fetch_forever
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(interval, 1.0))
            self._wake.clear()
            abandoned, self._abandoned = self._abandoned, []
            for delivery in abandoned:
                await self.nak(delivery)
            now = time.monotonic()
            for delivery in list(self._held.values()):
                if now - delivery.progress_at >= interval and not delivery.settled:
                    delivery.progress_at = now
                    with contextlib.suppress(nats.errors.Error):
                        await delivery.raw.in_progress()
