"""Section 2: what relaying a stream costs — per-stream CPU, first-event delay and
per-event delay, each target side by side (and `--src` trees, for a before/after in one run).

The nodes stream `sse_events` events 10 ms apart, each stamped with the node's monotonic clock
(same host as the client), so arrival minus stamp is the event's transit. Delays are reported
over direct's median transit: what the Worker adds on the way. Single streams measure latency;
bursts of concurrent streams measure workerd CPU per stream (/proc ticks are 10 ms, so one
stream alone is below resolution).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bench.client import Stream, request, stream
from bench.common import SMALL_BODY, STREAM_PATH, log, median, pct, sub
from bench.context import Bench
from bench.probes import cpu_seconds
from bench.render import fmt, met, table
from bench.sections import Section
from bench.targets import Target

INTERVAL_S = 0.01
LATE_MS = 5.0


@dataclass
class PerTarget:
    single: list[Stream] = field(default_factory=list)
    burst: list[Stream] = field(default_factory=list)
    burst_cpu_s: list[float] = field(default_factory=list)


def _ok(s: Stream, events: int) -> bool:
    return s.status == 200 and s.ending == "done" and s.events == events


async def _burst(t: Target, n: int) -> list[Stream]:
    url = t.url_for(STREAM_PATH)
    return list(await asyncio.gather(*(stream(url, auth=t.auth) for _ in range(n))))


def run(bench: Bench) -> dict[str, PerTarget]:
    prof = bench.profile
    for n in (1, 2):
        bench.fleet.set(n, "sse", events=prof.sse_events, interval=INTERVAL_S)
    res = {t.name: PerTarget() for t in bench.targets}
    try:
        for rep in range(prof.sse_reps):
            k = rep % len(bench.targets)
            for t in bench.targets[k:] + bench.targets[:k]:
                # one small request first, so every isolate is equally warm (an idle Python
                # isolate adds a few ms to its next request; that is not streaming)
                request(t.post_url, "POST", SMALL_BODY.encode(), t.auth)
                s = asyncio.run(stream(t.url_for(STREAM_PATH), auth=t.auth))
                res[t.name].single.append(s)
                log(
                    f"stream {t.name:>16} {s.status} {s.ending} {s.events} events, first "
                    f"{fmt(s.first_event_ms)} ms"
                )
        for _ in range(prof.stream_bursts):
            for t in bench.targets:
                c0 = cpu_seconds(t.workerd)
                streams = asyncio.run(_burst(t, prof.stream_conc))
                c1 = cpu_seconds(t.workerd)
                res[t.name].burst.extend(streams)
                if c0 is not None and c1 is not None:
                    res[t.name].burst_cpu_s.append((c1 - c0) / len(streams))
                ok = sum(_ok(s, prof.sse_events) for s in streams)
                log(f"stream burst {t.name:>16} {ok}/{len(streams)} complete")
    finally:
        bench.fleet.reset()
    return res


def summarize(res: dict[str, PerTarget], events: int) -> dict[str, dict]:
    direct = res.get("direct")
    base = pct([x for s in direct.single for x in s.transit], 50) if direct else None
    base = base or 0.0
    out = {}
    for name, r in res.items():
        everything = r.single + r.burst
        single = [x - base for s in r.single for x in s.transit]
        burst = [x - base for s in r.burst for x in s.transit]
        out[name] = {
            "ok": sum(_ok(s, events) for s in everything),
            "streams": len(everything),
            "cpu_ms": median(x * 1000 for x in r.burst_cpu_s),
            "first_event": median(s.first_event_ms for s in r.single),
            "delay_p50": pct(single, 50),
            "delay_p99": pct(single, 99),
            "delay_max": max(single, default=None),
            "burst_p99": pct(burst, 99),
            "burst_max": max(burst, default=None),
            "late": sum(1 for x in single if x > LATE_MS),
            "events": len(single),
            "gap_max": max((g for s in r.single for g in s.gaps), default=None),
        }
    return out


def render(res: dict[str, PerTarget], bench: Bench) -> list[str]:
    prof = bench.profile
    s = summarize(res, prof.sse_events)
    d_first = s.get("direct", {}).get("first_event")
    rows = []
    for n in bench.names:
        x = s.get(n)
        if x is None:
            continue
        rows.append(
            [
                n,
                f"{x['ok']}/{x['streams']}",
                "" if n == "direct" else fmt(x["cpu_ms"]),
                fmt(x["first_event"]),
                fmt(sub(x["first_event"], d_first)),
                f"{fmt(x['delay_p50'])} / {fmt(x['delay_p99'])} / {fmt(x['delay_max'])}",
                f"{fmt(x['burst_p99'])} / {fmt(x['burst_max'])}",
                fmt(x["gap_max"]),
                f"{x['late']} of {x['events']}",
            ]
        )
    header = [
        "target",
        "complete streams",
        f"CPU ms/stream (c={prof.stream_conc})",
        "first event ms",
        "first event vs direct ms",
        "event delay p50 / p99 / max ms (c=1)",
        f"event delay p99 / max ms (c={prof.stream_conc})",
        "max gap ms (c=1)",
        f"events > {LATE_MS:g} ms late (c=1)",
    ]
    lines = table(header, rows, {2, 3, 4, 7})
    lines += [
        f"Each stream: {prof.sse_events} events {INTERVAL_S * 1000:g} ms apart, ending with "
        "`data: [DONE]`; complete = status 200, every event, [DONE]. Event delay = transit "
        "(arrival minus the node's monotonic stamp) minus direct's median transit. c=1 streams "
        "follow a "
        f"warm-up request; CPU is workerd's over bursts of {prof.stream_conc} concurrent streams "
        "divided by the streams.",
        "",
    ]
    checks = []
    for n in [n for n in bench.names if n.startswith("gateway")]:
        x = s[n]
        fe = sub(x["first_event"], d_first)
        checks.append(
            [
                f"{n}: first event later than direct",
                f"{fmt(fe)} ms",
                "≤ 1 ms",
                met(None if fe is None else fe <= 1.0),
            ]
        )
        checks.append(
            [
                f"{n}: events delayed > {LATE_MS:g} ms (c=1)",
                f"{x['late']} of {x['events']}",
                "0",
                met(x["late"] == 0 if x["events"] else None),
            ]
        )
    if checks:
        lines += table(["streaming check", "value", "target", "met?"], checks, {1})
    return lines


SECTION = Section(
    2,
    "streaming",
    "Streaming cost (SSE relay: CPU per stream, first-event and per-event delay)",
    run,
    lambda r, b: [SECTION.heading, "", *render(r, b)],
)
