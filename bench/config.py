"""The benchmark's settings: a frozen value, with the full and the quick presets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

MAX_PAYLOAD_BYTES = 65_536


@dataclass(frozen=True)
class BenchConfig:
    """What one run does; see ``python -m bench --help`` for each field.

    ``quick`` shrinks every count and duration so that the whole harness runs
    in well under a minute (the smoke test's setting): its figures are not
    meaningful, only its shape is.
    """

    rate: float = 1000.0
    duration_s: float = 10.0
    drain_messages: int = 20_000
    drain_rounds: int = 3
    recovery_burst: int = 10_000
    probe_rate: float = 50.0
    recovery_idle_s: float = 3.0
    recovery_tail_s: float = 12.0
    recovery_window: int = 10
    recovery_factor: float = 1.5
    micro_s: float = 1.0
    latency_workers: int = 1
    payload_bytes: int = 256
    policies: Path | None = None
    profile_dir: Path | None = None
    keep: bool = False
    quick: bool = False

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.probe_rate <= 0:
            raise ValueError("rate, duration and probe rate must be positive")
        if not 1 <= self.drain_rounds <= 15:
            raise ValueError("drain rounds: between 1 and 15")
        if self.drain_messages < 1 or self.recovery_burst < 1:
            raise ValueError("message counts must be at least 1")
        if not 1 <= self.latency_workers <= 16:
            raise ValueError("latency workers: between 1 and 16")
        if not 0 <= self.payload_bytes <= MAX_PAYLOAD_BYTES:
            raise ValueError(
                f"payload size: between 0 and {MAX_PAYLOAD_BYTES:,} bytes (the receivers read"
                " every delivery live; beyond that, at drain speed, the server cuts them off"
                " as slow consumers)"
            )


def quick(config: BenchConfig) -> BenchConfig:
    """The smoke-test preset: a second or so of load and tiny counts."""
    return replace(
        config,
        rate=min(config.rate, 200.0),
        duration_s=1.0,
        drain_messages=300,
        drain_rounds=1,
        recovery_burst=300,
        recovery_idle_s=1.0,
        recovery_tail_s=1.5,
        recovery_window=5,
        micro_s=0.05,
        quick=True,
    )
