"""CPU time and memory of other processes, read from ``/proc``.

The worker's cost per message is measured from outside, so the worker needs no
instrumentation and the figure includes everything it does (nats-py's parser,
the event loop, the GC), not just the code a profiler would attribute to it.
Linux only, like the rest of the runtime's deployment.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Final

_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative user and system CPU seconds of one process at one moment."""

    pid: int
    user_s: float
    system_s: float

    @property
    def total_s(self) -> float:
        return self.user_s + self.system_s


def cpu(pid: int) -> CpuSample:
    """utime + stime of ``pid`` (fields 14 and 15 of ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        text = handle.read()
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return CpuSample(pid, utime / _CLOCK_TICKS, stime / _CLOCK_TICKS)


def cpu_total(pids: list[int]) -> float:
    """The summed CPU seconds of ``pids`` (all must be alive)."""
    return sum(cpu(pid).total_s for pid in pids)


@dataclass(frozen=True, slots=True)
class MachineSample:
    """Cumulative jiffies of all CPUs (``/proc/stat``): busy, total, and stolen."""

    busy: int
    total: int
    steal: int
    at: float  # time.monotonic() when read


def machine() -> MachineSample:
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time
    # is already counted in user and nice.
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return MachineSample(total - idle, total, fields[7], time.monotonic())


def busy_cores(before: MachineSample, after: MachineSample) -> float:
    """How many CPUs were busy on average in between (everything on the machine)."""
    seconds = after.at - before.at
    if seconds <= 0:
        return 0.0
    return (after.busy - before.busy) / _CLOCK_TICKS / seconds


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no {field}")


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size (``VmHWM``) of ``pid``, in MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def rss_mb(pid: int) -> float:
    """The current resident set size (``VmRSS``) of ``pid``, in MiB."""
    return _status_kib(pid, "VmRSS") / 1024
