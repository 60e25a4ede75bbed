"""Section 6: KV reads and writes, counted by the harness at the binding boundary, in steady
state (over section 1's gateway load runs) and per failover episode (section 3's)."""

from __future__ import annotations

from bench.context import Bench
from bench.render import fmt, met, table
from bench.sections import Section, failover, load


def run(bench: Bench) -> tuple[load.LoadRuns, failover.Failover]:
    return load.measure(bench), failover.measure(bench)


def _per_1k(n: int, requests: int) -> float | None:
    return None if not requests else n * 1000 / requests


def render(result: tuple[load.LoadRuns, failover.Failover], bench: Bench) -> list[str]:
    lr, f = result
    kv = lr.kv
    gw = bench.target("gateway").server
    assert gw is not None
    refresh = float(gw.config["bindings"].get("HEALTH_REFRESH_S", "30"))
    # the load runs spread over the whole interleaved phase: count refresh intervals over its
    # wall-clock span (one read may land at each interval boundary)
    allowed = int(kv.span // refresh) + 1
    ok = kv.put == 0 and kv.get <= allowed
    rows = [
        [
            "steady state (all load runs)",
            kv.requests,
            f"{fmt(kv.seconds, 1)} under load, {fmt(kv.span, 0)} wall",
            kv.get,
            kv.put,
            fmt(_per_1k(kv.get, kv.requests), 3),
            fmt(_per_1k(kv.put, kv.requests), 3),
            f"0 writes, ≤ 1 read per isolate per {refresh:g} s (≤ {allowed} here, 1 isolate)",
            met(ok),
        ],
        [
            "failover (primary refusing, c=1)",
            f.kv_requests,
            "",
            f.kv_get,
            f.kv_put,
            fmt(_per_1k(f.kv_get, f.kv_requests), 3),
            fmt(_per_1k(f.kv_put, f.kv_requests), 3),
            "",
            "",
        ],
    ]
    header = [
        "phase",
        "requests",
        "seconds",
        "KV reads",
        "KV writes",
        "reads / 1k req",
        "writes / 1k req",
        "target",
        "met?",
    ]
    return [
        *table(header, rows, {1, 3, 4, 5, 6}),
        "Steady state is counted over the gateway's load runs, which start after a cold read. "
        "Failover counts each episode from `reset` (cold isolate memory and empty KV) through "
        "the steady run with the primary marked down.",
        "",
    ]


SECTION = Section(
    6,
    "kv",
    "KV traffic (counted at the binding boundary)",
    run,
    lambda r, b: [SECTION.heading, "", *render(r, b)],
)
