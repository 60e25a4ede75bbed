"""What every benchmark module shares: fixed request shapes, run profiles, small statistics."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
API_KEY = "bench-key-0123456789"
NODE_TOKEN = "bench-node-token"
POST_PATH = "/v1/completions"
STREAM_PATH = "/v1/completions"  # streams (stamped events) while the node is in `sse` mode
ROLE = "reasoning"  # default routes: nodes 1 and 2, fallback 1, 2
# Clients name the role as the model; every node answers to the roles it may serve.
SMALL_BODY = '{"model":"reasoning","prompt":"hello","max_tokens":8}'


@dataclass(frozen=True, kw_only=True)
class Profile:
    """How long and how often each section measures; `full` is what `make bench` runs."""

    name: str
    load_s: int  # seconds per load run
    reps: int  # interleaved repetitions of the load runs
    sse_events: int  # events per measured stream (10 ms apart)
    sse_reps: int  # single streams per target (latency)
    stream_conc: int  # concurrent streams per burst (CPU per stream)
    stream_bursts: int
    failover_reps: int
    steady_s: int
    size_reps: int
    cold_reps: int
    memory_requests: int  # per target
    memory_segment_s: int  # one RSS sample per load segment
    memory_max_s: int  # ... but no longer than this (a leaking Worker slows down as it grows)
    chaos_calm_s: int
    chaos_s: int
    sizes: tuple[int, ...] = (1 << 20, 10 << 20)


PROFILES = {
    "full": Profile(
        name="full",
        load_s=4,
        reps=3,
        sse_events=200,
        sse_reps=3,
        stream_conc=16,
        stream_bursts=2,
        failover_reps=3,
        steady_s=3,
        size_reps=5,
        cold_reps=3,
        memory_requests=200_000,
        memory_segment_s=6,
        memory_max_s=330,
        chaos_calm_s=10,
        chaos_s=60,
    ),
    "quick": Profile(
        name="quick",
        load_s=2,
        reps=1,
        sse_events=200,
        sse_reps=1,
        stream_conc=8,
        stream_bursts=1,
        failover_reps=1,
        steady_s=2,
        size_reps=2,
        cold_reps=1,
        memory_requests=20_000,
        memory_segment_s=3,
        memory_max_s=120,
        chaos_calm_s=5,
        chaos_s=15,
    ),
    "smoke": Profile(
        name="smoke",
        load_s=1,
        reps=1,
        sse_events=20,
        sse_reps=1,
        stream_conc=4,
        stream_bursts=1,
        failover_reps=1,
        steady_s=1,
        size_reps=1,
        cold_reps=1,
        memory_requests=1500,
        memory_segment_s=1,
        memory_max_s=60,
        chaos_calm_s=2,
        chaos_s=4,
    ),
}


def median(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def pct(xs: Iterable[float | None], q: float) -> float | None:
    """The q-th percentile (nearest rank), None for no data."""
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return None
    k = min(len(vals) - 1, max(0, round(q / 100 * (len(vals) - 1))))
    return vals[k]


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope dy/dx of (x, y) points; None with fewer than two distinct x."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
