"""The results as text tables, and the JSON file that keeps all of them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATENCY_HEADERS = (
    "relay", "scenario", "sent", "live", "durable", "p50", "p95", "p99", "max", "p50 x",
    "p99 x", "lag p99", "CPU us/msg", "batch", "busy",
)  # fmt: skip
THROUGHPUT_HEADERS = (
    "relay", "workers", "payload", "sent", "live", "durable", "msg/s", "rounds", "x bare",
    "CPU us/msg",
    "CPU x", "server us/msg", "peak RSS MB", "batch", "busy",
)  # fmt: skip


def write_json(results: dict[str, Any], out: Path | None) -> Path:
    """Write to ``out``, else ``bench/results/<UTC timestamp>.json``; return the path."""
    if out is None:
        stamp = results["meta"]["started"].replace(":", "").replace("+0000", "Z")
        out = RESULTS_DIR / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def _is_number(v: object) -> bool:
    return v is None or isinstance(v, int | float)


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _x(ratio: float | None) -> str | None:
    return None if ratio is None else f"{ratio:.2f}x"


def _latency_rows(results: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    ratios = results["ratios"]["latency"]
    for kind in ("bare", "router"):
        for name, phase in results[kind]["latency"].items():
            lat = phase["latency_ms"] or {}
            r: dict[str, Any] = {"p50": 1.0, "p99": 1.0}
            if kind == "router":
                r = ratios.get(name, {})
            lag = phase["sender_lag_ms"] or {}
            rows.append(
                [
                    kind, name, phase["sent"], phase["delivered_live"], phase["delivered_durable"],
                    lat.get("p50"), lat.get("p95"), lat.get("p99"), lat.get("max"),
                    _x(r.get("p50")), _x(r.get("p99")), lag.get("p99"),
                    phase["relay_cpu_us_per_msg"], phase.get("mean_batch"),
                    phase["machine_busy_cores"],
                ]
            )  # fmt: skip
            if kind == "router" and name == "tier_pairs":
                for label, s in phase["by_pair"].items():
                    rows.append(
                        [
                            "", f"  {label}", s["count"], None, None, s["p50"], s["p95"],
                            s["p99"], s["max"], _x(r.get("by_pair_p50", {}).get(label)),
                            None, None, None, None, None,
                        ]
                    )  # fmt: skip
    return rows


def _throughput_rows(results: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    ratios, cpu = results["ratios"]["throughput"], results["ratios"]["cpu_per_msg"]
    for kind in ("bare", "router"):
        for key, phase in results[kind]["throughput"].items():
            same = "1.00x"
            workers, _, sealed = key.partition("_")
            rows.append(
                [
                    kind, int(workers), "sealed" if sealed else "plaintext", phase["sent"],
                    phase["delivered_live"], phase["delivered_durable"], phase["throughput"],
                    _spread(phase.get("round_throughputs")),
                    _x(ratios.get(key)) if kind == "router" else same,
                    phase["relay_cpu_us_per_msg"],
                    _x(cpu.get(key)) if kind == "router" else same,
                    phase["server_cpu_us_per_msg"],
                    phase["peak_rss_mb"], phase.get("mean_batch"), phase["machine_busy_cores"],
                ]
            )  # fmt: skip
    return rows


def _spread(rounds: list[float] | None) -> str | None:
    """``min-max`` of a drain's rounds (the row shows the median one), or None for one round."""
    if not rounds or len(rounds) < 2:
        return None
    return f"{min(rounds):,.0f}-{max(rounds):,.0f}"


