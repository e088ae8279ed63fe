"""Publishing to the outbox with retries, a circuit breaker and nats errors mapped.

Every attempt of one publish sends the same headers, so the same
``Nats-Msg-Id``: a retry after a lost PubAck is recognised by the ingress
stream as a duplicate and stored once. A PubAck marked ``duplicate`` on the
*first* attempt, however, means that the id was already in the stream's window
before this client ever sent it: an id collision (or another sender reusing
the id), and the message was dropped. That is reported as a
:class:`~agent_sdk.errors.PublishError` rather than as success.

nats-py and OS errors stop here: callers see only
:class:`~agent_sdk.errors.PublishError` and its subclass
:class:`~agent_sdk.errors.CircuitOpenError`, each chained ``from`` the cause.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import nats.errors
import nats.js.errors
from nats.js.api import PubAck

from agent_sdk.circuit import CircuitBreaker, CircuitState
from agent_sdk.errors import CircuitOpenError, PublishError
from agent_sdk.retry import RetryPolicy

log = logging.getLogger(__name__)

# The server (or the path to it) did not answer: worth another attempt.
RETRYABLE: Final[tuple[type[BaseException], ...]] = (
    nats.errors.TimeoutError,  # includes FlushTimeoutError
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    asyncio.TimeoutError,
    OSError,
)
# This connection will never deliver again: a failure for the breaker, no retry.
CLOSED: Final[tuple[type[BaseException], ...]] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
)


class JetStreamPublisher(Protocol):
    """The one nats-py call the publisher needs (``JetStreamContext.publish``): a test seam."""

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> PubAck: ...


class ReliablePublisher:
    """Publishes one message at a time through retries and a shared circuit breaker."""

    def __init__(
        self,
        js: JetStreamPublisher,
        *,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        timeout_s: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._js = js
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self.timeout_s = timeout_s
        self._sleep = sleep

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        """Publish until acknowledged, the attempts run out or the circuit opens.

        Raises :class:`CircuitOpenError` when the breaker refuses an attempt or
        opened on the last one, else :class:`PublishError` (retries exhausted,
        connection closed, the server refused, or an id collision). Either way
        the message was not acknowledged, which does not prove that it was not
        stored: nats-py may still send a publish buffered while reconnecting.
        """
        msg_id = headers.get("Nats-Msg-Id", "")
        last: BaseException | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                self.breaker.acquire()
            except CircuitOpenError as exc:
                if last is None:
                    raise
                raise CircuitOpenError(f"{exc} (last error: {_describe(last)})") from last
            try:
                ack = await self._js.publish(
                    subject, payload, timeout=self.timeout_s, headers=dict(headers)
                )
            except RETRYABLE as exc:
                self.breaker.record_failure()
                last = exc
                log.debug("publish %s attempt %d failed: %s", msg_id, attempt, _describe(exc))
                if attempt < self.retry.max_attempts:
                    await self._sleep(self.retry.delay(attempt))
                continue
            except CLOSED as exc:
                self.breaker.record_failure()
                raise PublishError(f"cannot publish {msg_id}: the connection is closed") from exc
            except nats.errors.Error as exc:
                # A definite refusal (stream error, payload too large, ...): the bus is reachable.
                self.breaker.record_success()
                raise PublishError(f"publish {msg_id} refused: {_describe(exc)}") from exc
            except BaseException:
                self.breaker.release()  # cancelled, or a bug: no verdict on the bus
                raise
            self.breaker.record_success()
            if ack.duplicate and attempt == 1:
                raise PublishError(
                    f"message id {msg_id} was already in the stream's deduplication window "
                    "before this publish: id collision, message not stored"
                )
            return ack
        assert last is not None
        failed = f"publish {msg_id} not acknowledged after {self.retry.max_attempts} attempts"
        if self.breaker.state is CircuitState.OPEN:  # tell the caller that the next ones fail fast
            raise CircuitOpenError(
                f"{failed}, and publishing is now paused: {_describe(last)}"
            ) from last
        raise PublishError(f"{failed}: {_describe(last)}") from last


def _describe(exc: BaseException) -> str:
    """Exception type and text (nats-py's messages carry no payloads or secrets)."""
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name
