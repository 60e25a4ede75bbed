"""What a crossing costs: workerd CPU per request of single runtime operations.

    .venv/bin/python -m bench.ops [--requests N] [--reps R] [--ops a,b,c]

Starts `bench/ops_worker` in the same offline workerd as the gateway (harness adapter, no
logs relayed) and sends it N keep-alive GETs per operation, `?op=NAME`, each doing that
operation once; operations are interleaved over R repetitions. The table gives workerd's
CPU (utime+stime from /proc) per request minus that of `noop`, median of the repetitions.
The clocks inside an isolate stand still while it computes, so this outside view is the
only profiler there is (bench/README.md).
"""

from __future__ import annotations

import argparse
import ast
import http.client
import statistics
import sys
import time
from urllib.parse import urlsplit

from bench.common import BENCH
from bench.probes import cpu_seconds
from bench.targets import Target, Variant

WORKER = BENCH / "ops_worker"


def op_names() -> list[str]:
    """The Worker's operations, read from its source (it imports `js`: not importable here)."""
    tree = ast.parse((WORKER / "entry.py").read_text())
    return [
        n.name[3:]
        for n in tree.body
        if isinstance(n, ast.AsyncFunctionDef) and n.name.startswith("op_")
    ]


def measure(target: Target, op: str, requests: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per request for `requests` requests of `op`."""
    parts = urlsplit(target.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        cpu0, wall0 = cpu_seconds(target.workerd), time.monotonic()
        for _ in range(requests):
            conn.request("GET", f"/?op={op}")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"op {op}: status {resp.status}")
        cpu1, wall1 = cpu_seconds(target.workerd), time.monotonic()
    finally:
        conn.close()
    assert cpu0 is not None and cpu1 is not None
    return (cpu1 - cpu0) / requests * 1e6, (wall1 - wall0) / requests * 1e6


def run(ops: list[str], requests: int, reps: int) -> dict[str, tuple[float, float]]:
    """Median (CPU µs, wall µs) per request of each op, `noop` included."""
    names = ["noop", *[o for o in ops if o != "noop"]]
    target = Variant("ops", WORKER, "/", False, {}).start()
    try:
        for op in names:  # warm every path once
            measure(target, op, 20)
        samples: dict[str, list[tuple[float, float]]] = {op: [] for op in names}
        for rep in range(reps):
            for op in names[rep % len(names) :] + names[: rep % len(names)]:
                samples[op].append(measure(target, op, requests))
    finally:
        target.stop()
    return {
        op: (statistics.median(c for c, _ in s), statistics.median(w for _, w in s))
        for op, s in samples.items()
    }


def render(result: dict[str, tuple[float, float]], requests: int, reps: int) -> str:
    base_cpu, base_wall = result["noop"]
    lines = [
        f"workerd CPU per request over {requests} requests, median of {reps} repetitions; "
        f"noop = {base_cpu:.0f} µs CPU, {base_wall:.0f} µs wall (the floor of any request).",
        "",
        "| operation | CPU µs over noop | wall µs over noop |",
        "|---|---:|---:|",
    ]
    for op, (cpu, wall) in result.items():
        if op != "noop":
            lines.append(f"| {op} | {cpu - base_cpu:.0f} | {wall - base_wall:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    known = op_names()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ops", default=",".join(known))
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(known))
    if unknown:
        ap.error(f"unknown ops {unknown}; known: {', '.join(known)}")
    print(render(run(ops, args.requests, args.reps), args.requests, args.reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
