"""nats-py's client, with the messages of chosen subscriptions handed straight to a function.

nats-py delivers every message of a subscription with a callback through an
``asyncio.Queue`` read by a task of its own: per message a ``Msg`` object, a
queue put, a task wake-up and a coroutine call, before the callback can
resolve whatever waits for it. A worker receives several messages per ingress
message (the message itself and a PubAck for each of its publishes), and at a
thousand messages a second that hop was a large share of its event loop's
time. :class:`DirectClient` lets the worker's two hot subscriptions skip it:

- :meth:`DirectClient.on_raw` hands the raw bytes to a plain function, at once,
  from the connection's read loop (PubAcks: no ``Msg``, no header parsing);
- :meth:`DirectClient.on_msg` builds the ``Msg`` exactly as nats-py would
  (headers parsed by nats-py's own code, so statuses and odd headers read the
  same) and calls a plain function with it, without the queue.

It also parses header lines the way nats-py does, but remembers which raw
names it has already judged (an ingress message carries a dozen headers, the
same names every time), instead of decoding and scanning each name per
message: the same result, cheaper (tests/test_direct_client.py compares the
two on random header blocks).

Every other subscription (JetStream API requests, KV reads, the registry
watch) takes nats-py's usual path. The handlers run inside the read loop, so
they must be quick and must not raise: an exception is logged and the message
dropped, as nats-py's own callbacks do through the error callback.

This overrides ``Client._process_msg``, a private method of nats-py (2.16 as
pinned in ``pyproject.toml``); tests/test_direct_client.py fails if a nats-py
upgrade changes how it is called.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_CRLF: Final = b"\r\n"
_MAX_NAMES: Final = 4096

RawHandler = Callable[[bytes, bytes, bytes], None]
"""``(subject, data, raw headers)``: raw headers are ``b""`` when there are none."""
MsgHandler = Callable[[Msg], None]


class DirectClient(Client):
    """A ``nats.aio.client.Client`` that dispatches some subscriptions directly."""

    def __init__(self) -> None:
        super().__init__()
        self._raw_handlers: dict[int, RawHandler] = {}
        self._msg_handlers: dict[int, MsgHandler] = {}

    def on_raw(self, sub: Subscription, handler: RawHandler) -> None:
        """Hand ``sub``'s messages to ``handler`` as bytes (subscribe without a callback)."""
        self._raw_handlers[sub._id] = handler

    def on_msg(self, sub: Subscription, handler: MsgHandler) -> None:
        """Hand ``sub``'s messages to ``handler`` as ``Msg`` objects, without nats-py's queue."""
        self._msg_handlers[sub._id] = handler

    def forget(self, sub: Subscription) -> None:
        """Stop dispatching ``sub`` directly (before unsubscribing it)."""
        self._raw_handlers.pop(sub._id, None)
        self._msg_handlers.pop(sub._id, None)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        raw = self._raw_handlers.get(sid)
        if raw is not None:
            self._count(data)
            try:
                raw(subject, data, headers or b"")
            except Exception:
                log.exception("handling a message on %r failed", subject[:128])
            return
        handler = self._msg_handlers.get(sid)
        if handler is None or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self._count(data)
        hdr = await self._process_headers(headers)
        msg = self._build_message(sid, subject, reply, data, hdr)
        try:
            handler(msg)
        except Exception:
            log.exception("handling a message on %r failed", subject[:128])

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        """``Client._parse_header_lines``, with each distinct raw name judged once."""
        out: dict[str, str] = {}
        names = _NAMES
        for line in raw.split(_CRLF):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = names[name]
            except KeyError:
                key = header_name(name)
                if len(names) < _MAX_NAMES:
                    names[name] = key
            if key is None:
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out

    def _count(self, data: bytes) -> None:
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)


_NAMES: dict[bytes, str | None] = {}


def header_name(name: bytes) -> str | None:
    """What nats-py makes of a raw header name: the stripped ASCII token, or None (skipped)."""
    try:
        key = name.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    return None if any(c.isspace() for c in key) else key


def status_of(raw_headers: bytes) -> str:
    """The inline status of a header block (``NATS/1.0 503\\r\\n\\r\\n`` gives "503"), or ""."""
    first, _, _ = raw_headers.partition(b"\r\n")
    parts = first.split(None, 2)
    if len(parts) >= 2 and parts[1].isdigit():
        return parts[1].decode("ascii")
    return ""
