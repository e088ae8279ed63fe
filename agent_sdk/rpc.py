"""Matching rpc answers to the requests waiting for them.

An answer is a ``Symbi-Type: rpc`` message whose ``Symbi-Reply-To`` is the
request's ``Symbi-Id``. Only the request's recipient (and the workers) ever
saw that id, but a worker routes any correctly signed message, so an answer
from another agent than the one asked is refused as a security event rather
than accepted on the strength of a guessed or leaked id.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from agent_sdk.errors import SymbiError
from agent_sdk.inbox import Message, SecurityEvent

log = logging.getLogger(__name__)


class PendingRequests:
    """Futures of the requests in flight, keyed by request id."""

    def __init__(
        self, counters: collections.Counter[str], report: Callable[[SecurityEvent], None]
    ) -> None:
        self._counters = counters
        self._report = report
        self._pending: dict[str, tuple[asyncio.Future[Message], str | None]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def add(self, request_id: str, expected_sender: str | None) -> asyncio.Future[Message]:
        """Wait for an answer to ``request_id``, from ``expected_sender`` if not None."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, expected_sender)
        return future

    def discard(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def resolve(self, answer: Message) -> None:
        """Hand a verified answer to its request; count it as late if none waits."""
        pending = self._pending.get(answer.reply_to or "")
        if pending is None or pending[0].done():
            self._counters["late_replies"] += 1
            log.debug("answer %s to %s came after its request ended", answer.id, answer.reply_to)
            return
        future, expected = pending
        if expected is not None and answer.sender != expected:
            detail = f"answer to a request sent to {expected}"
            self._report(
                SecurityEvent("unexpected_reply", detail, answer.subject, answer.id, answer.sender)
            )
            return
        self._counters["replies"] += 1
        future.set_result(answer)

    def fail_all(self, error: SymbiError) -> None:
        """End every waiting request with ``error`` (the client is closing)."""
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(error)
