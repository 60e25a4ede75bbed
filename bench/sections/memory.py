"""Section 8: does workerd's memory level off or keep climbing?

Fresh instances of bare-py and the gateway (with `--memory-src`, each `--src` tree too) take
`memory_requests` small POSTs each, all at the same time, in load segments of a few seconds;
workerd's VmRSS is read after each segment. The slope (least squares, KiB per 1,000
requests) over the first and the last half tells a warming-up heap from a leak.

With `--memory-logs`, two more instances separate the runtime's handling of log output from
the gateway's own retention: the gateway with workerLogs on (each log line relayed to the
harness, as in `make dev` and the e2e tests), and bare-py plus a gateway-sized log line per
request (`bench/bare_py_log/`).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from bench.common import BENCH, log, slope
from bench.context import Bench
from bench.probes import mem_kib
from bench.render import fmt, table
from bench.sections import Section
from bench.targets import Target, Variant

CONNS = 8
LEVEL_KIB_PER_1K = 100.0  # last-half slope below this (0.1 KB/request) counts as levelled off


@dataclass
class Curve:
    name: str
    samples: list[tuple[int, int]] = field(default_factory=list)  # (requests so far, VmRSS KiB)
    # Python's side at the first and the last sample: (wasm heap bytes, tracked objects)
    python: list[tuple[int, int]] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    timed_out: bool = False  # stopped at the profile's time bound before the request goal

    def at(self, fraction: float) -> tuple[int, int] | None:
        """The first sample at or past `fraction` of the requests made."""
        if not self.samples:
            return None
        goal = self.samples[-1][0] * fraction
        return next(s for s in self.samples if s[0] >= goal)

    def slope_kib_per_1k(self, lo: float, hi: float) -> float | None:
        """Over the samples from the last one at or before `lo` of the requests to the first
        at or past `hi` (so a short run still has two points)."""
        if not self.samples:
            return None
        total = self.samples[-1][0]
        first = max(i for i, (r, _) in enumerate(self.samples) if r <= lo * total)
        last = min(i for i, (r, _) in enumerate(self.samples) if r >= hi * total)
        s = slope(self.samples[first : last + 1])
        return None if s is None else s * 1000


def _drive(bench: Bench, t: Target, goal: int, curve: Curve) -> None:
    seg = bench.profile.memory_segment_s
    deadline = time.monotonic() + bench.profile.memory_max_s
    done, reported = 0, 0
    curve.samples.append((0, mem_kib(t.workerd) or 0))
    _python_side(t, curve)
    while done < goal:
        if time.monotonic() > deadline:
            curve.timed_out = True
            break
        if done >= reported + goal / 4:
            reported = done
            log(f"memory {curve.name}: {done} requests, RSS {curve.samples[-1][1] / 1024:.1f} MiB")
        r = bench.gen.run(t.post_url, CONNS, seg, t.auth)
        done += r["requests"]
        curve.errors += r["socket_errors"] + r["status_errors"]
        curve.seconds += r["duration_us"] / 1e6
        curve.samples.append((done, mem_kib(t.workerd) or 0))
        if r["requests"] == 0:
            break  # a dead target would never reach the goal
    _python_side(t, curve)


def _python_side(t: Target, curve: Curve) -> None:
    """Pyodide's wasm heap and Python's tracked objects, from the harness adapter: if both
    stay flat while RSS moves, what moves is the runtime's memory, not the Worker's."""
    try:
        with urllib.request.urlopen(t.url + "/__harness/heap", timeout=30) as r:
            d = json.loads(r.read())
        curve.python.append((int(d["wasm_heap_bytes"]), int(d["python_objects"])))
    except (OSError, ValueError, KeyError) as exc:
        log(f"memory {curve.name}: no heap probe ({exc})")


def _variants(bench: Bench) -> list[tuple[Variant, bool, str]]:
    """(variant, workerLogs, label) for each instance to measure."""
    names = ["bare-py", "gateway"]
    if bench.options.memory_src:
        names += [n for n in bench.variants if n.startswith("gateway[")]
    out = [(bench.variants[n], False, n) for n in names]
    if bench.options.memory_logs:
        gw = bench.variants["gateway"]
        out.append((gw, True, "gateway (workerLogs on)"))
        bp = bench.variants["bare-py"]
        logged = Variant("bare-py+log", BENCH / "bare_py_log", bp.path, bp.auth, bp.bindings)
        out.append((logged, False, "bare-py + log line"))
    return out


def run(bench: Bench) -> list[Curve]:
    goal = bench.options.memory_requests or bench.profile.memory_requests
    started: list[Target] = []
    curves: list[Curve] = []
    try:
        for variant, logs, label in _variants(bench):
            started.append(variant.start(worker_logs=logs, name=label))
            curves.append(Curve(label))
        log(f"memory: {goal} requests each on {', '.join(c.name for c in curves)}, concurrently")
        threads = [
            threading.Thread(target=_drive, args=(bench, t, goal, c), daemon=True)
            for t, c in zip(started, curves, strict=True)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        for t in started:
            t.stop()
    for c in curves:
        last = c.samples[-1]
        log(f"memory {c.name}: {last[0]} requests, RSS {c.samples[0][1]} -> {last[1]} KiB")
    return curves


def _python_cell(c: Curve) -> str:
    if len(c.python) < 2:
        return "n/a"
    (h0, o0), (h1, o1) = c.python[0], c.python[-1]
    return f"{h0 / 2**20:.0f} → {h1 / 2**20:.0f}, {o0:,} → {o1:,}"


def _python_flat(c: Curve) -> bool:
    """The wasm heap did not grow and tracked objects stayed within 5% (+1,000)."""
    if len(c.python) < 2:
        return False
    (h0, o0), (h1, o1) = c.python[0], c.python[-1]
    return h1 == h0 and o1 <= o0 * 1.05 + 1000


def _mib(sample: tuple[int, int] | None) -> str:
    return "n/a" if sample is None else f"{sample[1] / 1024:.1f}"


def render(curves: list[Curve], bench: Bench) -> list[str]:
    rows = []
    for c in curves:
        end = c.samples[-1]
        first, last = c.slope_kib_per_1k(0.0, 0.5), c.slope_kib_per_1k(0.5, 1.0)
        verdict = (
            "n/a"
            if last is None
            else ("levels off" if last < LEVEL_KIB_PER_1K else "keeps climbing")
        )
        grown = (end[1] - c.samples[0][1]) / end[0] if end[0] else None
        py = _python_cell(c)
        if verdict == "keeps climbing" and _python_flat(c):
            verdict = "keeps climbing (runtime side: Python flat)"
        rows.append(
            [
                c.name,
                f"{end[0]} (time bound)" if c.timed_out else end[0],
                c.errors,
                _mib(c.samples[0]),
                _mib(c.at(0.1)),
                _mib(c.at(0.5)),
                _mib(end),
                fmt(None if grown is None else grown * 1024, 0),
                fmt(first, 1),
                fmt(last, 1),
                py,
                verdict,
            ]
        )
    header = [
        "target",
        "requests",
        "errors",
        "RSS start MiB",
        "after 10%",
        "after 50%",
        "end",
        "growth B/req (overall)",
        "slope 1st half KiB/1k req",
        "slope 2nd half KiB/1k req",
        "Python: wasm heap MiB, objects (start → end)",
        f"verdict (2nd half < {LEVEL_KIB_PER_1K:g})",
    ]
    samples = "; ".join(
        f"{c.name}: "
        + " ".join(
            f"{r // 1000}k={kib / 1024:.0f}" for r, kib in c.samples[:: max(1, len(c.samples) // 8)]
        )
        for c in curves
    )
    return [
        *table(header, rows, range(1, 10)),
        f"Fresh instances, driven concurrently ({CONNS} keep-alive connections each, "
        f"{bench.profile.memory_segment_s} s segments, at most {bench.profile.memory_max_s} s), "
        "workerd VmRSS after each segment; the Python side (Pyodide's WebAssembly heap, "
        "objects Python's GC tracks) from the harness's `/__harness/heap` before and after. "
        f"Samples (requests=MiB): {samples}.",
        "",
    ]


SECTION = Section(
    8,
    "memory",
    "Memory (workerd RSS over many requests)",
    run,
    lambda r, b: [SECTION.heading, "", *render(r, b)],
    needs=(),  # starts its own fresh instances
)
