"""One policy worker: connect, consume batches, drain on stop.

Workers are stateless and interchangeable: all shared state (the consumer's
acknowledgements, nonces, rate state, the registry) lives in JetStream, so
any number run side by side on the one ``workers`` consumer and any of them
may be killed at any moment. A message whose worker died unacknowledged is
redelivered after the consumer's ack wait and, thanks to the nonce record,
decided exactly as before (:mod:`policy_worker.replay`).

Stopping (SIGTERM) is a drain: no new pull requests; the batch in flight
finishes and is acknowledged; messages already assigned to this worker
(requested before the stop) are still processed until the open requests
expire, so none waits out the ack wait; then the connection is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from agent_sdk.errors import BrokerError, ConfigError
from broker_gateway.registry import RegistryCache
from broker_gateway.state import StateDir
from broker_gateway.streams import (
    INGRESS,
    NONCE_BUCKET,
    RATE_BUCKET,
    REGISTRY_BUCKET,
    WORKERS_CONSUMER,
)
from policy_worker.broker import JetStreamIO, close_quietly
from policy_worker.bus_ops import SubscriptionWriter
from policy_worker.checks import Checker
from policy_worker.config import WorkerConfig
from policy_worker.consumer import PullConsumer
from policy_worker.direct_client import DirectClient
from policy_worker.metrics import WorkerMetrics
from policy_worker.pipeline import Pipeline
from policy_worker.rate_store import RateStore
from policy_worker.recipients import RecipientResolver
from policy_worker.replay import NonceStore
from policy_worker.route_tag import RouteSigner

log = logging.getLogger(__name__)

_SETUP_RETRY_S = 0.5
# A batch started while another is in flight should not be smaller than this,
# unless its oldest message has waited ``config.linger_s``: each batch costs two
# socket writes and their wake-ups whatever its size.
LINGER_BELOW = 3
T = TypeVar("T")


class Worker:
    """A connected worker; build it with :meth:`start`."""

    def __init__(
        self,
        config: WorkerConfig,
        nc: Client,
        cache: RegistryCache,
        consumer: PullConsumer,
        pipeline: Pipeline,
        hooks: _Hooks,
    ) -> None:
        self.config = config
        self.hooks = hooks
        self.nc = nc
        self.cache = cache
        self.consumer = consumer
        self.pipeline = pipeline
        self.processed = 0

    @classmethod
    async def start(cls, config: WorkerConfig, metrics: WorkerMetrics) -> Worker:
        signer = RouteSigner.from_store(StateDir(config.state_dir).keys)  # checked by the CLI
        hooks = _Hooks()
        nc = await _connect(config, hooks)
        try:
            io = JetStreamIO(nc, timeout_s=config.op_timeout_s)
            await _wait_for_consumer(io, config)
            registry_kv = await io.open_bucket(REGISTRY_BUCKET)
            nonce_kv = await io.open_bucket(NONCE_BUCKET)
            await io.open_bucket(RATE_BUCKET)
            ttl_s = (await nonce_kv.status()).ttl or 0.0
            if ttl_s and ttl_s * 1000 < 2 * config.max_skew_ms:
                raise ConfigError(
                    f"max skew {config.max_skew_ms} ms needs nonces kept {2 * config.max_skew_ms}"
                    f" ms, but bucket {NONCE_BUCKET} keeps them {ttl_s:g} s"
                )
            cache = RegistryCache(registry_kv)
            await asyncio.wait_for(cache.start(), config.connect_timeout_s)
            consumer = PullConsumer(
                nc,
                INGRESS,
                WORKERS_CONSUMER,
                window=config.batch,
                expires_s=config.pull_expires_s,
            )
            await consumer.start()
        except BaseException:
            await close_quietly(nc)
            raise
        hooks.on_reconnect.append(consumer.reset)
        checker = Checker(
            policies=config.policies,
            registry=cache,
            resolver=RecipientResolver(cache, config.host_services),
            max_skew_ms=config.max_skew_ms,
        )
        pipeline = Pipeline(
            config=config,
            checker=checker,
            io=io,
            nonces=NonceStore(io),
            rates=RateStore(io),
            subscriptions=SubscriptionWriter(io),
            signer=signer,
            metrics=metrics,
        )
        log.info(
            "%s ready: %d policies, batch %d, max skew %d ms, host services %s",
            config.name,
            len(config.policies),
            config.batch,
            config.max_skew_ms,
            ",".join(sorted(config.host_services)),
        )
        return cls(config, nc, cache, consumer, pipeline, hooks)

    async def serve(self, stop: asyncio.Event) -> None:
        """Process batches until ``stop`` is set, then drain (see the module doc).

        Up to ``config.inflight`` batches are processed at once: a batch spends
        most of its time waiting for the broker (three or four round trips), so
        overlapping them keeps latency low under light load and the CPU busy
        under a backlog. Overlap is safe: every change to shared state is a
        compare-and-set or a create, and each message is acknowledged on its own.
        """
        watcher = asyncio.create_task(self._stop_on(stop))
        slots = asyncio.Semaphore(self.config.inflight)
        running: set[asyncio.Task[None]] = set()
        drain_until: float | None = None
        try:
            while True:
                if stop.is_set():
                    now = time.monotonic()
                    if drain_until is None:
                        drain_until = now + self.config.pull_expires_s + 2.0
                        log.info("%s draining", self.config.name)
                    if self.consumer.idle or now > drain_until:
                        break
                await slots.acquire()
                batch = await self.consumer.next_batch(
                    self.config.batch,
                    wait_s=1.0,
                    linger_s=self.config.linger_s if running else 0.0,
                    linger_below=LINGER_BELOW,
                )
                if not batch:
                    slots.release()
                    continue
                task = asyncio.create_task(self._process(batch))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if running:
                await asyncio.wait(running)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _process(self, batch: list[Msg]) -> None:
        try:
            await self.pipeline.process(batch)
        except Exception:  # a bug: the batch is redelivered after the ack wait
            log.exception("a batch of %d messages failed", len(batch))
        self.processed += len(batch)

    async def _stop_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.consumer.stop_requesting()

    async def close(self) -> None:
        self.hooks.closing = True
        await self.consumer.close()
        await self.cache.stop()
        await close_quietly(self.nc)
        self.pipeline.close()
        log.info("%s stopped after %d messages", self.config.name, self.processed)


class _Hooks:
    """What the connection's callbacks need to know of the worker."""

    def __init__(self) -> None:
        self.closing = False
        self.on_reconnect: list[Callable[[], None]] = []


