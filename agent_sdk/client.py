"""The async client that agents use inside their sandboxes.

::

    async with await AgentClient.connect("/run/agent") as client:
        await client.send("gvisor.b1", b"hello", level="restricted")
        answer = await client.request("gvisor.b1", b"2+2?", level="restricted")
        async for msg in client.messages():  # acknowledged once the body has run
            ...

Everything the agent sends is signed with its own nkey and published to its
outbox, the only subject its credentials allow; the policy workers check it
and deliver it. Everything it receives is verified before the user sees it
(:mod:`agent_sdk.inbox`). rpc answers are matched to pending requests
(:mod:`agent_sdk.rpc`); they arrive both live (the quick path) and in the
durable inbox (the safe path), and whichever comes first answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from types import TracebackType
from typing import Any, Final, Literal

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from agent_sdk.circuit import CircuitBreaker
from agent_sdk.consume import Handler, MessageStream, run_handler
from agent_sdk.credentials import AgentConfig, Credentials
from agent_sdk.envelope import Envelope, build, parse, sign, to_headers
from agent_sdk.errors import (
    BrokerError,
    ConfigError,
    ContractError,
    PublishError,
    RequestTimeoutError,
)
from agent_sdk.headers import Enc
from agent_sdk.inbox import DedupWindow, InboxVerifier, Message, SecurityEvent
from agent_sdk.names import Destination, Level, MessageType
from agent_sdk.options import ClientOptions
from agent_sdk.publisher import ReliablePublisher
from agent_sdk.reader import InboxReader
from agent_sdk.rpc import PendingRequests
from agent_sdk.sealing import seal
from agent_sdk.security import ClientStats, SecurityCallback, SecurityReporter
from agent_sdk.topics import BUS_SERVICE, bus_request

log = logging.getLogger(__name__)

# nats options that would connect as someone else, or with inboxes the credentials refuse.
_IDENTITY_OPTIONS: Final = ("user_credentials", "nkeys_seed", "nkeys_seed_str", "user", "token")
_RESERVED_NATS_OPTIONS: Final = frozenset(
    (*_IDENTITY_OPTIONS, "servers", "inbox_prefix", "user_jwt_cb", "signature_cb", "password")
)


class AgentClient:
    """A connected agent: send, publish, request and reply; read its verified inbox."""

    def __init__(
        self,
        config: AgentConfig,
        credentials: Credentials,
        nc: Client,
        options: ClientOptions,
        on_security_event: SecurityCallback | None = None,
    ) -> None:
        """Use :meth:`connect`; this wires an already connected nats-py client."""
        self.config = config
        self.address = str(config.address)
        self.options = options
        self._nc = nc
        self._signer = credentials.signer
        self._counters: collections.Counter[str] = collections.Counter()
        self._report = SecurityReporter(self.address, self._counters, on_security_event)
        self._verifier = InboxVerifier(
            config.address, config.router_public_key, config.encryption_keys()
        )
        self._publisher = ReliablePublisher(
            nc.jetstream(),
            retry=options.retry,
            breaker=CircuitBreaker(options.circuit),
            timeout_s=options.publish_timeout_s,
        )
        self._dedup = DedupWindow(options.dedup_window)
        self._pending = PendingRequests(self._counters, self._report)
        self._reader: InboxReader | None = None
        self._reader_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        source: AgentConfig | str | os.PathLike[str] | None = None,
        *,
        options: ClientOptions | None = None,
        on_security_event: SecurityCallback | None = None,
        **nats_options: Any,
    ) -> AgentClient:
        """Connect as the agent that ``source`` describes: a directory holding
        ``agent.json`` and ``agent.creds``, the path of ``agent.json``, an
        :class:`AgentConfig`, or None for ``$SYMBIONT_AGENT_DIR``.

        ``nats_options`` go to :func:`nats.connect` (``reconnect_time_wait``,
        ``max_reconnect_attempts``, ...), except those that choose the server,
        the identity or the inbox prefix: those come from the agent's files.
        ``options`` defaults to :meth:`ClientOptions.from_env`.
        """
        config = source if isinstance(source, AgentConfig) else AgentConfig.load(source)
        credentials = config.credentials()
        reserved = _RESERVED_NATS_OPTIONS & set(nats_options)
        if reserved:
            raise ConfigError(f"nats option(s) {', '.join(sorted(reserved))} come from agent.json")
        settings: dict[str, Any] = {
            "name": f"symbi-agent {config.address}",
            "error_cb": _log_nats_error,
            **nats_options,
        }
        try:
            nc = await nats.connect(
                [url.strip() for url in config.nats_url.split(",")],
                user_credentials=str(config.creds_path),
                inbox_prefix=config.inbox_prefix.encode(),
                **settings,
            )
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BrokerError(f"cannot connect to {config.nats_url}: {exc}") from exc
        try:
            client = cls(
                config, credentials, nc, options or ClientOptions.from_env(), on_security_event
            )
            await nc.subscribe(config.inbox, cb=client._on_live)
            await nc.flush()
        except BaseException as exc:
            await nc.close()
            if isinstance(exc, nats.errors.Error):
                raise BrokerError(f"{config.address} cannot subscribe to its inbox") from exc
            raise
        return client

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters since :meth:`connect`."""
        return ClientStats.from_counters(self._counters)

    async def close(self) -> None:
        """Hand unhandled messages back for redelivery, fail pending requests, disconnect."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            await self._reader.close()
        self._pending.fail_all(BrokerError(f"{self.address}: client closed"))
        await self._report.close()
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._nc.flush(timeout=2)  # acknowledgements still buffered
        # nats-py raises ConnectionResetError when closing while it reconnects with
        # data buffered; the connection is closed all the same.
        with contextlib.suppress(OSError):
            await self._nc.close()

    # -- sending ---------------------------------------------------------------

    async def send(
        self,
        to: str,
        payload: bytes,
        *,
        level: Level,
        type: Literal["data", "control"] = "data",
        encrypt: str | Literal[False] = False,
    ) -> str:
        """Send a data or control message to an agent or host service; return its ``Symbi-Id``.

        ``encrypt`` is the recipient's X25519 public key: the payload then
        travels sealed, and only the recipient can open it (the SDK cannot read
        the registry, so the caller supplies the key). ``level`` has no default:
        labelling is the sender's decision, as in :func:`agent_sdk.envelope.build`.
        Raises :class:`PublishError` (or :class:`CircuitOpenError`) if the
        outbox did not acknowledge it.
        """
        if type not in ("data", "control"):
            raise ContractError(f"send() sends data or control, not {type}")
        return await self._send(self._envelope(to, type, level, payload, encrypt))

    async def publish(self, topic: str, payload: bytes, *, level: Level) -> str:
        """Publish an event on ``event.<topic>`` to every subscriber; return its ``Symbi-Id``.

        Events cannot be sealed: they have no single recipient key.
        """
        env = build(
            sender=self.address, to=f"event.{topic}", type="event", level=level, payload=payload
        )
        return await self._send(env)

    async def subscribe(self, *patterns: str) -> str:
        """Ask the bus to deliver events matching ``patterns`` (NATS wildcards ``*``, ``>``).

        The request is an ordinary message to ``host.bus``; it takes effect
        once a policy worker has processed it.
        """
        return await self._bus_message(bus_request("subscribe", patterns))

    async def unsubscribe(self, *patterns: str) -> str:
        """Stop the delivery of events matching ``patterns`` (as given to :meth:`subscribe`)."""
        return await self._bus_message(bus_request("unsubscribe", patterns))

    async def request(
        self,
        to: str,
        payload: bytes,
        *,
        level: Level,
        timeout: float | None = None,
        encrypt: str | Literal[False] = False,
    ) -> Message:
        """Send an rpc request and return the answer (the verified rpc message from ``to``
        whose ``Symbi-Reply-To`` is this request's id).

        Raises :class:`RequestTimeoutError` after ``timeout`` seconds (default
        ``options.request_timeout_s``) without an answer.
        """
        env = self._envelope(to, "rpc", level, payload, encrypt)
        expected = to if Destination.parse(to).kind == "agent" else None
        future = self._pending.add(env.id, expected)
        wait = self.options.request_timeout_s if timeout is None else timeout
        try:
            await self._ensure_reader()  # the durable path, should the live copy be lost
            await self._send(env)
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            raise RequestTimeoutError(f"no answer from {to} to {env.id} within {wait} s") from None
        finally:
            self._pending.discard(env.id)

    async def reply(
        self,
        request: Message,
        payload: bytes,
        *,
        level: Level | None = None,
        encrypt: str | Literal[False] = False,
    ) -> str:
        """Answer the rpc ``request``, at its level unless ``level`` is given.

        Where the policy required the request to be sealed, the answer usually
        must be too: pass the requester's X25519 key as ``encrypt``.
        """
        if not request.is_request:
            raise ContractError(f"message {request.id} is not an rpc request")
        env = self._envelope(
            request.sender, "rpc", level or request.level, payload, encrypt, reply_to=request.id
        )
        return await self._send(env)

    # -- receiving ---------------------------------------------------------------

    def messages(self) -> MessageStream:
        """The verified messages of the durable inbox, rpc answers excluded:
        ``async for msg in client.messages()``. :class:`MessageStream` says when
        each is acknowledged.
        """
        return MessageStream(self._ensure_reader, self._counters)

    async def handle(self, handler: Handler, *, concurrency: int = 1) -> None:
        """Run ``handler`` on every message until the client closes.

        A message is acknowledged when its handler returns, and redelivered
        with a growing delay when it raises, until ``options.max_deliveries``
        deliveries; then it is terminated and logged (without its payload).
        Up to ``concurrency`` handlers run at once (at most ``options.prefetch``).
        """
        if not 1 <= concurrency <= self.options.prefetch:
            raise ConfigError(
                f"concurrency must be between 1 and prefetch ({self.options.prefetch})"
            )
        reader = await self._ensure_reader()
        await run_handler(reader, handler, self.options, self._counters, concurrency)

    # -- internals -----------------------------------------------------------------

    def _envelope(
        self,
        to: str,
        type: MessageType,
        level: Level,
        payload: bytes,
        encrypt: str | Literal[False],
        reply_to: str | None = None,
    ) -> Envelope:
        if Destination.parse(to).kind == "event":
            raise ContractError(f"{to} is an event topic: use publish()")
        enc: Enc = "none"
        if encrypt is not False:
            payload, enc = seal(payload, encrypt), "x25519-sealed"
        return build(
            sender=self.address,
            to=to,
            type=type,
            level=level,
            payload=payload,
            enc=enc,
            reply_to=reply_to,
        )

    async def _send(self, env: Envelope) -> str:
        if self._closed:
            raise PublishError(f"{self.address}: client closed")
        signed = sign(env, self._signer)
        try:
            await self._publisher.publish(self.config.outbox, signed.payload, to_headers(signed))
        except PublishError:
            self._counters["publish_failures"] += 1
            raise
        self._counters["published"] += 1
        return signed.id

    async def _bus_message(self, body: bytes) -> str:
        # "public": a subscription request reveals nothing, and every clearance may send it.
        return await self._send(
            build(sender=self.address, to=BUS_SERVICE, type="data", level="public", payload=body)
        )

    async def _ensure_reader(self) -> InboxReader:
        async with self._reader_lock:
            if self._closed:
                raise BrokerError(f"{self.address}: client closed")
            if self._reader is None:
                cfg = self.config
                try:
                    psub = await self._nc.jetstream().pull_subscribe_bind(
                        cfg.inbox_consumer, stream=cfg.inbox_stream
                    )
                except nats.errors.Error as exc:
                    raise BrokerError(f"{self.address} cannot read its inbox") from exc
                self._reader = InboxReader(
                    psub,
                    self._verifier,
                    self.options,
                    stream=cfg.inbox_stream,
                    consumer=cfg.inbox_consumer,
                    on_reply=self._pending.resolve,
                    on_rejected=self._report,
                    dedup=self._dedup,
                    counters=self._counters,
                )
            return self._reader

    async def _on_live(self, msg: Msg) -> None:
        """A live copy of a delivery: the quick path for rpc answers, and a junk detector.

        The durable reader verifies and reports every stored delivery; here, only
        what cannot be a delivery at all (no envelope: e.g. a PubAck that another
        agent aimed here as its reply subject) is reported, and only answers to
        pending requests are verified.
        """
        try:
            env = parse(msg.headers, msg.data)
        except ContractError:
            rejected = self._verifier.check(msg.subject, msg.headers, msg.data)
            if isinstance(rejected, SecurityEvent):
                self._report(rejected)
            return
        if env.reply_to is None or env.reply_to not in self._pending:
            return
        answer = self._verifier.check(msg.subject, msg.headers, msg.data)
        if isinstance(answer, Message) and (answer.sender, answer.id) not in self._dedup:
            self._dedup.add((answer.sender, answer.id))  # the durable copy is then a duplicate
            self._pending.resolve(answer)


async def _log_nats_error(exc: Exception) -> None:
    # nats-py reports permission violations, slow consumers and lost connections
    # here; its texts carry subjects, never payloads.
    log.warning("nats: %s", exc)
