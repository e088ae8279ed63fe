"""One batch of ingress messages, from checks to acknowledgement.

A batch costs TWO dependent broker round trips before its acknowledgements
(all of a stage's KV operations and publishes go out in one flush):

1. **check** every message (CPU only, :mod:`policy_worker.checks`; a large
   batch partly on ``crypto_threads`` if configured, see :meth:`Pipeline._check_all`);
2. **claim + rate**, together: one nonce ``create`` per message (value: its
   ingress sequence, :mod:`policy_worker.replay`) and one compare-and-set per
   (sender, policy) for the batch's first deliveries, unless this worker's
   local reserve of that sender's rate covers them
   (:mod:`policy_worker.rate_stage`, :mod:`policy_worker.rate_store`). A
   clash with another ingress message is a ``replay``, whatever the rate said;
3. **bus ops**: allowed ``host.bus`` ops rewrite the sender's subscriptions
   (only when the batch has any);
4. **emit**: audit records and deliveries, all published at once (each audit
   record ahead of its delivery on the wire), waiting for every PubAck;
5. **settle**: a message whose records and deliveries all got PubAcks is
   acknowledged (lazily: the ``+ACK`` rides along with the connection's next
   write, :meth:`~policy_worker.broker.JetStreamIO.ack`); one that hit an
   internal failure is negatively acknowledged with a back-off delay
   (JetStream redelivers it, to this worker or another), and after
   ``max_attempts`` it is parked in the dead-letter stream, then
   acknowledged. A message's content never causes a retry: it is decided and
   audited, whatever it holds.

**Redeliveries** (``num_delivered`` > 1, or a nonce entry holding the
message's own sequence) may have been decided by an attempt that died. Their
audit records carry deterministic ``Nats-Msg-Id`` headers, so the audit stream
says whether that attempt got as far as auditing, and what it decided:

- the rate limiter is skipped if the nonce entry was already there (that
  attempt sent its rate update in the same flush); an attempt that never
  created the entry never spent rate either (the create goes out first), so
  the message is rated now, one extra round trip;
- the audit record is published alone, first. A duplicate PubAck names the
  original record, which is read (``get_msg``) and its decision adopted:
  delivered only if it was ``allow`` (the delivery's own ``Nats-Msg-Id`` makes
  a second copy a no-op). Otherwise the fresh decision (without rate) stands;
- then the deliveries, then the acknowledgement; ``host.bus`` ops of a
  redelivery are applied only once its decision is settled.

What a SIGKILL leaves behind, and what the redelivery (after the ack wait)
does about it:

==============================  =====================================================
killed after                    the redelivery
==============================  =====================================================
the check (nothing written)     nonce created now, rated now, decided and emitted as
                                a first delivery would be (audit first)
nonce + rate written            no rate; audit not a duplicate: fresh decision,
                                audited, then delivered if allowed
audit written, no delivery      audit duplicate: its decision adopted; an ``allow``
                                is delivered now
audit and delivery written      audit duplicate: adopted; the delivery is deduplicated
(not acknowledged)              by the inbox stream: each exactly once
==============================  =====================================================

A delivery without its audit record cannot be left behind: the record goes
out ahead of the delivery on the same connection, and nothing is emitted
before the nonce create is acknowledged. What the redelivery may differ in
from an attempt that died before auditing: a sender's rate (a message
counted once at most, never twice) and a registry change in between (it is
decided now), neither of which can have reached a recipient.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from agent_sdk.errors import BrokerError, EnvelopeError
from policy_worker.audit import audit_publish
from policy_worker.broker import Ack, JetStreamIO, Publish
from policy_worker.bus_ops import BUS_ADDRESS, BusOp, SubscriptionWriter, parse_bus_op
from policy_worker.checks import Checker
from policy_worker.config import WorkerConfig
from policy_worker.deadletter import deadletter
from policy_worker.decision import Decision
from policy_worker.delivery import delivery
from policy_worker.ingress import AuditFields, IngressItem, Target, stage_of
from policy_worker.metrics import WorkerMetrics
from policy_worker.policy import PolicySet
from policy_worker.rate_stage import Over, limit, rated, start_rate
from policy_worker.rate_store import RateStore
from policy_worker.replay import NonceStore, adopted, encode, keep_recipients, mark_replay
from policy_worker.route_tag import RouteSigner

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What became of a batch's messages."""

    acked: int = 0
    retried: int = 0
    deadlettered: int = 0


