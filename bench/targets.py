"""Ratios to the bare relay, and the issue's targets, each with its pass or fail.

Absolute figures on a shared 2-core machine move from run to run; ratios to
the baseline measured minutes earlier in the same run move much less, so
every router figure is also given as a multiple of the bare relay's. The
targets themselves are as the issue states them: the latency targets are
absolute (a user waits in milliseconds, not in ratios), the throughput ones
are relative.
"""

from __future__ import annotations

from typing import Any

P50_LIMIT_MS = 2.0
P99_LIMIT_MS = 5.0
THROUGHPUT_SHARE = 0.60
SEALED_COST = 0.10
DECISIONS_PER_CORE = 100_000
RSS_LIMIT_MB = 150.0


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _lat(phase: dict[str, Any] | None, key: str) -> float | None:
    if not phase or not phase.get("latency_ms"):
        return None
    value: float = phase["latency_ms"][key]
    return value


def _tput(section: dict[str, Any], key: str) -> float | None:
    phase = section.get("throughput", {}).get(key)
    return None if phase is None else float(phase["throughput"])


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every router figure over the bare relay's of the same kind (latency: same payload)."""
    bare, router = results["bare"], results["router"]
    out: dict[str, Any] = {"latency": {}, "throughput": {}, "cpu_per_msg": {}, "scaling": {}}
    for name in ("plaintext", "sealed", "tier_pairs"):
        base = bare["latency"].get(name) or bare["latency"]["plaintext"]
        phase = router["latency"].get(name)
        out["latency"][name] = {
            q: _ratio(_lat(phase, q), _lat(base, q)) for q in ("p50", "p95", "p99", "max")
        }
        if phase:
            out["latency"][name]["by_pair_p50"] = {
                label: _ratio(s["p50"], _lat(base, "p50")) for label, s in phase["by_pair"].items()
            }
    for key in ("1", "1_sealed", "2"):
        out["throughput"][key] = _ratio(_tput(router, key), _tput(bare, key))
        b, r = bare["throughput"].get(key), router["throughput"].get(key)
        if b and r:
            out["cpu_per_msg"][key] = _ratio(r["relay_cpu_us_per_msg"], b["relay_cpu_us_per_msg"])
    for kind, section in (("bare", bare), ("router", router)):
        out["scaling"][kind] = _ratio(_tput(section, "2"), _tput(section, "1"))
    return out


def _target(
    name: str, value: float | None, limit: float, unit: str, ok: bool | None
) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit, "unit": unit, "pass": bool(ok)}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target; a missing figure fails its target."""
    bare, router, micro = results["bare"], results["router"], results["micro"]
    rate = results["meta"]["config"]["rate"]
    rows = []
    for name in ("plaintext", "sealed", "tier_pairs"):
        phase = router["latency"].get(name)
        p50, p99 = _lat(phase, "p50"), _lat(phase, "p99")
        rows.append(
            _target(
                f"p50 at {rate:g} msg/s, all checks ({name})",
                p50,
                P50_LIMIT_MS,
                "ms <=",
                p50 is not None and p50 <= P50_LIMIT_MS,
            )
        )
        rows.append(
            _target(
                f"p99 at {rate:g} msg/s, all checks ({name})",
                p99,
                P99_LIMIT_MS,
                "ms <=",
                p99 is not None and p99 <= P99_LIMIT_MS,
            )
        )
    best_router = max((_tput(router, k) or 0.0 for k in ("1", "2")), default=0.0)
    best_bare = max((_tput(bare, k) or 0.0 for k in ("1", "2")), default=0.0)
    share = _ratio(best_router, best_bare)
    rows.append(
        _target(
            "max throughput / bare relay's",
            share,
            THROUGHPUT_SHARE,
            ">=",
            share is not None and share >= THROUGHPUT_SHARE,
        )
    )
    plain, sealed = _tput(router, "1"), _tput(router, "1_sealed")
    cost = None if not plain or sealed is None else round(1 - sealed / plain, 3)
    rows.append(
        _target(
            "sealed throughput cost vs plaintext",
            cost,
            SEALED_COST,
            "<=",
            cost is not None and cost <= SEALED_COST,
        )
    )
    decisions = float(micro["decide"]["per_cpu_s"])
    rows.append(
        _target(
            "policy decisions/s per core",
            decisions,
            DECISIONS_PER_CORE,
            ">=",
            decisions >= DECISIONS_PER_CORE,
        )
    )
    rss = max(
        [p["peak_rss_mb"] for p in router["latency"].values()]
        + [p["peak_rss_mb"] for p in router["throughput"].values()]
    )
    rows.append(_target("worker peak RSS", rss, RSS_LIMIT_MB, "MB <", rss < RSS_LIMIT_MB))
    return rows
