"""Serving ``host.launcher``: control messages in, sandboxes and answers out.

Policy workers deliver every allowed message to ``host.launcher`` into the
``HOST`` stream on ``host.launcher.in``. Each tier's launchers share one
durable consumer (``launcher-<tier>``), so that several instances of a tier
split the work like the policy workers do, and every tier sees every request:

1. the delivery is verified (:class:`~launchers.host_delivery.HostVerifier`);
   anything unverifiable is logged and dropped, never answered;
2. it belongs to one tier (:func:`~launchers.control.responsible_tier`): the
   other tiers' launchers acknowledge it and do nothing;
3. the requester must still be registered and active, with the key that the
   route tag vouches for; a request older than ``max_age_s`` is ``expired``;
4. the op runs (:mod:`launchers.control` says who may do what), reporting
   progress to JetStream so that a slow micro-VM start is not redelivered;
5. the requester gets an answer (:class:`~launchers.answers.Answerer`), and
   only then is the delivery acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError

from agent_sdk.errors import AgentNotFoundError, PublishError, SymbiError
from agent_sdk.inbox import Message, SecurityEvent
from agent_sdk.names import AgentAddress, Tier
from broker_gateway.records import AgentRecord
from broker_gateway.streams import HOST
from launchers.answers import Answerer
from launchers.backend import Sandbox
from launchers.control import (
    LaunchOp,
    Refused,
    ServicePolicy,
    StatusOp,
    StopOp,
    check_owner,
    launch_request,
    parse_op,
    require_control,
    responsible_tier,
)
from launchers.host_delivery import HostVerifier
from launchers.launch import Launcher
from launchers.service_files import SERVICE_ADDRESS, control_consumer, ensure_control_consumer
from launchers.tier_bus import TierBus

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 15.0


@contextlib.asynccontextmanager
async def _in_progress(msg: Msg) -> AsyncIterator[None]:
    """Tell JetStream every few seconds that ``msg`` is still being worked on."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            with contextlib.suppress(NatsError):
                await msg.in_progress()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ControlService:
    """The control-message loop of one tier's launcher."""

    def __init__(
        self,
        launcher: Launcher,
        bus: TierBus,
        answerer: Answerer,
        policy: ServicePolicy | None = None,
        concurrency: int = 4,
    ) -> None:
        self.tier: Tier = bus.tier
        self.launcher = launcher
        self.bus = bus
        self.answerer = answerer
        self.policy = policy or ServicePolicy()
        self.verifier = HostVerifier(SERVICE_ADDRESS, bus.files.router_public_key)
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Until cancelled: fetch one request whenever a slot is free, handle it aside."""
        await ensure_control_consumer(self.bus.js, self.tier)
        psub = await self.bus.js.pull_subscribe_bind(control_consumer(self.tier), stream=HOST)
        log.info("%s launcher serving %s", self.tier, SERVICE_ADDRESS)
        if ready is not None:
            ready.set()
        try:
            while True:
                await self._slots.acquire()
                try:
                    msgs = await psub.fetch(1, timeout=1.0)
                except (TimeoutError, NatsTimeoutError):
                    self._slots.release()
                    continue
                except NatsError as exc:
                    self._slots.release()
                    log.warning("fetching control messages failed: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                if not msgs:
                    self._slots.release()
                for msg in msgs:
                    task = asyncio.create_task(self._handle(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
        finally:
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(NatsError):
                await psub.unsubscribe()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._process(msg)
        except Exception:  # one bad request must not end the service
            log.exception("control message %s: unexpected failure", msg.metadata.sequence.stream)
        finally:
            with contextlib.suppress(NatsError):
                await msg.ack()

    async def _process(self, msg: Msg) -> None:
        checked = self.verifier.check(msg.subject, msg.headers, msg.data)
        if isinstance(checked, SecurityEvent):
            log.warning(
                "dropped a delivery to %s: %s (%s)", SERVICE_ADDRESS, checked.reason, checked.detail
            )
            return
        sender = AgentAddress.parse(checked.sender)
        if responsible_tier(checked.payload, sender.tier) != self.tier:
            return  # another tier's launchers answer it
        requester = await self._requester(checked)
        if requester is None:
            return
        op_name = "request"
        try:
            age_s = time.time() - checked.time_ms / 1000
            if age_s > self.policy.max_age_s:
                raise Refused("expired", f"the request is {age_s:.0f} s old")
            require_control(requester)
            op = parse_op(checked.payload)
            op_name = op.op
            async with _in_progress(msg):
                body = await self._run(op, requester, msg.metadata.num_delivered > 1)
        except Refused as exc:
            body = {"ok": False, "error": exc.code, "detail": str(exc)}
        except SymbiError as exc:
            body = {"ok": False, "error": "failed", "detail": str(exc)}
        body = {"op": op_name, **body}
        log.info(
            "%s from %s: %s", op_name, requester.address, "ok" if body["ok"] else body["error"]
        )
        try:
            await self.answerer.answer(checked, body, requester)
        except PublishError as exc:
            log.warning("cannot answer %s: %s", requester.address, exc)

    async def _requester(self, request: Message) -> AgentRecord | None:
        """The sender's record if it is active with the key the route tag vouches for."""
        try:
            record = await (await self.bus.registry()).get(request.sender)
        except AgentNotFoundError:
            record = None
        if record is None or not record.active or record.public_key != request.sender_key:
            log.warning("ignoring a control message from %s: not an active agent", request.sender)
            return None
        return record

    async def _run(
        self, op: LaunchOp | StopOp | StatusOp, requester: AgentRecord, redelivered: bool
    ) -> dict[str, Any]:
        tier: Tier = op.tier or AgentAddress.parse(requester.address).tier
        address = f"{tier}.{op.id}"
        if isinstance(op, LaunchOp):
            if redelivered and self.launcher.root(tier, op.id).exists():
                # Launched before a crash or a lost acknowledgement: report, do not redo.
                return await self._status(tier, op.id, requester)
            owned = sum(1 for s in self.launcher.sandboxes() if s.owner == requester.address)
            request = launch_request(op, tier, requester, self.policy, owned)
            sandbox = await self.launcher.launch(request)
            record = await (await self.bus.registry()).get(address)
            return {
                "ok": True,
                "address": address,
                "backend": sandbox.backend,
                "state": "running",
                "public_key": record.public_key,
                "encryption_public_key": record.encryption_public_key,
            }
        if isinstance(op, StopOp):
            check_owner(self._sandbox(tier, op.id), requester)
            await self.launcher.stop(tier, op.id, timeout=op.timeout_s)
            return {"ok": True, "address": address, "state": "stopped"}
        return await self._status(tier, op.id, requester)

    def _sandbox(self, tier: Tier, agent_id: str) -> Sandbox:
        try:
            return self.launcher.sandbox(tier, agent_id)
        except SymbiError as exc:
            raise Refused("not_found", f"no sandbox for {tier}.{agent_id} on this host") from exc

    async def _status(self, tier: Tier, agent_id: str, requester: AgentRecord) -> dict[str, Any]:
        sandbox = self._sandbox(tier, agent_id)
        check_owner(sandbox, requester)
        status = await asyncio.to_thread(self.launcher.status, sandbox)
        return {
            "ok": True,
            "address": f"{tier}.{agent_id}",
            "backend": sandbox.backend,
            "state": status.state,
            "exit_code": status.exit_code,
            "started_ms": sandbox.started_ms,
        }