@dataclass(slots=True)
class _Emitted:
    item: IngressItem
    target: Target
    is_delivery: bool


class Pipeline:
    """Processes batches; one per worker, holding no state between batches but caches."""

    def __init__(
        self,
        *,
        config: WorkerConfig,
        checker: Checker,
        io: JetStreamIO,
        nonces: NonceStore,
        rates: RateStore,
        subscriptions: SubscriptionWriter,
        signer: RouteSigner,
        metrics: WorkerMetrics,
    ) -> None:
        self.config = config
        self.checker = checker
        self.io = io
        self.nonces = nonces
        self.rates = rates
        self.subscriptions = subscriptions
        self.signer = signer
        self.metrics = metrics
        self._pool = (
            ThreadPoolExecutor(config.crypto_threads, thread_name_prefix="crypto")
            if config.crypto_threads > 0
            else None
        )

    def close(self) -> None:
        """Stop the crypto threads (after the last batch)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    async def process(self, msgs: Sequence[Msg]) -> BatchOutcome:
        received = time.perf_counter()
        items = [item for item in await self._check_all(msgs, received) if item is not None]
        self.metrics.batch_messages.observe(len(items))
        decided = delivered = 0.0
        try:
            await self._claim_and_rate(items)
            decided = time.perf_counter()
            await self._bus_ops([i for i in items if not i.redelivered])
            delivered = await self._emit(items)
        except Exception as exc:  # a bug: never lose the batch, retry it like a failure
            log.exception("processing a batch of %d messages failed", len(items))
            for item in items:
                item.fail(f"internal error: {exc!r}")
        return await self._settle(items, decided, delivered)

    # -- 1. check ------------------------------------------------------------

    async def _check_all(self, msgs: Sequence[Msg], received: float) -> list[IngressItem | None]:
        """Check every message; a large batch in chunks on the crypto threads too.

        Ed25519 verification (most of a check) releases the GIL, so chunks
        checked on other threads overlap with the one checked here.
        """
        pool = self._pool
        if pool is None or len(msgs) < self.config.crypto_min_batch:
            return [self._check(m, received) for m in msgs]
        size = -(-len(msgs) // (self.config.crypto_threads + 1))
        chunks = [msgs[i : i + size] for i in range(0, len(msgs), size)]
        loop = asyncio.get_running_loop()
        others = [loop.run_in_executor(pool, self._check_chunk, c, received) for c in chunks[1:]]
        checked = self._check_chunk(chunks[0], received)
        for more in await asyncio.gather(*others):
            checked.extend(more)
        return checked

    def _check_chunk(self, msgs: Sequence[Msg], received: float) -> list[IngressItem | None]:
        return [self._check(m, received) for m in msgs]

    def _check(self, msg: Msg, received: float) -> IngressItem | None:
        try:
            return self.checker.inspect(msg, received)
        except Exception:  # a bug must not take the worker down: retry, then dead-letter
            log.exception("checking an ingress message failed (subject %s)", msg.subject[:128])
        try:
            meta = msg.metadata
        except Exception:
            log.error("dropping a message without JetStream metadata on %s", msg.subject[:128])
            return None
        item = IngressItem(
            msg=msg,
            seq=meta.sequence.stream,
            attempt=meta.num_delivered,
            stored_ms=0,
            received_at=received,
            arrived_from=None,
            fields=AuditFields.read(None, msg.data),
        )
        item.fail("internal error while checking the message")
        return item

    # -- 2. claim + rate ----------------------------------------------------

    async def _claim_and_rate(self, items: list[IngressItem]) -> None:
        for item in items:
            if item.attempt > 1:
                item.redelivered = True
        claims = [i for i in items if i.error is None and i.needs_nonce]
        if not claims:
            return
        first = [i for i in claims if not i.redelivered]
        # One flush: the creates first (an attempt whose rate update reached the
        # server has its nonce entry there too), then the rate updates, whose
        # tasks are scheduled behind the claim's and ahead of the connection's flusher.
        claiming = asyncio.ensure_future(
            self.nonces.claim([(i.nonce_key, encode(i)) for i in claims])
        )
        rating = start_rate(self.rates, first)
        try:
            limited = await rated(rating)
        finally:
            records = await claiming
        late: list[IngressItem] = []
        for item, record in zip(claims, records, strict=True):
            if isinstance(record, BrokerError):
                item.fail(f"nonce record: {record}")
            elif record is None:
                if item.redelivered:
                    late.append(item)  # never claimed before, so never rated either
            elif record.seq == item.seq:
                item.redelivered = True
                keep_recipients(item, record)
            else:
                mark_replay(item, record.seq)
        limit(limited)
        if late:
            limit(await self._rate(late))

    async def _rate(self, items: list[IngressItem]) -> list[Over]:
        """Admit ``items`` against their senders' rates; the (item, policy) pairs over it."""
        return await rated(start_rate(self.rates, items))

    # -- 3. bus ops ----------------------------------------------------------

    async def _bus_ops(self, items: list[IngressItem]) -> None:
        ops: list[tuple[IngressItem, Target, BusOp]] = []
        for item in items:
            env = item.env
            if item.error is not None or env is None or env.to != BUS_ADDRESS:
                continue
            target = item.targets[0]
            if not target.decision.allowed or env.type != "data":
                continue
            if "bus" not in self.config.host_services:
                continue
            if env.enc != "none":
                _add_detail(target, "bus: a sealed op cannot be read")
                continue
            try:
                ops.append((item, target, parse_bus_op(env.payload)))
            except EnvelopeError as exc:
                _add_detail(target, f"bus: not applied: {exc}")
        if not ops:
            return
        results = await asyncio.gather(
            *(self.subscriptions.apply(str(item.arrived_from), op) for item, _, op in ops),
            return_exceptions=True,
        )
        for (item, target, _), result in zip(ops, results, strict=True):
            if isinstance(result, BrokerError):
                item.fail(f"subscription update: {result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                _add_detail(target, result)

    # -- 4. emit -------------------------------------------------------------

    async def _emit(self, items: list[IngressItem]) -> float:
        now_ms = time.time_ns() // 1_000_000
        worker = self.config.name
        requests: list[Publish] = []
        owners: list[_Emitted] = []
        redelivered: list[IngressItem] = []
        for item in items:
            if item.error is not None:
                continue
            if item.redelivered:
                redelivered.append(item)
            elif item.sender is None and _allows_any(item):
                # Allowed at an earlier attempt, but the sender's record has gone since:
                # there is no registered key left to vouch for. Retry, then dead-letter.
                item.fail("the sender's registry record has disappeared")
                continue
            for target in item.targets:
                if target.decision.audited:
                    requests.append(audit_publish(item, target, worker=worker, now_ms=now_ms))
                    owners.append(_Emitted(item, target, False))
                if item.redelivered:
                    continue  # delivered once its decision is settled, below
                if target.decision.allowed and target.subject and target.recipient:
                    requests.append(self._delivery(item, target))
                    owners.append(_Emitted(item, target, True))
        results = await self.io.publish_all(requests)
        acked_at = time.time()
        originals: list[tuple[_Emitted, Ack]] = []
        for owner, result in zip(owners, results, strict=True):
            if isinstance(result, BrokerError):
                what = f"delivery to {owner.target.recipient}" if owner.is_delivery else "audit"
                owner.item.fail(f"{what}: {result}")
            elif result.duplicate and owner.item.redelivered:
                originals.append((owner, result))
        if redelivered:
            await self._adopt(originals)
            await self._bus_ops(redelivered)
            await self._deliver(redelivered)
            acked_at = time.time()
        return acked_at

    async def _adopt(self, originals: list[tuple[_Emitted, Ack]]) -> None:
        """Take over the decisions that earlier attempts audited."""
        if not originals:
            return
        results = await asyncio.gather(
            *(self.io.stored(ack.stream, ack.seq) for _, ack in originals),
            return_exceptions=True,
        )
        for (owner, _), result in zip(originals, results, strict=True):
            item, target = owner.item, owner.target
            if isinstance(result, BrokerError):
                item.fail(f"earlier audit record: {result}")
                continue
            if isinstance(result, BaseException):
                raise result
            decision = _read_decision(result, target, item.src_tier, self.checker.policies)
            if decision is None:
                item.fail(f"earlier audit record of ingress message {item.seq} is unreadable")
                continue
            target.decision = decision
            target.stage = stage_of(decision)

    async def _deliver(self, items: list[IngressItem]) -> None:
        """The deliveries of redelivered messages, once their decisions are settled."""
        requests: list[Publish] = []
        owners: list[IngressItem] = []
        for item in items:
            if item.error is not None or not _allows_any(item):
                continue
            if item.sender is None:
                item.fail("the sender's registry record has disappeared")
                continue
            for target in item.targets:
                if target.decision.allowed and target.subject and target.recipient:
                    requests.append(self._delivery(item, target))
                    owners.append(item)
        if not requests:
            return
        results = await self.io.publish_all(requests)
        for item, result in zip(owners, results, strict=True):
            if isinstance(result, BrokerError):
                item.fail(f"delivery: {result}")

    def _delivery(self, item: IngressItem, target: Target) -> Publish:
        env, sender = item.env, item.sender
        assert env is not None and sender is not None and target.subject and target.recipient
        return delivery(
            subject=target.subject,
            headers=item.msg.headers or {},
            payload=item.msg.data,
            msg_id=env.id,
            sender=env.sender,
            sender_key=sender.public_key,
            recipient=target.recipient,
            signer=self.signer,
            worker=self.config.name,
        )

    # -- 5. settle -----------------------------------------------------------

    async def _settle(
        self, items: list[IngressItem], decided: float, delivered_at: float
    ) -> BatchOutcome:
        acked = retried = 0
        parked: list[IngressItem] = []
        for item in items:
            if item.error is None:
                if await _ack(self.io, item.msg):
                    acked += 1
                    self._count(item, decided, delivered_at)
            elif item.attempt >= self.config.max_attempts:
                parked.append(item)
            else:
                retried += 1
                delay = self.config.backoff_s(item.attempt)
                log.warning(
                    "ingress message %d failed (attempt %d), retrying in %.2fs: %s",
                    item.seq, item.attempt, delay, item.error,
                )  # fmt: skip
                await _nak(item.msg, delay)
        deadlettered = await self._park(parked) if parked else 0
        retried += len(parked) - deadlettered
        return BatchOutcome(acked, retried, deadlettered)

    async def _park(self, items: list[IngressItem]) -> int:
        requests = [
            deadletter(
                subject=i.msg.subject,
                headers=i.msg.headers,
                payload=i.msg.data,
                seq=i.seq,
                src_tier=i.src_tier,
                reason=i.error or "unknown failure",
                attempts=i.attempt,
                worker=self.config.name,
            )
            for i in items
        ]
        results = await self.io.publish_all(requests)
        parked = 0
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BrokerError):
                log.error("dead-lettering ingress message %d failed: %s", item.seq, result)
                await _nak(item.msg, self.config.retry_max_s)
                continue
            log.error(
                "ingress message %d dead-lettered after %d attempts: %s",
                item.seq, item.attempt, item.error,
            )  # fmt: skip
            if await _ack(self.io, item.msg):
                parked += 1
                self.metrics.deadletter.labels(src_tier=item.src_tier).inc()
        return parked

    def _count(self, item: IngressItem, decided: float, delivered_at: float) -> None:
        m = self.metrics
        src = item.src_tier
        msg_type = item.fields.type or "unknown"
        took = max(0.0, decided - item.received_at)
        for target in item.targets:
            d = target.decision
            allowed = d.allowed
            dst = target.dst_tier
            m.decision(src, dst, msg_type, "allow" if allowed else "deny", d.reason).inc()
            m.latency("decision", src, dst).observe(took)
            if allowed and item.env is not None and target.subject:
                e2e = max(0.0, delivered_at - item.env.time_ms / 1000)
                m.latency("end_to_end", src, dst).observe(e2e)


def _read_decision(
    raw: bytes, target: Target, src_tier: str, policies: PolicySet
) -> Decision | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return adopted(record, target, src_tier, policies) if isinstance(record, dict) else None


def _allows_any(item: IngressItem) -> bool:
    return any(t.decision.allowed and t.subject for t in item.targets)


def _add_detail(target: Target, detail: str) -> None:
    joined = f"{target.decision.detail}; {detail}" if target.decision.detail else detail
    target.decision = dataclasses.replace(target.decision, detail=joined[:300])


async def _ack(io: JetStreamIO, msg: Msg) -> bool:
    try:
        await io.ack(msg)
    except (NatsError, OSError) as exc:  # redelivered after ack_wait; replay state keeps it sticky
        log.warning("acknowledging an ingress message failed: %r", exc)
        return False
    return True


async def _nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay)
    except (NatsError, OSError) as exc:
        log.warning("negative acknowledgement failed: %r", exc)
