"""What the orchestrator tells the load and receiver processes, as JSON files.

The sender (:mod:`bench.load`) and the receivers (:mod:`bench.receiver`) run
as separate processes, as real agents would, so that their CPU does not
share an event loop with the measurement. They get a plan file on the command
line and write their results to a second file; the only other traffic is a
few text lines on their stdin and stdout (see each module).

Every agent is named by its directory (``agent.json`` + ``agent.creds``,
exactly what ``symbi agent register --out DIR`` writes), so the child
processes connect with the same files a user's agent would.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from agent_sdk.names import Level

# What a receiver checks of each agent's first delivery: the envelope signature,
# plus the worker's route tag (which the bare relay does not add).
CheckMode = Literal["none", "envelope", "routed"]


@dataclass(frozen=True, slots=True)
class Route:
    """One (sender, recipient) pair; a stream's messages cycle over its routes."""

    sender_dir: str
    to: str
    to_key: str
    sealed: bool
    label: str
    level: Level = "restricted"


@dataclass(frozen=True, slots=True)
class Stream:
    """A schedule of messages.

    ``rate`` > 0 makes it open loop: message ``i`` is due at ``start_s + i /
    rate``, whatever happened to the ones before (no waiting for an answer).
    It runs for ``duration_s``, or, when ``tail_s`` is set, until every burst
    stream of the plan has finished publishing, plus ``tail_s``. ``rate`` 0
    makes it a burst: ``count`` messages as fast as the client can publish them.
    """

    name: str
    routes: tuple[Route, ...]
    rate: float = 0.0
    duration_s: float = 0.0
    count: int = 0
    start_s: float = 0.0
    tail_s: float | None = None

    @property
    def is_burst(self) -> bool:
        return self.rate <= 0


@dataclass(frozen=True, slots=True)
class SendPlan:
    url: str
    streams: tuple[Stream, ...]
    payload_bytes: int = 256
    max_in_flight: int = 4096


@dataclass(frozen=True, slots=True)
class ReceivePlan:
    """Which agents listen, and how long to wait once the expected count is known."""

    agents: tuple[str, ...]
    durable: bool = True
    grace_s: float = 60.0
    idle_s: float = 10.0
    check: CheckMode = "routed"
    sender_keys: dict[str, str] = field(default_factory=dict)


def dump(obj: SendPlan | ReceivePlan, path: Path) -> None:
    path.write_text(json.dumps(asdict(obj)))


def load_send_plan(path: Path) -> SendPlan:
    data = json.loads(path.read_text())
    streams = tuple(
        Stream(**{**s, "routes": tuple(Route(**r) for r in s["routes"])}) for s in data["streams"]
    )
    return SendPlan(**{**data, "streams": streams})


def load_receive_plan(path: Path) -> ReceivePlan:
    data = json.loads(path.read_text())
    return ReceivePlan(**{**data, "agents": tuple(data["agents"])})