def render(results: dict[str, Any], path: Path | None = None) -> str:
    meta, cfg = results["meta"], results["meta"]["config"]
    out = [
        f"symbi-runtime bench, {meta['started']} ({meta['elapsed_s']} s), {meta['cpus']} CPUs, "
        f"load average {meta['load_average_before'][0]} -> {meta['load_average_after'][0]}",
        f"{meta['nats_server']}, nats-py {meta['nats_py']}, Python {meta['python']}; "
        f"policies {meta['policies']}",
        f"offered {cfg['rate']:g} msg/s for {cfg['duration_s']:g} s, payload "
        f"{cfg['payload_bytes']} B, {cfg['latency_workers']} relay process(es) for latency"
        + (" [QUICK: shape only, figures meaningless]" if cfg["quick"] else ""),
        "batch = a policy worker's mean messages per batch; busy = CPUs busy on the whole"
        f" machine meanwhile (of {meta['cpus']}), near {meta['cpus']} = saturated, noisy figures",
        "",
        "Latency, open loop, Symbi-Time -> receipt by the recipient (ms); x = ratio to the bare"
        " relay (tier pairs: to its plaintext)",
        table(LATENCY_HEADERS, _latency_rows(results)),
        "",
        f"Throughput, backlog of {cfg['drain_messages']:,} drained (msg/s from release to last"
        f" delivery); the median of {cfg.get('drain_rounds', 1)} alternating round(s), all"
        " figures of that round; rounds = slowest-fastest",
        table(THROUGHPUT_HEADERS, _throughput_rows(results)),
        "scaling 1 -> 2 workers: "
        + ", ".join(f"{k} {_x(v) or '-'}" for k, v in results["ratios"]["scaling"].items()),
    ]
    rec = results["router"].get("recovery")
    if rec:
        out += ["", _recovery_line(rec, cfg)]
    micro = results["micro"]
    out += [
        "",
        "Micro rates (one thread; per CPU second is the per-core figure)",
        table(
            ["operation", "per CPU s", "per s", "ops"],
            [
                [name, micro[name]["per_cpu_s"], micro[name]["per_s"], micro[name]["ops"]]
                for name in ("decide", "envelope_parse", "envelope_verify", "ed25519_verify")
            ],
        ),
        f"agent_sdk verify runs at {micro['verify_vs_raw']:.0%} of raw Ed25519 verify",
        "",
        "Targets",
        table(
            ["target", "value", "limit", "result"],
            [
                [t["target"], t["value"], f"{t['unit']} {t['limit']:g}", _verdict(t["pass"])]
                for t in results["targets"]
            ],
        ),
    ]
    prof = results["router"].get("profile")
    if prof:
        out += ["", *_profile_lines(prof)]
    if path is not None:
        out += ["", f"results: {path}"]
    return "\n".join(out)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _recovery_line(rec: dict[str, Any], cfg: dict[str, Any]) -> str:
    during = rec.get("probe_latency_during_burst_ms") or {}
    recovered = rec.get("recovered_after_s")
    return (
        f"Recovery: probes at {cfg['probe_rate']:g} msg/s, idle p50 {rec.get('idle_p50_ms')} ms;"
        f" burst of {rec['burst_messages']:,} published in {rec['burst_publish_s']} s"
        f" (probe p50 {during.get('p50')} ms, max {during.get('max')} ms meanwhile);"
        f" backlog gone {rec['burst_drained_after_drop_s']} s after the load dropped;"
        f" probe p50 back to <= {rec.get('threshold_ms')} ms after "
        + (f"{recovered} s" if recovered is not None else "never (within the run)")
    )


def _profile_lines(prof: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for what, entry in prof.items():
        summary, phase = entry["profile"], entry["phase"]
        if what == "drain":
            setting = (
                f"draining {phase['sent']:,} messages ({phase['throughput']:,.0f} msg/s while"
                " sampled)"
            )
        else:
            lat = phase["latency_ms"] or {}
            setting = (
                f"at {phase['offered_rate']:g} msg/s open loop (p50 {lat.get('p50')} ms while"
                " sampled)"
            )
        by_component = ", ".join(
            f"{c['component']} {c['share']:.0%}" for c in summary["components"][:8]
        )
        lines += [
            f"Profile of one worker {setting}: {summary['samples']:,} samples, {summary['raw']}",
            f"self time by component: {by_component}",
            table(
                ["self", "inclusive", "function"],
                _merge(summary["self"], summary["inclusive"]),
            ),
            "",
        ]
    return lines[:-1]


def _merge(self_rows: list[dict[str, Any]], incl_rows: list[dict[str, Any]]) -> list[list[str]]:
    """The top self-time functions, then the top inclusive ones not already listed."""
    incl = {r["function"]: r["share"] for r in incl_rows}
    own = {r["function"]: r["share"] for r in self_rows}
    names = [r["function"] for r in self_rows[:12]]
    names += [r["function"] for r in incl_rows if r["function"] not in names][:12]
    return [[_pct(own.get(n)), _pct(incl.get(n)), n] for n in names]


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"
