"""From a phase's raw :class:`~bench.traffic.Traffic` to the reported figures.

Every figure is a plain JSON value, so that the results file is the whole
record of a run and the table is just one view of it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench.spec import SendPlan
from bench.stats import Sample, percentile, summarize
from bench.traffic import Traffic


def counts(t: Traffic) -> dict[str, Any]:
    """What every phase reports: counts, CPU per message and memory."""
    per_msg = 1e6 / t.live if t.live else 0.0
    return {
        "relays": t.relays,
        "sent": t.sent,
        "send_errors": t.send_errors,
        "delivered_live": t.live,
        "delivered_durable": t.durable,
        "missing_live": t.missing_live,
        "duplicates": t.duplicates,
        "denied": t.denied,
        "checked": t.checked,
        "check_failures": t.check_failures,
        "relay_cpu_us_per_msg": round(t.relay_cpu_s * per_msg, 1),
        "server_cpu_us_per_msg": round(t.server_cpu_s * per_msg, 1),
        "relay_cpu_s": round(t.relay_cpu_s, 3),
        "peak_rss_mb": round(t.relay_peak_rss_mb, 1),
        # Policy workers only (from their metrics): messages per batch, which sets
        # how far the per-batch costs (round trips, flushes) are shared out.
        "mean_batch": round(t.batches[0] / t.batches[1], 2) if t.batches[1] else None,
        "window_s": round(t.window_s, 3),
        # Everything running on the machine meanwhile, this bench included: near the
        # core count, the phase measured a saturated machine.
        "machine_busy_cores": round(t.machine_busy_cores, 2),
        "steal_share": round(t.steal_share, 3),
    }


def latency(t: Traffic, plan: SendPlan) -> dict[str, Any]:
    """Latency from ``Symbi-Time`` to receipt, overall and per route label (tier pair)."""
    by_label: dict[str, list[float]] = defaultdict(list)
    for s in t.samples:
        by_label[plan.streams[s.stream].routes[s.route].label].append(s.latency_ms)
    stream = t.streams[0]
    duration = max(1e-9, (stream["last_ns"] - stream["first_ns"]) / 1e9)
    return {
        **counts(t),
        "p50_by_second_ms": _p50_by_second(t.samples),
        "offered_rate": plan.streams[0].rate,
        "achieved_send_rate": round((stream["sent"] - 1) / duration, 1),
        "sender_lag_ms": stream["lag_ms"],
        "latency_ms": summarize(s.latency_ms for s in t.samples).as_dict() if t.samples else None,
        "by_pair": {label: summarize(v).as_dict() for label, v in sorted(by_label.items())},
    }


def drain(t: Traffic) -> dict[str, Any]:
    """Throughput of a backlog: all delivered, from the moment the relays were let loose."""
    if not t.samples:
        return {**counts(t), "throughput": 0.0}
    first = min(s.recv_ns for s in t.samples)
    last = max(s.recv_ns for s in t.samples)
    elapsed = (last - t.release_ns) / 1e9
    steady = (last - first) / 1e9
    return {
        **counts(t),
        "throughput": round(t.live / elapsed, 1),
        "throughput_first_to_last": round((t.live - 1) / steady, 1) if steady > 0 else None,
        "drain_s": round(elapsed, 3),
        "first_delivery_ms": round((first - t.release_ns) / 1e6, 2),
    }


def recovery(
    t: Traffic, *, probe: int, burst: int, warmup_s: float, window: int, factor: float
) -> dict[str, Any]:
    """How long after the load drops the light probe stream's p50 is back to its idle level.

    The idle level is the probes' p50 before the burst (after ``warmup_s``).
    The load drops when the sender has published the last burst message. The
    probes sent after that are cut into windows of ``window`` consecutive
    probes; recovery is the first window from which every window's p50 stays
    within ``factor`` times the idle p50 (at least +0.5 ms, so a sub-ms idle
    level does not demand the impossible), measured from the drop to the
    send time of that window's first probe.
    """
    probe_stream, burst_stream = t.streams[probe], t.streams[burst]
    start_ns = probe_stream["first_ns"] + int(warmup_s * 1e9)
    burst_start, drop = burst_stream["first_ns"], burst_stream["last_ns"]
    probes = [s for s in t.samples if s.stream == probe]
    idle = [s.latency_ms for s in probes if start_ns <= s.send_ns < burst_start]
    after = [s for s in probes if s.send_ns >= drop]
    bursts = [s for s in t.samples if s.stream == burst]
    result: dict[str, Any] = {
        **counts(t),
        "burst_messages": burst_stream["acked"],
        "burst_publish_s": round((drop - burst_start) / 1e9, 3),
        "burst_drained_after_drop_s": (
            round((max(s.recv_ns for s in bursts) - drop) / 1e9, 3) if bursts else None
        ),
        "probe_latency_during_burst_ms": _p50_max(
            [s for s in probes if burst_start <= s.send_ns < drop]
        ),
    }
    if not idle:
        return {**result, "idle_p50_ms": None, "recovered_after_s": None}
    ordered = sorted(idle)
    idle_p50 = percentile(ordered, 50)
    threshold = max(idle_p50 * factor, idle_p50 + 0.5)
    windows = [after[i : i + window] for i in range(0, len(after) - window + 1, window)]
    good_from: int | None = None
    for i, w in enumerate(windows):
        ok = percentile(sorted(s.latency_ms for s in w), 50) <= threshold
        if ok and good_from is None:
            good_from = i
        elif not ok:
            good_from = None
    recovered = (
        round(max(0.0, (windows[good_from][0].send_ns - drop) / 1e9), 3)
        if good_from is not None
        else None
    )
    return {
        **result,
        "idle_p50_ms": round(idle_p50, 3),
        "threshold_ms": round(threshold, 3),
        "window_probes": window,
        "recovered_after_s": recovered,
        "post_drop_p50_by_window_ms": [
            round(percentile(sorted(s.latency_ms for s in w), 50), 2) for w in windows
        ],
    }


def _p50_by_second(samples: list[Sample]) -> list[float]:
    """p50 of the messages sent in each second of the phase: a queue building up shows."""
    if not samples:
        return []
    start = samples[0].send_ns
    buckets: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        buckets[(s.send_ns - start) // 1_000_000_000].append(s.latency_ms)
    return [round(percentile(sorted(buckets[k]), 50), 2) for k in sorted(buckets)]


def _p50_max(samples: list[Sample]) -> dict[str, float] | None:
    if not samples:
        return None
    summary = summarize(s.latency_ms for s in samples)
    return {"p50": round(summary.p50, 3), "max": round(summary.max, 3)}
