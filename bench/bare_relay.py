"""The baseline: a relay with the router's topology and none of its checks.

``python -m bench.bare_relay [--name N] [--batch 256] [--inflight 4]`` with ``SYMBIONT_STATE_DIR``
and ``SYMBIONT_NATS_URL`` set, exactly like ``python -m policy_worker``. It
consumes the same ``INGRESS`` stream through the same durable ``workers``
consumer, with the router's credentials, and per batch does only what any
relay of this shape must: publish each message to the recipient's durable
inbox (``tier.<t>.agent.<id>.in``, read off ``Symbi-To`` without validating
it), wait for the inbox stream's PubAcks, and acknowledge the ingress
messages. It sets ``Nats-Msg-Id`` on deliveries as the router does, so the
server does the same deduplication work for both.

Its publishes are as lean as the policy worker's own (one wildcard
subscription for all PubAcks, a counter for reply tokens, a PubAck checked
without decoding its JSON) rather than nats-py's ``publish_async``, which
costs about twice as much per message: a slower baseline would flatter the
router.

No parsing, signature check, policy, nonce, rate limit or audit record: the
difference between this and the policy worker, measured in the same run on
the same machine, is the cost of the router's guarantees.

Like the worker, it processes up to ``--inflight`` batches at once. Fetching
keeps pull requests open on a private inbox and hands out whatever
has arrived (nats-py's ``fetch`` would hold a lone message until its batch
fills or its timeout passes, which would make the baseline look slow at low
load and the comparison unfair in the router's favour), with the worker's
bounds in bytes on pull requests and batches.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import logging
import os
import signal
import sys
import time

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.child import run
from broker_gateway.state import ENV_STATE_DIR, StateDir
from broker_gateway.streams import INGRESS, WORKERS_CONSUMER
from policy_worker.consumer import request_bytes, take_batch

log = logging.getLogger("bench.bare_relay")

ENV_NATS_URL = "SYMBIONT_NATS_URL"
EXPIRES_S = 1.0


class BareRelay:
    """Pull, republish, acknowledge."""

    def __init__(self, nc: Client, name: str, batch: int, inflight: int) -> None:
        self.nc = nc
        self.name = name
        self.batch = batch
        self.inflight = inflight
        self.inbox = nc.new_inbox()
        self.ack_prefix = nc.new_inbox() + "."
        self.tokens = itertools.count()
        self.waiting: dict[str, asyncio.Future[bool]] = {}
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{INGRESS}.{WORKERS_CONSUMER}"
        self.buffer: collections.deque[Msg] = collections.deque()
        self.wakeup = asyncio.Event()
        self.outstanding = 0
        self.stopping = False
        self.relayed = 0

    async def start(self) -> None:
        await self.nc.subscribe(self.inbox, cb=self._on_msg)
        await self.nc.subscribe(self.ack_prefix + "*", cb=self._on_ack)
        await self._top_up()
        await self.nc.flush()

    async def _on_ack(self, msg: Msg) -> None:
        fut = self.waiting.pop(msg.subject[len(self.ack_prefix) :], None)
        if fut is not None and not fut.done():
            # A PubAck is {"stream":...,"seq":...}; an error has "error"; a 503 is empty.
            fut.set_result(bool(msg.data) and b'"error"' not in msg.data)

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a message to relay (it carries its ack subject)
            self.outstanding = max(0, self.outstanding - 1)
            self.buffer.append(msg)
        else:  # a status: 408 request expired, 409 ..., 100 heartbeat
            headers = msg.headers or {}
            if headers.get("Status") == "100":
                return
            try:
                left = int(headers.get("Nats-Pending-Messages", ""))
            except ValueError:
                left = self.outstanding
            self.outstanding = max(0, self.outstanding - left)
        self.wakeup.set()

    async def _top_up(self) -> None:
        free = self.batch - self.outstanding - len(self.buffer)
        if self.stopping or free <= 0 or (self.outstanding and free < self.batch // 2):
            return
        request = {
            "batch": free,
            "expires": int(EXPIRES_S * 1e9),
            "max_bytes": request_bytes(self.nc.max_payload),  # bounded as the worker's
        }
        await self.nc.publish(self.next_subject, json.dumps(request).encode(), reply=self.inbox)
        self.outstanding += free

    async def serve(self, stop: asyncio.Event) -> None:
        """Relay batches until ``stop``, up to ``inflight`` at once, as the worker does."""
        slots = asyncio.Semaphore(self.inflight)
        running: set[asyncio.Task[None]] = set()
        drain_until = 0.0
        try:
            while True:
                if stop.is_set():
                    self.stopping = True
                    drain_until = drain_until or time.monotonic() + EXPIRES_S + 1.0
                    idle = not self.outstanding and not self.buffer
                    if idle or time.monotonic() > drain_until:
                        return
                await slots.acquire()
                batch = await self._next_batch()
                if not batch:
                    slots.release()
                    continue
                task = asyncio.create_task(self.relay(batch))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if running:
                await asyncio.wait(running)

    async def _next_batch(self) -> list[Msg]:
        """Whatever has arrived (up to a batch), as soon as anything has; [] after a while."""
        # Cleared before looking, so a message arriving meanwhile is not slept through.
        self.wakeup.clear()
        if not self.buffer:
            await self._top_up()
            if not self.buffer:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), EXPIRES_S)
                except TimeoutError:
                    if self.outstanding and not self.stopping:
                        self.outstanding = 0  # a lost request: ask again
                if not self.buffer:
                    return []
        batch = take_batch(self.buffer, self.batch)
        await self._top_up()
        return batch

    async def relay(self, batch: list[Msg]) -> None:
        loop = asyncio.get_running_loop()
        futures: list[tuple[str, asyncio.Future[bool]] | None] = []
        for msg in batch:
            headers = msg.headers or {}
            to = headers.get("Symbi-To", "")
            tier, _, agent_id = to.partition(".")
            if not agent_id:
                futures.append(None)
                continue
            out = {k: v for k, v in headers.items() if not k.lower().startswith("nats-")}
            out["Nats-Msg-Id"] = f"{headers.get('Symbi-From')}:{headers.get('Symbi-Id')}:{to}"
            token = str(next(self.tokens))
            fut: asyncio.Future[bool] = loop.create_future()
            self.waiting[token] = fut
            await self.nc.publish(
                f"tier.{tier}.agent.{agent_id}.in",
                msg.data,
                reply=self.ack_prefix + token,
                headers=out,
            )
            futures.append((token, fut))
        pending = [f[1] for f in futures if f is not None]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for msg, entry in zip(batch, futures, strict=True):
            if entry is not None and not (entry[1].done() and entry[1].result()):
                self.waiting.pop(entry[0], None)
                entry[1].cancel()
                await msg.nak()
            else:
                await msg.ack()
                self.relayed += 1


async def _serve(name: str, batch: int, inflight: int) -> None:
    state = StateDir.open(os.environ.get(ENV_STATE_DIR), create=False)
    url = os.environ.get(ENV_NATS_URL) or str(state.read_runtime()["nats_url"])
    nc = await nats.connect(
        url, user_credentials=str(state.service_creds("router")), name=f"bench-{name}"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = BareRelay(nc, name, batch, inflight)
    await relay.start()
    log.info("%s ready: batch %d, %d in flight", name, batch, inflight)
    try:
        await relay.serve(stop)
    finally:
        await nc.drain()
        log.info("%s stopped after %d messages", name, relay.relayed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare_relay", description="The bench's no-checks baseline relay."
    )
    parser.add_argument("--name", default=f"bare-{os.getpid()}")
    parser.add_argument("--batch", type=int, default=256, help="as the worker's (%(default)s)")
    parser.add_argument(
        "--inflight", type=int, default=4, help="batches at once, as the worker's (%(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    run(_serve(args.name, args.batch, args.inflight))


if __name__ == "__main__":
    main()
