"""What the child processes share: agents from their files, the loop, stdin lines.

The sender and the receivers connect with plain nats.py and the agent's own
``agent.creds`` and ``agent.json``, exactly as the README tells a user to:
nothing in the measured path goes through the bench's or the runtime's code.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client


@dataclass(frozen=True, slots=True)
class AgentFiles:
    """An agent's directory as ``symbi agent register --out DIR`` writes it."""

    directory: Path
    info: dict[str, Any]

    @classmethod
    def load(cls, directory: str | Path) -> AgentFiles:
        path = Path(directory)
        return cls(path, json.loads((path / "agent.json").read_text()))

    @property
    def creds(self) -> Path:
        return self.directory / "agent.creds"

    @property
    def address(self) -> str:
        return str(self.info["address"])

    async def connect(self) -> Client:
        """A connection as this agent: its credentials and its allowed reply-inbox prefix."""

        async def on_error(exc: Exception) -> None:
            print(f"{self.address}: NATS error: {exc!r}", file=sys.stderr)

        return await nats.connect(
            str(self.info["nats_url"]),
            user_credentials=str(self.creds),
            inbox_prefix=str(self.info["inbox_prefix"]).encode(),
            name=f"bench-{self.address}",
            error_cb=on_error,
            max_reconnect_attempts=3,
        )


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop, as the policy workers do, so neither side has a slower loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(coro)
        return
    uvloop.run(coro)


async def stdin_lines() -> asyncio.StreamReader:
    """A stream reader on stdin, for the orchestrator's commands."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def say(line: str) -> None:
    """One line to the orchestrator (it waits for some of them)."""
    print(line, flush=True)
