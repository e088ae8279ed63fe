"""When to restart a child service that died: soon after a long run, later and later in a loop.

``symbi up`` supervises its policy workers and launchers. A child that dies
after running a while is restarted after :data:`BASE_DELAY_S`; one that keeps
dying within :data:`STABLE_S` of its start waits twice as long each time, up
to :data:`MAX_DELAY_S`, so a child that cannot start (a bad policy file, a
runtime that went away) does not spin a core and flood the log, and one that
recovers is back to the short delay after one stable run. Pure bookkeeping,
on a clock the caller passes, so it is tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

BASE_DELAY_S: Final = 0.5
MAX_DELAY_S: Final = 30.0
STABLE_S: Final = 10.0


def restart_delay(quick_failures: int) -> float:
    """The wait before a restart after ``quick_failures`` exits in a row within STABLE_S."""
    if quick_failures <= 1:
        return BASE_DELAY_S
    return min(MAX_DELAY_S, BASE_DELAY_S * 2.0 ** (quick_failures - 1))


@dataclass
class ChildRecord:
    """What the supervisor knows of one child."""

    started_at: float
    quick_failures: int = 0
    restarts: int = 0
    restart_at: float | None = None


@dataclass
class RestartBook:
    """Start, exit and restart times of every child, by name."""

    children: dict[str, ChildRecord] = field(default_factory=dict)

    def started(self, name: str, now: float) -> None:
        record = self.children.get(name)
        if record is None:
            self.children[name] = ChildRecord(started_at=now)
            return
        record.started_at = now
        record.restart_at = None
        record.restarts += 1

    def exited(self, name: str, now: float) -> float:
        """Note that ``name`` exited at ``now``; the delay before its restart."""
        record = self.children[name]
        if record.restart_at is not None:
            return record.restart_at - now  # already noted
        ran = now - record.started_at
        record.quick_failures = record.quick_failures + 1 if ran < STABLE_S else 1
        delay = restart_delay(record.quick_failures)
        record.restart_at = now + delay
        return delay

    def due(self, now: float) -> list[str]:
        """The children whose restart time has come."""
        return [
            name
            for name, record in self.children.items()
            if record.restart_at is not None and record.restart_at <= now
        ]

    def next_due(self) -> float | None:
        """The earliest pending restart time, if any."""
        times = [r.restart_at for r in self.children.values() if r.restart_at is not None]
        return min(times) if times else None
