"""The bus under test: what ``symbi up`` runs, in a temporary state directory.

The orchestrator hosts the :class:`~broker_gateway.runtime.Runtime` itself
(the NATS server is its child process) with no workers, so that it decides
when relays start and stop: the backlog tests need the queue filled before
anyone consumes it. The runtime is exactly ``symbi up``'s, on random ports.
Agents are registered in-process through the gateway and written to disk as
``symbi agent register --out`` does, for the child processes to connect with.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nats.js.api import ConsumerInfo

from agent_sdk.names import Tier
from broker_gateway.gateway import Gateway
from broker_gateway.keys import write_secret
from broker_gateway.runtime import Runtime, RuntimeConfig
from broker_gateway.streams import AUDIT, INGRESS, WORKERS_CONSUMER


class BenchError(Exception):
    """The benchmark could not run as planned (a process died, a wait timed out)."""


@dataclass(frozen=True, slots=True)
class AgentRef:
    """A registered agent: its directory and what the plans need to address it."""

    directory: Path
    tier: Tier
    id: str
    public_key: str
    encryption_public_key: str

    @property
    def address(self) -> str:
        return f"{self.tier}.{self.id}"


def free_port() -> int:
    # Port 0 lets the kernel pick one; nats-server's config needs a fixed number.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Bus:
    """A running runtime and the handles the phases need."""

    def __init__(self, root: Path, keep: bool = False) -> None:
        self.root = root
        self.keep = keep
        config = RuntimeConfig(
            state_dir=root / "state", nats_port=free_port(), http_port=None, workers=0
        )
        self.runtime = Runtime(config)

    @classmethod
    async def start(cls, keep: bool = False) -> Bus:
        bus = cls(Path(tempfile.mkdtemp(prefix="symbi-bench-")), keep)
        try:
            await bus.runtime.start()
        except BaseException:
            bus._cleanup()
            raise
        return bus

    async def stop(self) -> None:
        try:
            await self.runtime.stop()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return self.runtime.url

    @property
    def server_pid(self) -> int:
        server = self.runtime.server
        if server is None or server.proc is None:
            raise BenchError("the NATS server is not running")
        return server.proc.pid

    def child_env(self) -> dict[str, str]:
        return self.runtime.child_env()

    @property
    def _gateway(self) -> Gateway:
        if self.runtime.gateway is None:
            raise BenchError("the runtime is not started")
        return self.runtime.gateway

    async def register(self, tier: Tier, agent_id: str) -> AgentRef:
        """Register an agent and write its ``agent.creds`` and ``agent.json`` (0600)."""
        creds = await self._gateway.register_agent(tier, agent_id)
        directory = self.root / "agents" / f"{tier}.{agent_id}"
        directory.mkdir(parents=True, mode=0o700)
        write_secret(directory / "agent.creds", creds.creds)
        write_secret(directory / "agent.json", json.dumps(creds.info))
        info = creds.info
        return AgentRef(
            directory, tier, agent_id, str(info["public_key"]), str(info["encryption_public_key"])
        )

    # -- the ingress consumer ------------------------------------------------

    async def ingress(self) -> ConsumerInfo:
        info: ConsumerInfo = await self._gateway.js.consumer_info(INGRESS, WORKERS_CONSUMER)
        return info

    async def pause_ingress(self) -> None:
        """Hold every delivery of the workers' consumer (pull requests wait meanwhile)."""
        await self._gateway.js.pause_consumer(INGRESS, WORKERS_CONSUMER, "2100-01-01T00:00:00Z")

    async def release_ingress(self, delay_s: float = 0.25) -> int:
        """End the pause ``delay_s`` from now; returns that instant (Unix ns).

        An explicit resume does not serve the pull requests already waiting
        (they expire first, so each relay would start up to its request expiry
        late, at a different moment); a pause that runs out does serve them, at
        once and all together. So the pause is shortened rather than lifted.
        """
        at_ns = time.time_ns() + int(delay_s * 1e9)
        at = datetime.datetime.fromtimestamp(at_ns / 1e9, datetime.UTC)
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await self._gateway.js.pause_consumer(INGRESS, WORKERS_CONSUMER, stamp)
        await asyncio.sleep(max(0.0, (at_ns - time.time_ns()) / 1e9))
        return at_ns

    async def resume_ingress(self) -> None:
        await self._gateway.js.resume_consumer(INGRESS, WORKERS_CONSUMER)

    async def wait_ingress(
        self, *, pending: int = 0, waiting: int = 0, timeout: float = 60.0
    ) -> ConsumerInfo:
        """Until the consumer has exactly ``pending`` messages left, none unacknowledged
        beyond them, and at least ``waiting`` open pull requests."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.ingress()
            if (
                info.num_pending == pending
                and (info.num_ack_pending or 0) == 0
                and (info.num_waiting or 0) >= waiting
            ):
                return info
            if time.monotonic() > deadline:
                raise BenchError(
                    f"ingress consumer: {info.num_pending} pending, {info.num_ack_pending} "
                    f"unacknowledged, {info.num_waiting} waiting; wanted {pending}/0/>={waiting}"
                )
            await asyncio.sleep(0.05)

    def worker_batches(self) -> tuple[float, float]:
        """(messages, batches) so far in the policy workers' batch-size histogram.

        ``symbi up`` gives its workers a Prometheus multiprocess directory, which
        this reads as its ``/metrics`` endpoint would; the bare relay keeps no
        metrics, so for it both stay 0.
        """
        messages = batches = 0.0
        for metric in self.runtime.metrics_registry().collect():
            for sample in metric.samples:
                if sample.name == "symbi_worker_batch_messages_sum":
                    messages += sample.value
                elif sample.name == "symbi_worker_batch_messages_count":
                    batches += sample.value
        return messages, batches

    async def audit_counts(self) -> dict[str, int]:
        """Audit records so far by decision (``allow``/``deny``)."""
        info = await self._gateway.js.stream_info(AUDIT, subjects_filter="audit.>")
        counts = {"allow": 0, "deny": 0}
        for subject, n in (info.state.subjects or {}).items():
            decision = subject.split(".")[1]
            counts[decision] = counts.get(decision, 0) + n
        return counts
