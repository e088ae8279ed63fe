"""One batch of ingress messages, from checks to acknowledgement.

The stages, each one round trip for the whole batch (all its KV operations and
publishes in flight together):

1. **check** every message (CPU only, :mod:`policy_worker.checks`);
2. **recall**: a redelivered message's nonce entry is read first, so that a
   message whose first attempt died reuses that attempt's outcome without
   spending rate again (:mod:`policy_worker.replay`);
3. **rate**: one compare-and-set per (sender, policy) for all of the batch's
   messages (:mod:`policy_worker.rate_store`);
4. **claim**: one nonce ``create`` per message, recording the outcome; a clash
   with another ingress message is a ``replay``;
5. **bus ops**: allowed ``host.bus`` ops rewrite the sender's subscriptions;
6. **emit**: deliveries and audit records, all published at once, waiting for
   every PubAck;
7. **settle**: a message whose deliveries and records all got PubAcks is
   acknowledged; one that hit an internal failure is negatively acknowledged
   with a back-off delay (JetStream redelivers it, to this worker or another),
   and after ``max_attempts`` it is parked in the dead-letter stream, then
   acknowledged. A message's content never causes a retry: it is decided and
   audited, whatever it holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from agent_sdk.errors import BrokerError, EnvelopeError
from policy_worker.audit import audit_publish
from policy_worker.broker import JetStreamIO, Publish
from policy_worker.bus_ops import BUS_ADDRESS, BusOp, SubscriptionWriter, parse_bus_op
from policy_worker.checks import Checker
from policy_worker.config import WorkerConfig
from policy_worker.deadletter import deadletter
from policy_worker.decision import Decision
from policy_worker.delivery import delivery
from policy_worker.ingress import AuditFields, IngressItem, Target
from policy_worker.metrics import WorkerMetrics
from policy_worker.policy import Policy
from policy_worker.rate_store import RateStore, rate_key
from policy_worker.replay import NonceStore, adopt, encode, mark_replay
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

    async def process(self, msgs: Sequence[Msg]) -> BatchOutcome:
        received = time.perf_counter()
        items = [item for item in (self._check(m, received) for m in msgs) if item is not None]
        self.metrics.batch_messages.observe(len(items))
        decided = delivered = 0.0
        try:
            await self._recall(items)
            await self._rate(items)
            await self._claim(items)
            decided = time.perf_counter()
            await self._bus_ops(items)
            delivered = await self._emit(items)
        except Exception as exc:  # a bug: never lose the batch, retry it like a failure
            log.exception("processing a batch of %d messages failed", len(items))
            for item in items:
                item.fail(f"internal error: {exc!r}")
        return await self._settle(items, decided, delivered)

    # -- 1. check ------------------------------------------------------------

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

    # -- 2. recall -----------------------------------------------------------

    async def _recall(self, items: list[IngressItem]) -> None:
        todo = [i for i in items if i.error is None and i.attempt > 1 and i.needs_nonce]
        if not todo:
            return
        records = await self.nonces.recall([i.nonce_key for i in todo])
        for item, record in zip(todo, records, strict=True):
            if isinstance(record, BrokerError):
                item.fail(f"nonce lookup: {record}")
            elif record is None:
                continue
            elif record.seq == item.seq:
                adopt(item, record, self.checker.policies)
            else:
                mark_replay(item, record.seq)

    # -- 3. rate -------------------------------------------------------------

    async def _rate(self, items: list[IngressItem]) -> None:
        groups: dict[str, tuple[Policy, list[IngressItem]]] = {}
        for item in items:
            if item.error is not None or item.resolved or item.arrived_from is None:
                continue
            sender = str(item.arrived_from)
            seen: set[str] = set()
            for target in item.targets:
                policy = target.policy
                if target.stage != "rated" or policy is None or policy.name in seen:
                    continue
                seen.add(policy.name)
                groups.setdefault(rate_key(sender, policy.name), (policy, []))[1].append(item)
        if not groups:
            return
        keys = list(groups)
        results = await asyncio.gather(
            *(
                self.rates.admit(
                    key,
                    now_ms=max(i.stored_ms for i in groups[key][1]),
                    rate=groups[key][0].rate,
                    burst=groups[key][0].burst,
                    n=len(groups[key][1]),
                )
                for key in keys
            ),
            return_exceptions=True,
        )
        for key, result in zip(keys, results, strict=True):
            policy, members = groups[key]
            if isinstance(result, BrokerError):
                for item in members:
                    item.fail(f"rate limiter: {result}")
                continue
            if isinstance(result, BaseException):
                raise result
            limited = Decision(
                "rate_limited", policy, f"over {policy.rate:g} messages/s (burst {policy.burst})"
            )
            for item in members[result:]:
                for target in item.targets:
                    if target.stage == "rated" and target.policy is policy:
                        target.decision = limited

    # -- 4. claim ------------------------------------------------------------

    async def _claim(self, items: list[IngressItem]) -> None:
        todo = [i for i in items if i.error is None and not i.resolved and i.needs_nonce]
        if not todo:
            return
        records = await self.nonces.claim([(i.nonce_key, encode(i)) for i in todo])
        for item, record in zip(todo, records, strict=True):
            if isinstance(record, BrokerError):
                item.fail(f"nonce record: {record}")
            elif record is None:
                item.resolved = True
            elif record.seq == item.seq:
                adopt(item, record, self.checker.policies)
            else:
                mark_replay(item, record.seq)

    # -- 5. bus ops ----------------------------------------------------------

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

    # -- 6. emit -------------------------------------------------------------

    async def _emit(self, items: list[IngressItem]) -> float:
        now_ms = time.time_ns() // 1_000_000
        worker = self.config.name
        requests: list[Publish] = []
        owners: list[_Emitted] = []
        for item in items:
            if item.error is None and item.sender is None and _allows_any(item):
                # Allowed at an earlier attempt, but the sender's record has gone since:
                # there is no registered key left to vouch for. Retry, then dead-letter.
                item.fail("the sender's registry record has disappeared")
            if item.error is not None:
                continue
            for target in item.targets:
                if target.decision.allowed and target.subject and target.recipient:
                    requests.append(self._delivery(item, target))
                    owners.append(_Emitted(item, target, True))
                if target.decision.audited:
                    requests.append(audit_publish(item, target, worker=worker, now_ms=now_ms))
                    owners.append(_Emitted(item, target, False))
        results = await self.io.publish_all(requests)
        acked_at = time.time()
        for owner, result in zip(owners, results, strict=True):
            if isinstance(result, BrokerError):
                what = f"delivery to {owner.target.recipient}" if owner.is_delivery else "audit"
                owner.item.fail(f"{what}: {result}")
        return acked_at

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

    # -- 7. settle -----------------------------------------------------------

    async def _settle(
        self, items: list[IngressItem], decided: float, delivered_at: float
    ) -> BatchOutcome:
        acked = retried = 0
        parked: list[IngressItem] = []
        for item in items:
            if item.error is None:
                if await _ack(item.msg):
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
            if await _ack(item.msg):
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


def _allows_any(item: IngressItem) -> bool:
    return any(t.decision.allowed and t.subject for t in item.targets)


def _add_detail(target: Target, detail: str) -> None:
    joined = f"{target.decision.detail}; {detail}" if target.decision.detail else detail
    target.decision = dataclasses.replace(target.decision, detail=joined[:300])


async def _ack(msg: Msg) -> bool:
    try:
        await msg.ack()
    except (NatsError, OSError) as exc:  # redelivered after ack_wait; replay state keeps it sticky
        log.warning("acknowledging an ingress message failed: %r", exc)
        return False
    return True


async def _nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay)
    except (NatsError, OSError) as exc:
        log.warning("negative acknowledgement failed: %r", exc)
