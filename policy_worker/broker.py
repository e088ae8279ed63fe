"""The worker's one seam to JetStream: acknowledged publishes and KV reads and writes.

Everything a batch writes (deliveries, audit records, nonce entries, rate
state) goes through :meth:`JetStreamIO.publish_all`, which sends every
message at once and then waits for all the PubAcks together: one round trip
per batch stage instead of one per message. It is nats-py's
``publish_async`` pattern (a reply subject per publish under one wildcard
subscription) made leaner for this hot path: a counter instead of random
tokens, no semaphore, and PubAcks read into a small :class:`Ack` instead of
nats-py's dataclass, which roughly halves the client-side cost of a publish
(measured: about a quarter of a worker's CPU went there). A KV write is a
publish onto ``$KV.<bucket>.<key>`` with ``Nats-Expected-Last-Subject-Sequence``
(0 means "must not exist"), exactly what nats-py's ``KeyValue.create`` and
``update`` send.

nats errors are mapped here, at the boundary: a lost compare-and-set becomes
:class:`RevisionConflict`, anything else :class:`~agent_sdk.errors.PublishError`
or :class:`~agent_sdk.errors.BrokerError`. Results come back per message, so
one failed publish fails only the ingress message it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import BadHeaderError, ConnectionClosedError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agent_sdk.errors import BrokerError, PublishError
from policy_worker.direct_client import DirectClient, status_of

EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
# JSStreamWrongLastSequenceErrF and its constant variant.
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
# The usual PubAck, exactly as nats-server writes it (field order of its Go struct):
# read with one regular expression; anything else (errors above all) goes to json.
_PLAIN_ACK: Final = re.compile(
    rb'\{"stream":"([^"\\]+)",(?:"domain":"[^"\\]*",)?"seq":([0-9]{1,20})(,"duplicate":true)?\}'
)


# nats-py's own rules for header names and values.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_GOOD_NAMES: set[str] = set()
_MAX_GOOD_NAMES: Final = 4096
# Subjects that need no check beyond this (no white space, no empty token).
_PLAIN_SUBJECT: Final = re.compile(r"[^\s.]+(?:\.[^\s.]+)*")


class RevisionConflict(BrokerError):
    """A KV compare-and-set lost: the key exists, or changed since the given revision."""


@dataclass(slots=True)
class Publish:
    """One message to publish and have acknowledged by a stream."""

    subject: str
    payload: bytes = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)


@dataclass(frozen=True, slots=True)
class KvEntry:
    revision: int
    value: bytes


@dataclass(slots=True)
class Ack:
    """A stream's acknowledgement of one publish."""

    stream: str
    seq: int
    duplicate: bool = False


PublishResult = Ack | BrokerError

# Payload bytes that one wave of publishes may carry (see JetStreamIO.publish_all).
WAVE_BYTES: Final = 16 * 1024 * 1024


def waves(requests: Sequence[Publish], limit: int) -> list[Sequence[Publish]]:
    """``requests`` cut, in order, into runs of at most ``limit`` payload bytes (one at least)."""
    if sum(len(r.payload) for r in requests) <= limit:
        return [requests]
    out: list[Sequence[Publish]] = []
    start, size = 0, 0
    for i, req in enumerate(requests):
        if i > start and size + len(req.payload) > limit:
            out.append(requests[start:i])
            start, size = i, 0
        size += len(req.payload)
    out.append(requests[start:])
    return out


class _Stage:
    """The replies to one :meth:`JetStreamIO.publish_all`, and ONE future set when all are in.

    One future per stage rather than per publish: a batch's PubAcks resolve
    nothing until the last one, and then wake the waiting batch once.
    """

    __slots__ = ("done", "missing", "replies")

    def __init__(self, size: int, done: asyncio.Future[None]) -> None:
        self.replies: list[Reply | BrokerError | None] = [None] * size
        self.missing = size
        self.done = done

    def answer(self, index: int, reply: Reply | BrokerError) -> None:
        if self.replies[index] is not None:
            return
        self.replies[index] = reply
        self.missing -= 1
        if self.missing == 0 and not self.done.done():
            self.done.set_result(None)


