"""Section 3: what a failing primary costs the gateway — the first request when the primary
refuses or hangs, and steady state once it is marked down (plus section 6's KV count of each
failover episode)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.client import request
from bench.common import SMALL_BODY, log, median, sub
from bench.context import Bench
from bench.render import fmt, met, table
from bench.sections import Section

MODES = ("healthy", "refuse", "hang")


@dataclass
class Failover:
    first_ms: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    answers: dict[str, list[str]] = field(default_factory=lambda: {m: [] for m in MODES})
    timeout_s: float = 0.0
    steady: dict[str, list[dict]] = field(
        default_factory=lambda: {"healthy": [], "dead-primary": []}
    )
    kv_get: int = 0
    kv_put: int = 0
    kv_requests: int = 0


def measure(bench: Bench) -> Failover:
    return bench.once("failover", lambda: _measure(bench))


def _measure(bench: Bench) -> Failover:
    gw = bench.target("gateway")
    server, fleet = gw.server, bench.fleet
    assert server is not None
    out = Failover(timeout_s=float(server.config["bindings"].get("ATTEMPT_TIMEOUT_S", "120")))
    body = SMALL_BODY.encode()
    for rep in range(bench.profile.failover_reps):
        for mode in MODES:
            fleet.reset()
            server.reset()  # cold isolate memory: node 1 is the primary of the next request
            if mode != "healthy":
                fleet.set(1, mode)
            server.kv_stats(reset=True)
            st, h, _, secs = request(gw.post_url, "POST", body, True, timeout=out.timeout_s + 30)
            out.first_ms[mode].append(secs * 1000)
            out.answers[mode].append(f"{st}/{h.get('x-heady-attempts')}/{h.get('x-heady-node')}")
            if mode == "refuse":
                # node 1 is now marked down: steady state with a dead primary, then healthy,
                # back to back; KV traffic of the whole episode
                r = bench.gen.run(gw.post_url, 1, bench.profile.steady_s, True)
                s = server.kv_stats()
                out.kv_get += s["get"]
                out.kv_put += s["put"]
                out.kv_requests += r["requests"] + 1
                out.steady["dead-primary"].append(r)
                fleet.reset()
                server.reset()
                out.steady["healthy"].append(
                    bench.gen.run(gw.post_url, 1, bench.profile.steady_s, True)
                )
        log(
            f"failover rep {rep}: "
            + ", ".join(f"{m} {v[-1]:.1f} ms" for m, v in out.first_ms.items())
        )
    fleet.reset()
    server.reset()
    return out


def render(f: Failover, bench: Bench) -> list[str]:
    first = {m: median(v) for m, v in f.first_ms.items()}
    ans = {m: ", ".join(sorted(set(v))) for m, v in f.answers.items()}
    over = sub(first["hang"], f.timeout_s * 1000 + (first["healthy"] or 0))
    rows = [
        [
            "healthy primary (cold isolate memory)",
            fmt(first["healthy"]),
            ans["healthy"],
            "baseline",
        ],
        [
            "primary refuses connections",
            fmt(first["refuse"]),
            ans["refuse"],
            f"+{fmt(sub(first['refuse'], first['healthy']))} ms over healthy",
        ],
        [
            "primary hangs",
            fmt(first["hang"]),
            ans["hang"],
            f"ATTEMPT_TIMEOUT_S = {f.timeout_s:g} s; +{fmt(over)} ms over timeout + healthy",
        ],
    ]
    lines = table(["case", "first request ms (median)", "status/attempts/node", "note"], rows, {1})
    sd = {
        k: {
            "p50": median(r["p50_us"] / 1000 for r in v),
            "rps": median(r["requests"] / (r["duration_us"] / 1e6) for r in v),
            "errors": sum(r["socket_errors"] + r["status_errors"] for r in v),
        }
        for k, v in f.steady.items()
    }
    ratio = median(
        d["p50_us"] / h["p50_us"]
        for d, h in zip(f.steady["dead-primary"], f.steady["healthy"], strict=True)
    )
    h, d = sd["healthy"], sd["dead-primary"]
    rows = [
        ["healthy", fmt(h["p50"]), fmt(h["rps"], 0), h["errors"], "", ""],
        [
            "primary marked down",
            fmt(d["p50"]),
            fmt(d["rps"], 0),
            d["errors"],
            f"p50 ≤ 1.10x healthy (is {fmt(ratio)}x)",
            met(None if ratio is None else ratio <= 1.10),
        ],
    ]
    header = ["steady state (c=1)", "p50 ms", "req/s", "errors", "target", "met?"]
    return lines + table(header, rows, {1, 2, 3})


SECTION = Section(
    3,
    "failover",
    "Failover cost (gateway; primary = node 1)",
    measure,
    lambda r, b: [SECTION.heading, "", *render(r, b)],
)
