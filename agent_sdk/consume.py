"""The two ways an agent consumes its inbox, and when each acknowledges a message.

A message is acknowledged only after the user's code has handled it, so a
crash in the middle of handling loses nothing: the server redelivers it, and
the reader's deduplication window keeps a message that *was* handled (but
whose acknowledgement got lost) from being handled twice.

- :class:`MessageStream`: ``async for msg in client.messages()``.
- :func:`run_handler`: ``await client.handle(handler)``, which also retries a
  failing message with a growing delay and finally gives up on it, so that one
  poison message cannot stall the agent for ever.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final

from agent_sdk.inbox import Message
from agent_sdk.options import ClientOptions
from agent_sdk.reader import Delivery, InboxReader
from agent_sdk.retry import RetryPolicy

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[None]]

# Redelivery after a handler failure: 0.5 s, 1 s, 2 s, ... (jittered), capped by the options.
_NAK_BASE_S: Final = 0.5


class MessageStream:
    """``async for msg in client.messages()``: each message is acknowledged when the next
    one is requested, i.e. after the loop body ran for it without raising.

    If the loop stops early (``break``, an exception, a cancelled task), the
    current message is handed back for redelivery, since whether its handling
    finished is unknown. Used as ``async with client.messages() as stream:``,
    a clean exit from the block acknowledges it instead and an exception hands
    it back.
    """

    def __init__(
        self, reader: Callable[[], Awaitable[InboxReader]], counters: collections.Counter[str]
    ) -> None:
        self._get_reader = reader
        self._reader: InboxReader | None = None
        self._counters = counters
        self._current: Delivery | None = None

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        await self._finish(success=True)
        if self._reader is None:
            self._reader = await self._get_reader()
        delivery = await self._reader.next()
        if delivery is None:
            raise StopAsyncIteration
        self._current = delivery
        self._counters["received"] += 1
        return delivery.message

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._finish(success=exc_type is None)

    async def aclose(self) -> None:
        """Stop, handing the current message (if any) back for redelivery."""
        await self._finish(success=False)

    async def _finish(self, *, success: bool) -> None:
        delivery, self._current = self._current, None
        if delivery is None or self._reader is None:
            return
        if success:
            await self._reader.ack(delivery)
        else:
            await self._reader.nak(delivery)

    def __del__(self) -> None:
        if self._current is not None and self._reader is not None:
            self._reader.abandon(self._current)


async def run_handler(
    reader: InboxReader,
    handler: Handler,
    options: ClientOptions,
    counters: collections.Counter[str],
    concurrency: int = 1,
) -> None:
    """Run ``handler`` on every delivery until the reader closes (see ``AgentClient.handle``)."""
    backoff = RetryPolicy(base_delay_s=_NAK_BASE_S, max_delay_s=options.nak_delay_max_s)

    async def settle_failure(delivery: Delivery, exc: Exception) -> None:
        counters["handler_failures"] += 1
        msg, attempt = delivery.message, delivery.num_delivered
        if attempt >= options.max_deliveries:
            log.error(
                "handler failed %d times on %s from %s (%s); giving up on it",
                attempt,
                msg.id,
                msg.sender,
                type(exc).__name__,
            )
            await reader.term(delivery)
            return
        # The traceback helps, and handlers should not put payloads in exception texts.
        log.warning("handler failed on %s from %s; redelivering", msg.id, msg.sender, exc_info=exc)
        # At least half the cap, so that a failure never means an immediate retry.
        await reader.nak(delivery, (backoff.backoff_cap(attempt) + backoff.delay(attempt)) / 2)

    async def work() -> None:
        while (delivery := await reader.next()) is not None:
            counters["received"] += 1
            try:
                await handler(delivery.message)
            except asyncio.CancelledError:
                await reader.nak(delivery)
                raise
            except Exception as exc:
                await settle_failure(delivery, exc)
            else:
                await reader.ack(delivery)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(work())
