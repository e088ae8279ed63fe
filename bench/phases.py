"""The phases of a run, each for either relay kind: latency, backlog drain, recovery."""

from __future__ import annotations

import logging
from typing import Any

from bench import figures
from bench.config import BenchConfig
from bench.plans import Pair, cast, senders_for_count, senders_for_rate
from bench.procs import Relay, RelayKind
from bench.spec import CheckMode, SendPlan, Stream
from bench.traffic import Context, run_traffic

log = logging.getLogger(__name__)


def check_mode(kind: RelayKind) -> CheckMode:
    # The bare relay adds no route tag; its deliveries can only be checked as envelopes.
    return "routed" if kind == "router" else "envelope"


async def latency(
    ctx: Context,
    kind: RelayKind,
    relays: list[Relay],
    name: str,
    pairs: list[Pair],
    *,
    sealed: bool,
    config: BenchConfig,
) -> dict[str, Any]:
    """Open loop at ``config.rate`` for ``config.duration_s``, spread evenly over ``pairs``."""
    log.info("%s: latency, %s, %g msg/s for %g s", kind, name, config.rate, config.duration_s)
    share = config.rate / len(pairs)
    n = max(senders_for_rate(share, p.policy) for p in pairs)
    c = await cast(ctx.bus, f"{kind[0]}l{ctx.serial + 1}", [(p, n) for p in pairs], sealed=sealed)
    plan = SendPlan(
        ctx.bus.url,
        (Stream("load", tuple(c.routes), rate=config.rate, duration_s=config.duration_s),),
        payload_bytes=config.payload_bytes,
    )
    t = await run_traffic(
        ctx,
        f"{kind}-latency-{name}",
        plan,
        c.receivers,
        relays,
        backlog=False,
        check=check_mode(kind),
        senders=c.senders,
    )
    return figures.latency(t, plan)


async def drain(
    ctx: Context,
    kind: RelayKind,
    relays: list[Relay],
    pair: Pair,
    *,
    sealed: bool,
    config: BenchConfig,
) -> dict[str, Any]:
    """Preload ``config.drain_messages`` with the consumer paused, then time the delivery."""
    count = config.drain_messages
    log.info("%s: backlog of %d (%s), %d relay(s)", kind, count, _enc(sealed), len(relays))
    n = senders_for_count(count, pair.policy)
    c = await cast(ctx.bus, f"{kind[0]}d{ctx.serial + 1}", [(pair, n)], sealed=sealed)
    plan = SendPlan(
        ctx.bus.url,
        (Stream("backlog", tuple(c.routes), count=count),),
        payload_bytes=config.payload_bytes,
    )
    t = await run_traffic(
        ctx,
        f"{kind}-drain-{len(relays)}-{_enc(sealed)}",
        plan,
        c.receivers,
        relays,
        backlog=True,
        check=check_mode(kind),
        senders=c.senders,
    )
    return figures.drain(t)


async def recovery(
    ctx: Context, kind: RelayKind, relays: list[Relay], pair: Pair, *, config: BenchConfig
) -> dict[str, Any]:
    """A light probe stream, a burst that builds a backlog, then the probes alone."""
    log.info(
        "%s: recovery, probes at %g msg/s, burst of %d",
        kind,
        config.probe_rate,
        config.recovery_burst,
    )
    serial = ctx.serial + 1
    probe = await cast(
        ctx.bus,
        f"{kind[0]}p{serial}",
        [(pair, senders_for_rate(config.probe_rate, pair.policy))],
        sealed=False,
    )
    burst = await cast(
        ctx.bus,
        f"{kind[0]}b{serial}",
        [(pair, senders_for_count(config.recovery_burst, pair.policy))],
        sealed=False,
    )
    plan = SendPlan(
        ctx.bus.url,
        (
            Stream(
                "probe", tuple(probe.routes), rate=config.probe_rate, tail_s=config.recovery_tail_s
            ),
            Stream(
                "burst",
                tuple(burst.routes),
                count=config.recovery_burst,
                start_s=config.recovery_idle_s,
            ),
        ),
        payload_bytes=config.payload_bytes,
    )
    t = await run_traffic(
        ctx,
        f"{kind}-recovery",
        plan,
        probe.receivers + burst.receivers,
        relays,
        backlog=False,
        check=check_mode(kind),
        senders=probe.senders + burst.senders,
    )
    return figures.recovery(
        t,
        probe=0,
        burst=1,
        warmup_s=min(0.5, config.recovery_idle_s / 2),
        window=config.recovery_window,
        factor=config.recovery_factor,
    )


def _enc(sealed: bool) -> str:
    return "sealed" if sealed else "plaintext"
