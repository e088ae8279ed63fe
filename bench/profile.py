"""Sampling profiles of a relay process with py-spy, summarised into the results.

py-spy samples the running worker from outside (no restart, no
instrumentation, ``--nonblocking`` so the worker is not paused), which is
why the profiled phase is an extra one: the measured phases stay unprofiled.
The raw output (collapsed stacks, one ``frame;frame;... count`` line per
distinct stack) is kept beside the results and summarised here as the
functions with the most samples *on top of the stack* (self time) and
*anywhere in the stack* (inclusive time), each as a share of all samples.

py-spy is not a dependency of the project: ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.bus import BenchError

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    """The py-spy binary beside this interpreter, else on PATH; BenchError if none."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


class Profiler:
    """``py-spy record`` of one process, from :meth:`start` to :meth:`stop`."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            py_spy(),
            "record",
            "--pid",
            str(self.pid),
            "--format",
            "raw",
            "--rate",
            str(self.rate),
            "--nonblocking",
            "--output",
            str(self.out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # attaching takes a moment; start the phase after it

    async def stop(self) -> dict[str, Any]:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if not self.out.exists():
            raise BenchError(f"py-spy wrote no profile (pid {self.pid}); is ptrace allowed?")
        return summarize(self.out)


def _parse(raw: str) -> tuple[str, str]:
    """``func (path/to/file.py:123)`` -> (``func (to/file.py)``, component of the file)."""
    m = _FRAME_RE.match(raw.strip())
    if m is None:
        return raw.strip(), "other"
    path = m.group("file")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else parts[0]
    return f"{m.group('func')} ({short})", _component(parts)


def _component(parts: list[str]) -> str:
    """The library a frame belongs to: ``nacl``, ``nats``, ``asyncio``, ``policy_worker``...

    py-spy shortens paths to what follows the ``sys.path`` entry, so the first
    component is the top-level package (or the stdlib module).
    """
    if "site-packages" in parts:  # a path py-spy did not shorten
        parts = parts[parts.index("site-packages") + 1 :] or ["site-packages"]
    return parts[0].removesuffix(".py")


def summarize(path: Path, top: int = 40) -> dict[str, Any]:
    """Top functions by self and inclusive samples in a collapsed-stack file, and self
    samples by component (``nacl``, ``nats``, ``policy_worker``, ``stdlib:asyncio``...)."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    by_depth: list[Counter[str]] = []
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse(f) for f in stack.split(";")]
        if not frames:
            continue
        total += count
        self_samples[frames[-1][0]] += count
        components[frames[-1][1]] += count
        for name in {f[0] for f in frames}:
            inclusive[name] += count
        for depth, (name, _) in enumerate(frames):
            if depth == len(by_depth):
                by_depth.append(Counter())
            by_depth[depth][name] += count

    # The trunk: the chain of frames from the root down that carries the root's
    # samples undivided (runpy, main, the event loop's run): it says nothing about
    # where the time goes. Callbacks the loop runs directly start stacks of their own.
    trunk: set[str] = set()
    root = by_depth[0].most_common(1)[0][1] if by_depth else 0
    for level in by_depth if root >= total / 2 else []:
        name, n = level.most_common(1)[0]
        if n < 0.99 * root:
            break
        trunk.add(name)

    def share(counter: Counter[str], n: int = top) -> list[dict[str, Any]]:
        if not total:
            return []
        return [
            {"function": name, "share": round(k / total, 4), "samples": k}
            for name, k in counter.most_common(n)
        ]

    return {
        "samples": total,
        "raw": str(path),
        "self": share(self_samples),
        "inclusive": [r for r in share(inclusive) if r["function"] not in trunk],
        "components": [
            {"component": r["function"], "share": r["share"]} for r in share(components, 15)
        ],
    }
