"""The agent registry: a JetStream KV bucket of :class:`AgentRecord`, keyed ``<tier>.<id>``.

Writers (the gateway, the launchers) use compare-and-set, so two registrations
of one id race safely; readers (the policy workers) keep a live cache fed by a
KV watch, so a revocation reaches every worker within milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from agent_sdk.errors import AgentExistsError, AgentNotFoundError, RegistryError
from broker_gateway.records import AgentRecord
from broker_gateway.streams import REGISTRY_BUCKET

log = logging.getLogger(__name__)


def _decode(raw: bytes | None) -> AgentRecord | None:
    if not raw:
        return None
    try:
        return AgentRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("ignoring an unreadable registry record")
        return None


class Registry:
    """Reads and writes of the registry bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> Registry:
        return cls(await js.key_value(REGISTRY_BUCKET))

    async def create(self, record: AgentRecord) -> None:
        """Add a new agent; :class:`AgentExistsError` if its id is taken in its tier."""
        try:
            await self.kv.create(record.key, record.model_dump_json().encode())
        except KeyWrongLastSequenceError as exc:
            raise AgentExistsError(f"agent {record.address} is already registered") from exc

    async def get(self, address: str) -> AgentRecord:
        try:
            entry = await self.kv.get(address)
        except KeyNotFoundError as exc:
            raise AgentNotFoundError(f"no agent {address} is registered") from exc
        record = _decode(entry.value)
        if record is None:
            raise AgentNotFoundError(f"no agent {address} is registered")
        return record

    async def update(self, record: AgentRecord) -> None:
        """Overwrite a record that must exist (compare-and-set on its revision)."""
        for _ in range(10):
            try:
                entry = await self.kv.get(record.key)
            except KeyNotFoundError as exc:
                raise AgentNotFoundError(f"no agent {record.address} is registered") from exc
            try:
                await self.kv.update(record.key, record.model_dump_json().encode(), entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return
        raise RegistryError(f"agent {record.address} is being changed concurrently")

    async def list(self) -> list[AgentRecord]:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        records = []
        for key in sorted(keys):
            with contextlib.suppress(AgentNotFoundError):
                records.append(await self.get(key))
        return records


class RegistryCache:
    """A live, read-only copy of the registry for the hot path of the policy workers."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.records: dict[str, AgentRecord] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        watcher = await self.kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher))
        await self._ready.wait()

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                self._ready.set()
                continue
            record = _decode(entry.value) if entry.operation is None else None
            if record is None:
                self.records.pop(entry.key, None)
            else:
                self.records[entry.key] = record

    def get(self, address: str) -> AgentRecord | None:
        return self.records.get(address)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
