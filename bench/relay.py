"""What relaying an event stream costs, per way of relaying it: workerd CPU per stream.

    .venv/bin/python -m bench.relay [--events 200,1000] [--conc 8] [--bursts 3] [--ops a,b]

Starts the simulated fleet (node 1 in `sse` mode, events 10 ms apart), `bench/relay_worker`
(one relay per `?op=`) and the bare JS pass-through, in the same offline workerd as the
gateway. Bursts of `--conc` concurrent streams per op, interleaved; the table gives workerd's
CPU (utime+stime, /proc) per stream and per event, median of the bursts. Then each op is sent
a stream that the node resets mid-way, and the table says how the client saw it end.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import statistics
import sys

from bench.client import stream
from bench.common import BENCH
from bench.probes import cpu_seconds
from bench.targets import Target, Variant, start_js_worker
from sim.fleet import FleetProcess

WORKER = BENCH / "relay_worker"
INTERVAL_S = 0.01
STREAM_BODY = b'{"model":"reasoning","prompt":"hello","max_tokens":50,"stream":true}'


def op_names() -> list[str]:
    tree = ast.parse((WORKER / "entry.py").read_text())
    return [
        n.name[3:]
        for n in tree.body
        if isinstance(n, ast.AsyncFunctionDef) and n.name.startswith("op_")
    ]


def _url(target: Target, op: str | None) -> str:
    """`op` may carry more of the query (`identity_idle&tick=0.05`)."""
    return target.post_url if op is None else f"{target.url}/?op={op}"


async def _burst(url: str, n: int):
    return await asyncio.gather(*(stream(url, auth=False, timeout=60) for _ in range(n)))


def burst_cpu(target: Target, op: str | None, conc: int, events: int) -> float | None:
    """CPU seconds per stream over one burst of `conc` streams (None if any was incomplete)."""
    c0 = cpu_seconds(target.workerd)
    streams = asyncio.run(_burst(_url(target, op), conc))
    c1 = cpu_seconds(target.workerd)
    ok = all(s.status == 200 and s.ending == "done" and s.events == events for s in streams)
    if not ok or c0 is None or c1 is None:
        print(f"  {op or 'bare-js'}: {[(s.status, s.ending, s.events) for s in streams]}")
        return None
    return (c1 - c0) / conc


def main(argv: list[str] | None = None) -> int:
    known = op_names()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", default="200,1000")
    ap.add_argument("--conc", type=int, default=8)
    ap.add_argument("--interval", type=float, default=INTERVAL_S, help="seconds between events")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--ops", default=",".join(known))
    ap.add_argument("--bodies", default="", help="body reads to price instead (comma list, or all)")
    ap.add_argument("--body-sizes", default="1048576,10485760")
    ap.add_argument("--body-reps", type=int, default=15)
    ap.add_argument("--stall", type=float, default=0.0, help="idle_s: run the stall check")
    args = ap.parse_args(argv)
    if args.stall:
        stalls(args.ops.split(","), args.stall)
        return 0
    if args.bodies:
        names = body_names() if args.bodies == "all" else args.bodies.split(",")
        names = ["stream", *[n for n in names if n != "stream"]]
        sizes = [int(x) for x in args.body_sizes.split(",")]
        bodies(sizes, args.body_reps, names)
        return 0
    ops = [o for o in args.ops.split(",") if o]
    sizes = [int(x) for x in args.events.split(",") if x]
    with FleetProcess() as fleet:
        fleet.set(1, "sse", events=sizes[0], interval=INTERVAL_S)
        js_target = start_js_worker(fleet.url(1))
        py = Variant("relay", WORKER, "/?op=native", False, {"UPSTREAM": fleet.url(1)}).start()
        try:
            names: list[str | None] = [None, *ops]
            rows = []
            for events in sizes:
                fleet.set(1, "sse", events=events, interval=args.interval)
                samples: dict[str | None, list[float]] = {n: [] for n in names}
                for b in range(args.bursts):
                    for op in names[b % len(names) :] + names[: b % len(names)]:
                        t = js_target if op is None else py
                        cpu = burst_cpu(t, op, args.conc, events)
                        if cpu is not None:
                            samples[op].append(cpu)
                for op in names:
                    s = samples[op]
                    ms = statistics.median(s) * 1000 if s else float("nan")
                    rows.append((op or "bare-js (native)", events, ms, ms * 1000 / events, len(s)))
            fleet.set(1, "stream_reset", after=5, interval=INTERVAL_S)
            endings = {}
            for op in names:
                t = js_target if op is None else py
                s = asyncio.run(
                    stream(_url(t, op), auth=False, method="POST", body=STREAM_BODY, timeout=10)
                )
                endings[op or "bare-js (native)"] = f"{s.ending} ({s.events} events)"
        finally:
            py.stop()
            js_target.stop()
    print(
        f"workerd CPU per stream, bursts of {args.conc} concurrent streams, events "
        f"{args.interval * 1000:g} ms apart, median of {args.bursts} bursts"
    )
    print()
    print("| relay | events | CPU ms/stream | CPU µs/event | bursts |")
    print("|---|---:|---:|---:|---:|")
    for name, events, ms, us, n in rows:
        print(f"| {name} | {events} | {ms:.1f} | {us:.1f} | {n} |")
    print()
    print("| relay | node reset after 5 events: the client saw |")
    print("|---|---|")
    for name, e in endings.items():
        print(f"| {name} | {e} |")
    return 0


def stalls(ops: list[str], idle_s: float) -> None:
    """How each op ends a stream whose node stalls (1 event, then nothing for 4x idle_s),
    and whether it leaves a slow but live one (an event every idle_s/2) alone."""
    import time

    with FleetProcess() as fleet:
        fleet.set(1, "sse", events=3, interval=0.01)
        py = Variant("relay", WORKER, "/?op=native", False, {"UPSTREAM": fleet.url(1)}).start()
        try:
            print("| relay | stalled node: ending, events, seconds | live node: ending, events |")
            print("|---|---|---|")
            for op in ops:
                url = f"{py.url}/?op={op}&idle={idle_s:g}"
                fleet.set(1, "stream_reset", after=2, interval=4 * idle_s)
                t0 = time.monotonic()
                s = asyncio.run(stream(url, auth=False, method="POST", body=STREAM_BODY))
                secs = time.monotonic() - t0
                fleet.set(1, "sse", events=8, interval=idle_s / 2)
                live = asyncio.run(stream(url, auth=False))
                print(
                    f"| {op} | {s.ending} {s.error_type or ''}, {s.events}, {secs:.2f} | "
                    f"{live.ending}, {live.events} |"
                )
        finally:
            py.stop()


def body_names() -> list[str]:
    tree = ast.parse((WORKER / "entry.py").read_text())
    return [
        n.name[5:]
        for n in tree.body
        if isinstance(n, ast.AsyncFunctionDef) and n.name.startswith("body_")
    ]


def bodies(sizes: list[int], reps: int, names: list[str]) -> None:
    """p50 latency and workerd CPU per request of each way of reading a big body."""
    from bench.client import request
    from bench.probes import mem_kib
    from bench.sections.size import _completion_of

    with FleetProcess() as fleet:
        py = Variant("relay", WORKER, "/?body=stream", False, {"UPSTREAM": fleet.url(1)}).start()
        try:
            print("| read | body | p50 ms | x stream | CPU ms/req | CPU ms/MiB | peak RSS MiB |")
            print("|---|---|---:|---:|---:|---:|---:|")
            for size in sizes:
                body = _completion_of(size)
                lat: dict[str, list[float]] = {n: [] for n in names}
                cpu: dict[str, list[float]] = {n: [] for n in names}
                for r in range(reps):
                    for n in names[r % len(names) :] + names[: r % len(names)]:
                        c0 = cpu_seconds(py.workerd)
                        st, _, _, secs = request(f"{py.url}/?body={n}", "POST", body, False, 120)
                        c1 = cpu_seconds(py.workerd)
                        if st != 200:
                            print(f"  {n} {size}: status {st}")
                            continue
                        lat[n].append(secs * 1000)
                        cpu[n].append((c1 - c0) * 1000)
                base = statistics.median(lat["stream"])
                for n in names:
                    p50 = statistics.median(lat[n])
                    c = statistics.mean(cpu[n])
                    mib = size / 2**20
                    hwm = (mem_kib(py.workerd, "VmHWM") or 0) / 1024
                    print(
                        f"| {n} | {mib:g} MiB | {p50:.1f} | {p50 / base:.2f} | {c:.1f} | "
                        f"{c / mib:.2f} | {hwm:.0f} |"
                    )
        finally:
            py.stop()


if __name__ == "__main__":
    sys.exit(main())