class JetStreamIO:
    """Acknowledged publishes and KV operations on one connection.

    :meth:`ack` acknowledges an ingress message lazily: the ``+ACK`` is queued
    on the connection without waking its flusher, so it rides along with the
    connection's next write (the next batch's first stage, usually) instead of
    costing a write of its own; a timer sends it after ``ack_delay_s`` at the
    latest. Nothing waits for an acknowledgement, and a lost one only means a
    redelivery, which the pipeline handles.
    """

    def __init__(self, nc: DirectClient, *, timeout_s: float, ack_delay_s: float = 0.002) -> None:
        self.nc = nc
        self.ack_delay_s = ack_delay_s
        self._ack_timer: asyncio.TimerHandle | None = None
        self.js: JetStreamContext = nc.jetstream(timeout=timeout_s)
        self.timeout_s = timeout_s
        self._kv: dict[str, KeyValue] = {}
        self._reply_prefix = ""
        self._reply_prefix_len = 0
        self._reply_sub: Subscription | None = None
        # reply token -> the stage that waits for it, and the publish's place in it
        self._waiting: dict[bytes, tuple[_Stage, int]] = {}
        self._tokens = itertools.count(1)

    async def open_bucket(self, bucket: str) -> KeyValue:
        """The KV handle of ``bucket``, kept for later reads."""
        try:
            kv = await self.js.key_value(bucket)
        except NatsError as exc:
            raise BrokerError(f"KV bucket {bucket} is not available: {exc!r}") from exc
        self._kv[bucket] = kv
        return kv

    async def _replies(self) -> str:
        if self._reply_sub is None:
            prefix = self.nc.new_inbox() + "."
            try:  # PubAcks straight from the read loop, as bytes
                self._reply_sub = await self.nc.subscribe(prefix + "*")
                self.nc.on_raw(self._reply_sub, self._on_raw_reply)
            except NatsError as exc:
                raise BrokerError(f"cannot subscribe for PubAcks: {exc!r}") from exc
            self._reply_prefix = prefix
            self._reply_prefix_len = len(prefix)
        return self._reply_prefix

    def _on_raw_reply(self, subject: bytes, data: bytes, headers: bytes) -> None:
        waiter = self._waiting.pop(subject[self._reply_prefix_len :], None)
        if waiter is not None:
            waiter[0].answer(waiter[1], Reply(data, status_of(headers) if headers else ""))

    async def publish_all(self, requests: Sequence[Publish]) -> list[PublishResult]:
        """Publish every request concurrently; one :class:`Ack` or error per request, in order.

        All at once up to :data:`WAVE_BYTES` of payload; beyond that (an event
        with many subscribers, big messages) in consecutive waves, each waiting
        for its PubAcks before the next goes out. A stream refuses a publish
        with "too many requests" once its ingest queue holds too much, and a
        worker that fanned a 4 MiB event out to a hundred inboxes at once would
        see most of it refused, and retried, and perhaps dead-lettered. Order
        is kept: a record that goes out ahead of a delivery is acknowledged
        before it, at the latest.
        """
        results: list[PublishResult] = []
        for wave in waves(requests, WAVE_BYTES):
            results.extend(await self._publish_wave(wave))
        return results

    async def _publish_wave(self, requests: Sequence[Publish]) -> list[PublishResult]:
        if not requests:
            return []
        prefix = await self._replies()
        stage = _Stage(len(requests), asyncio.get_running_loop().create_future())
        tokens: list[bytes | None] = []
        for index, req in enumerate(requests):
            number = str(next(self._tokens))
            token = number.encode("ascii")
            self._waiting[token] = (stage, index)
            try:
                await self._publish(req, prefix + number)
            except (NatsError, OSError) as exc:
                self._waiting.pop(token, None)
                stage.answer(index, PublishError(f"publish to {req.subject} failed: {exc!r}"))
                tokens.append(None)
                continue
            tokens.append(token)
        self._wake_flusher()
        if not stage.done.done():
            await asyncio.wait([stage.done], timeout=self.timeout_s)
        results: list[PublishResult] = []
        for sent, req, reply in zip(tokens, requests, stage.replies, strict=True):
            if isinstance(reply, Reply):
                results.append(read_ack(reply, req.subject))
            elif reply is not None:
                results.append(reply)
            else:
                if sent is not None:
                    self._waiting.pop(sent, None)
                results.append(PublishError(f"no PubAck for {req.subject} in time"))
        return results

    async def _publish(self, req: Publish, reply: str) -> None:
        """``nc.publish(...)``, with the headers encoded here and the flusher woken later.

        nats-py encodes headers one regular-expression check and five buffer
        extensions at a time; this writes the same bytes (names stripped and
        checked as tokens, values stripped, CR/LF turned into spaces) from one
        string, checking each distinct name once. Anything unusual (no
        connection, a draining or closed one, an oversized payload, a subject
        with white space) goes through ``nc.publish``, which raises as usual.
        """
        nc = self.nc
        subject, payload = req.subject, req.payload
        if (
            not nc.is_connected
            or nc.is_draining_pubs
            or len(payload) > nc._max_payload
            or not _PLAIN_SUBJECT.fullmatch(subject)
        ):
            headers = dict(req.headers) if req.headers else None
            await nc.publish(subject, payload, reply=reply, headers=headers)
            return
        if req.headers:
            parts = ["NATS/1.0\r\n"]
            for name, value in req.headers.items():
                key = name.strip()
                if not key:
                    continue
                if key not in _GOOD_NAMES:
                    if not _HEADER_NAME.fullmatch(key):
                        raise BadHeaderError(key)
                    if len(_GOOD_NAMES) < _MAX_GOOD_NAMES:
                        _GOOD_NAMES.add(key)
                value = value.strip()
                if "\r" in value or "\n" in value:  # str.translate is slow: only when needed
                    value = value.replace("\r", " ").replace("\n", " ")
                parts.append(f"{key}: {value}\r\n")
            parts.append("\r\n")
            head = "".join(parts).encode()
            size = len(head)
            cmd = b"".join(
                (
                    f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode(),
                    head,
                    payload,
                    b"\r\n",
                )
            )
        else:
            cmd = b"".join((f"PUB {subject} {reply} {len(payload)}\r\n".encode(), payload, b"\r\n"))
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += len(payload)
        await nc._send_command(cmd)

    def _wake_flusher(self) -> None:
        """What publish() does after queueing a command: let the flusher write it out."""
        queue = self.nc._flush_queue
        if queue is not None and queue.empty() and self.nc._pending_data_size > 0:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(asyncio.get_running_loop().create_future())

    async def ack(self, msg: Msg) -> None:
        """Acknowledge a JetStream message with the connection's next write (see the class doc)."""
        if msg._client is not self.nc or self.ack_delay_s <= 0 or not msg.reply:
            await msg.ack()  # another connection's message (a test's stand-in, say)
            return
        # Exactly what Msg.ack() sends (an empty publish to the reply subject), minus
        # the flusher's wake-up. Raises like publish() if the connection is closed.
        if self.nc.is_closed:
            raise ConnectionClosedError
        await self.nc._send_command(b"PUB " + msg.reply.encode() + b" 0\r\n\r\n")
        msg._ackd = True
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                self.ack_delay_s, self._flush_acks
            )

    def _flush_acks(self) -> None:
        self._ack_timer = None
        self._wake_flusher()

    async def publish(self, req: Publish) -> Ack:
        """Publish one message and return its :class:`Ack`, or raise."""
        [result] = await self.publish_all([req])
        if isinstance(result, BrokerError):
            raise result
        return result

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        """The current entry of ``key``, or None if there is none (or it was deleted)."""
        kv = self._kv.get(bucket) or await self.open_bucket(bucket)
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        except (TimeoutError, NatsError, OSError) as exc:
            raise BrokerError(f"KV read of {bucket}/{key} failed: {exc!r}") from exc
        if entry.revision is None:
            raise BrokerError(f"KV read of {bucket}/{key} returned no revision")
        return KvEntry(entry.revision, entry.value or b"")

    async def stored(self, stream: str, seq: int) -> bytes:
        """The payload of message ``seq`` of ``stream`` (an earlier audit record, say)."""
        try:
            raw = await self.js.get_msg(stream, seq)
        except (TimeoutError, NatsError, OSError) as exc:
            raise BrokerError(f"reading message {seq} of {stream} failed: {exc!r}") from exc
        return raw.data or b""

    @staticmethod
    def kv_write_request(bucket: str, key: str, value: bytes, last: int) -> Publish:
        """A compare-and-set write: ``last`` is the expected revision, 0 for "absent"."""
        return Publish(f"$KV.{bucket}.{key}", value, {EXPECTED_LAST_SUBJECT_SEQ: str(last)})

    async def kv_write(self, bucket: str, key: str, value: bytes, last: int) -> int:
        """Write ``key`` if its revision is still ``last``; the new revision, or raise."""
        ack = await self.publish(self.kv_write_request(bucket, key, value, last))
        return ack.seq


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back to a publish: the body, and the inline status of an empty one."""

    data: bytes
    status: str = ""


def read_ack(reply: Reply, subject: str) -> PublishResult:
    """The PubAck (or error) that a stream answered to a publish on ``subject``."""
    if not reply.data:  # a status: 503 no responders, i.e. no stream on that subject
        return PublishError(f"no stream took {subject} (status {reply.status or '?'})")
    plain = _PLAIN_ACK.fullmatch(reply.data)
    if plain is not None:
        return Ack(plain[1].decode("ascii"), int(plain[2]), plain[3] is not None)
    try:
        body = json.loads(reply.data)
        if "error" in body:
            error = body["error"]
            description = str(error.get("description", "error"))
            if error.get("err_code") in _WRONG_LAST_SEQUENCE:
                return RevisionConflict(f"{subject}: {description}")
            return PublishError(f"{subject}: {description}")
        return Ack(str(body["stream"]), int(body["seq"]), bool(body.get("duplicate", False)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return PublishError(f"unreadable PubAck for {subject}: {exc!r}")


async def close_quietly(nc: Client) -> None:
    """Drain and close a connection, ignoring a connection that is already gone."""
    with contextlib.suppress(NatsError, OSError, asyncio.TimeoutError):
        if not nc.is_closed:
            await nc.drain()
