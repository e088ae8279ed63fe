"""Reporting deliveries that the client dropped: counted, logged, and passed to a callback.

A dropped delivery is a security signal (a forged message, junk aimed at the
inbox through a reply subject, a misrouted delivery), so the user can hook
``on_security_event`` to alert on it. The payload is never logged. Warnings
are limited to one per reason per second, because another agent can flood
this agent's live inbox with junk, and must not be able to flood its log too;
counters and the callback still see every event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from agent_sdk.inbox import SecurityEvent

log = logging.getLogger(__name__)

SecurityCallback = Callable[[SecurityEvent], Awaitable[None] | None]

_WARN_EVERY_S: Final = 1.0
_PREFIX: Final = "security:"


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters since connect; ``security_by_reason`` splits ``security_events``.

    ``received`` counts messages handed to the user, ``acked`` those acknowledged
    after handling, ``duplicates`` redeliveries dropped by the dedup window, and
    ``late_replies`` rpc answers that came after their request ended.
    """

    published: int
    publish_failures: int
    received: int
    acked: int
    duplicates: int
    replies: int
    late_replies: int
    handler_failures: int
    security_events: int
    security_by_reason: dict[str, int]

    @classmethod
    def from_counters(cls, c: collections.Counter[str]) -> ClientStats:
        by_reason = {k.removeprefix(_PREFIX): v for k, v in c.items() if k.startswith(_PREFIX)}
        return cls(
            published=c["published"],
            publish_failures=c["publish_failures"],
            received=c["received"],
            acked=c["acked"],
            duplicates=c["duplicates"],
            replies=c["replies"],
            late_replies=c["late_replies"],
            handler_failures=c["handler_failures"],
            security_events=sum(by_reason.values()),
            security_by_reason=by_reason,
        )


class SecurityReporter:
    """Counts, logs and forwards :class:`SecurityEvent` objects for one agent."""

    def __init__(
        self,
        address: str,
        counters: collections.Counter[str],
        callback: SecurityCallback | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = address
        self._counters = counters
        self._callback = callback
        self._clock = clock
        self._last_warning: dict[str, float] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    def __call__(self, event: SecurityEvent) -> None:
        self._counters[_PREFIX + event.reason] += 1
        now = self._clock()
        if now - self._last_warning.get(event.reason, now - _WARN_EVERY_S) >= _WARN_EVERY_S:
            self._last_warning[event.reason] = now
            log.warning(
                "%s dropped a delivery (%s): %s [id=%s from=%s subject=%s]",
                self._address,
                event.reason,
                event.detail,
                event.msg_id,
                event.sender,
                event.subject,
            )
        if self._callback is None:
            return
        try:
            result = self._callback(event)
        except Exception:
            log.exception("on_security_event callback failed")
            return
        if result is not None:
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_security_event callback failed", exc_info=task.exception())

    async def close(self) -> None:
        """Cancel callbacks still running (the client is closing)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