async def _connect(config: WorkerConfig, hooks: _Hooks) -> DirectClient:
    """Connect as the router's service user, retrying while ``symbi up`` comes up."""

    async def on_error(exc: Exception) -> None:
        log.warning("NATS: %r", exc)

    async def on_disconnect() -> None:
        if not hooks.closing:
            log.warning("disconnected from NATS")

    async def on_reconnect() -> None:
        log.info("reconnected to NATS")
        for hook in hooks.on_reconnect:
            hook()

    async def attempt() -> DirectClient:
        nc = DirectClient()
        await nc.connect(
            config.nats_url,
            user_credentials=str(config.creds),
            name=f"symbi-{config.name}",
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # used as a float (sleep)
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        return nc

    return await _retry(attempt, config, f"cannot connect to NATS at {config.nats_url}")


async def _wait_for_consumer(io: JetStreamIO, config: WorkerConfig) -> None:
    """Wait until ``symbi up`` has created the ingress stream and its consumer."""

    async def attempt() -> None:
        await io.js.consumer_info(INGRESS, WORKERS_CONSUMER)

    await _retry(attempt, config, f"consumer {WORKERS_CONSUMER} on stream {INGRESS} not found")


async def _retry(attempt: Callable[[], Awaitable[T]], config: WorkerConfig, what: str) -> T:
    deadline = time.monotonic() + config.connect_timeout_s
    while True:
        try:
            return await attempt()
        except (NatsError, NotFoundError, OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"{what}: {exc!r}") from exc
            await asyncio.sleep(_SETUP_RETRY_S)
