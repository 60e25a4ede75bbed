"""What the gateway costs, measured side by side in one run (see bench/README.md).

    .venv/bin/python -m bench.run [--quick | --smoke] [--out bench/results.md]
                                  [--sections 1,2,...|all] [--src LABEL=DIR ...] [--no-install]

Targets, all in the same offline workerd the end-to-end tests use, in front of one simulated
fleet (`sim.fleet.FleetProcess`, its own process so it never shares a GIL with the client):
direct (the node), bare-js, bare-py, gateway (`src/`) and gateway[LABEL] per `--src`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from bench.common import POST_PATH, PROFILES, log
from bench.context import Bench, Options
from bench.loadgen import LoadGen
from bench.render import document, machine_facts
from bench.sections import Section, all_sections, select
from bench.targets import Target, Variant, python_variants, start_js_worker
from sim.fleet import FleetProcess


def _parser() -> argparse.ArgumentParser:
    keys = ", ".join(f"{s.number}={s.key}" for s in all_sections())
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="short runs (a few minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny runs: does everything work?")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="another gateway source folder, benchmarked as gateway[LABEL]",
    )
    ap.add_argument("--sections", default="all", help=f"numbers or keys: {keys}")
    ap.add_argument("--reps", type=int, default=None, help="override the load repetitions")
    ap.add_argument("--sse-events", type=int, default=None, help="streaming: events a stream")
    ap.add_argument("--seconds", type=int, default=None, help="override seconds per load run")
    ap.add_argument("--memory-requests", type=int, default=None, help="requests per target")
    ap.add_argument(
        "--memory-logs",
        action="store_true",
        help="memory: also gateway with workerLogs on and bare-py with a log line",
    )
    ap.add_argument(
        "--memory-src", action="store_true", help="memory: also each --src gateway tree"
    )
    ap.add_argument("--chaos-seconds", type=float, default=None, help="length of the chaos phase")
    ap.add_argument("--chaos-conns", type=int, default=8)
    ap.add_argument("--chaos-seed", type=int, default=1)
    ap.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    ap.add_argument("--asyncio", action="store_true", help="use the asyncio client, not wrk")
    return ap


def _start_targets(
    fleet: FleetProcess, variants: dict[str, Variant], needs: set[str]
) -> list[Target]:
    targets: list[Target] = []
    try:
        if "direct" in needs:
            targets.append(Target("direct", fleet.url(1), POST_PATH))
        if "bare-js" in needs:
            targets.append(start_js_worker(fleet.url(1)))
        for name, variant in variants.items():
            if name in needs or (name.startswith("gateway") and "gateway" in needs):
                targets.append(variant.start())
    except BaseException:
        for t in targets:
            t.stop()
        raise
    for t in targets:
        if t.cold_start_s:
            log(f"{t.name} up in {t.cold_start_s[0]:.2f} s (workerd pid {t.workerd})")
    return targets


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        sections: list[Section] = select(args.sections)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    prof = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.reps or args.seconds:
        prof = dataclasses.replace(
            prof, reps=args.reps or prof.reps, load_s=args.seconds or prof.load_s
        )
    if args.sse_events:
        prof = dataclasses.replace(prof, sse_events=args.sse_events)
    options = Options(
        chaos_s=args.chaos_seconds,
        chaos_conns=args.chaos_conns,
        chaos_seed=args.chaos_seed,
        memory_requests=args.memory_requests,
        memory_logs=args.memory_logs,
        memory_src=args.memory_src,
    )
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    gen = LoadGen(install=not args.no_install, use_wrk=not args.asyncio)
    log(
        f"profile {prof.name}; load generator: {gen.name}; sections "
        + ", ".join(s.key for s in sections)
    )

    body: list[str] = []
    with FleetProcess() as fleet:
        variants = python_variants(fleet, args.src)
        needs = {n for s in sections for n in s.needs}
        targets = _start_targets(fleet, variants, needs)
        bench = Bench(prof, gen, fleet, targets, variants, options)
        try:
            results = [(s, s.run(bench)) for s in sections]
            for s, r in results:
                body += s.render(r, bench)
        finally:
            for t in targets:
                try:
                    t.stop()
                except Exception as exc:  # keep cleaning up
                    log(f"stop {t.name}: {exc}")
    machine = machine_facts(gen.name)
    machine["bench wall time"] = f"{time.monotonic() - started:.0f} s"
    doc = document(command, prof, machine, body)
    print(doc, end="")
    if args.out:
        Path(args.out).write_text(doc)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
