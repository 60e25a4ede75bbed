"""Section 9: a bounded chaos run — load on the gateway while nodes flap.

A calm phase, then a chaos phase in which a seeded random flapper switches nodes between
healthy and a failure mode through the fleet's control API (refuse, hang, 503, and a mid-stream
cut when the simulator offers one) every 0.2-1 s. Clients keep `conns` connections busy: most
requests are small POSTs over keep-alive connections, every fifth a streamed chat completion,
spread over all roles. Every exchange is classified:

  ok          2xx with the whole body (a stream with its `[DONE]`)
  non-2xx     by status and the JSON error `type` (the gateway's answers are JSON)
  error event a stream that ended with an explicit error event (a loud failure, not lost)
  lost        no answer in time, a connection error before the head, or a truncated body
              (cut, or a stream that ended cleanly without `[DONE]`)

Bounded in time (the profile's seconds, `--chaos-seconds`) and loopback only. A stream that
the node cuts (`stream_reset`, `stream_eof`) counts as lost unless the client is told: with
the gateway's error event it is an `error event`, a loud failure.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.client import Stream, read_body, read_head, request_bytes, split, stream
from bench.common import POST_PATH, log, pct
from bench.context import Bench
from bench.render import fmt, table
from bench.sections import Section
from bench.targets import Target
from sim.fleet import FleetProcess
from sim.node import parse_mode

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
ROLES = ("reasoning", "code", "vision", "batch")
CLIENT_TIMEOUT_S = 15.0
STREAM_EVERY = 5
CHAT = {"stream": True, "messages": [{"role": "user", "content": "hi"}]}
POST = {"prompt": "hello", "max_tokens": 8}
# Failure modes to flap between; a mode the simulator does not know (yet) is skipped.
FAILURES: tuple[tuple[str, dict], ...] = (
    ("refuse", {}),
    ("hang", {}),
    ("status", {"status": 503}),
    ("stream_reset", {"after": 2}),  # answers in flight fail mid-body, probes still pass
    ("stream_eof", {"after": 2}),
    ("body_cut", {"size": 4096}),
)


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)  # successful small POSTs

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def count(self, prefix: str) -> int:
        return sum(v for k, v in self.outcomes.items() if k.startswith(prefix))


def available_failures() -> list[tuple[str, dict]]:
    out = []
    for mode, params in FAILURES:
        try:
            parse_mode(mode, params)
        except ValueError:
            continue
        out.append((mode, params))
    return out


def _reason(status: int, body: bytes) -> str:
    try:
        kind = json.loads(body)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        kind = "non-JSON"
    return f"{status} {kind}"


def _stream_outcome(s: Stream) -> str:
    if s.status == 200 and s.ending == "done":
        return "ok (stream)"
    if s.ending == "error_event":
        return f"stream error event {s.error_type}"
    if s.status is not None and s.status >= 300 and s.ending == "clean_eof":
        return _reason(s.status, s.body)
    if s.status is None:
        return "lost: no answer" if s.ending == "timeout" else "lost: connection error"
    if s.ending == "clean_eof":
        return "lost: stream ended cleanly without [DONE]"
    return f"lost: stream {s.ending}"


async def _post_loop(t: Target, phase: Phase, end: float, rng: random.Random) -> None:
    host, port, _ = split(t.url)
    conn: Conn | None = None
    n = 0
    while time.perf_counter() < end:
        n += 1
        role = rng.choice(ROLES)
        if n % STREAM_EVERY == 0:
            url = f"{t.url}/api/heavy/{role}/v1/chat/completions"
            body = json.dumps(CHAT | {"model": role}).encode()
            s = await stream(url, auth=True, method="POST", body=body, timeout=CLIENT_TIMEOUT_S)
            phase.outcomes[_stream_outcome(s)] += 1
            continue
        path = f"/api/heavy/{role}{POST_PATH}"
        body = json.dumps(POST | {"model": role}).encode()
        outcome, conn, ms = await _post(host, port, path, body, conn)
        phase.outcomes[outcome] += 1
        if ms is not None:
            phase.latency_ms.append(ms)
    if conn is not None:
        conn[1].close()


async def _post(
    host: str, port: int, path: str, body: bytes, conn: Conn | None
) -> tuple[str, Conn | None, float | None]:
    """One small POST on a keep-alive connection (a new one when `conn` is None): its outcome,
    the connection to reuse (None when it is gone) and the latency of a 2xx."""
    reused = conn is not None
    t0 = time.perf_counter()
    try:
        if conn is None:
            conn = await asyncio.wait_for(asyncio.open_connection(host, port), CLIENT_TIMEOUT_S)
        reader, writer = conn
        writer.write(request_bytes(host, port, path, "POST", body, True, False))
        status, headers = await asyncio.wait_for(read_head(reader), CLIENT_TIMEOUT_S)
    except TimeoutError:
        outcome = "lost: no answer"
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        outcome = "lost: reused connection reset" if reused else "lost: connection error"
    else:
        try:
            data = await asyncio.wait_for(read_body(reader, headers), CLIENT_TIMEOUT_S)
        except TimeoutError:
            outcome = "lost: truncated body (stalled)"
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            outcome = "lost: truncated body"
        else:
            if headers.get("connection", "").lower() == "close":
                writer.close()
                conn = None
            if 200 <= status < 300:
                return "ok", conn, (time.perf_counter() - t0) * 1000
            return _reason(status, data), conn, None
    if conn is not None:
        conn[1].close()
    return outcome, None, None


def _load(t: Target, phase: Phase, seconds: float, conns: int, seed: int) -> None:
    end = time.perf_counter() + seconds

    async def main() -> None:
        await asyncio.gather(
            *(_post_loop(t, phase, end, random.Random(seed * 1000 + i)) for i in range(conns))
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    phase.seconds = time.perf_counter() - t0


def _flap(
    fleet: FleetProcess, stop: threading.Event, rng: random.Random, flaps: Counter[str]
) -> None:
    failures = available_failures()
    bad: set[int] = set()
    nodes = sorted(fleet.urls)
    while not stop.wait(rng.uniform(0.2, 1.0)):
        n = rng.choice(nodes)
        if n in bad and rng.random() < 0.6:
            fleet.set(n, "healthy")
            bad.discard(n)
            flaps["healthy"] += 1
        else:
            mode, params = rng.choice(failures)
            fleet.set(n, mode, **params)
            bad.add(n)
            flaps[mode if mode != "status" else f"status {params['status']}"] += 1


def run(bench: Bench) -> dict:
    gw = bench.target("gateway")
    assert gw.server is not None
    prof, opts = bench.profile, bench.options
    chaos_s = opts.chaos_s if opts.chaos_s is not None else prof.chaos_s
    bench.fleet.reset()
    gw.server.reset()
    calm, chaos = Phase("calm"), Phase("chaos")
    flaps: Counter[str] = Counter()
    log(f"chaos: {prof.chaos_calm_s} s calm, then {chaos_s} s flapping, {opts.chaos_conns} clients")
    _load(gw, calm, prof.chaos_calm_s, opts.chaos_conns, opts.chaos_seed)
    stop = threading.Event()
    flapper = threading.Thread(
        target=_flap, args=(bench.fleet, stop, random.Random(opts.chaos_seed), flaps), daemon=True
    )
    flapper.start()
    try:
        _load(gw, chaos, chaos_s, opts.chaos_conns, opts.chaos_seed + 1)
    finally:
        stop.set()
        flapper.join(timeout=30)
        bench.fleet.reset()
        gw.server.reset()
    for p in (calm, chaos):
        log(f"chaos {p.name}: {p.requests} requests, lost {p.count('lost')}, {dict(p.outcomes)}")
    return {"phases": [calm, chaos], "flaps": flaps, "modes": [m for m, _ in available_failures()]}


def render(res: dict, bench: Bench) -> list[str]:
    phases: list[Phase] = res["phases"]
    rows = []
    for p in phases:
        ok = p.outcomes["ok"] + p.outcomes["ok (stream)"]
        non2xx = p.requests - ok - p.count("lost") - p.count("stream error event")
        rows.append(
            [
                p.name,
                fmt(p.seconds, 0),
                p.requests,
                ok,
                p.count("lost"),
                non2xx,
                p.count("stream error event"),
                fmt(pct(p.latency_ms, 50)),
                fmt(pct(p.latency_ms, 99)),
            ]
        )
    header = [
        "phase",
        "s",
        "requests",
        "ok",
        "lost",
        "non-2xx",
        "stream error events",
        "p50 ms (ok POSTs)",
        "p99 ms (ok POSTs)",
    ]
    lines = table(header, rows, {1, 2, 3, 4, 5, 6, 7, 8})
    reasons = sorted({k for p in phases for k in p.outcomes})
    lines += table(
        ["outcome", *(p.name for p in phases)],
        [[k, *(p.outcomes.get(k, 0) for p in phases)] for k in reasons],
        range(1, len(phases) + 1),
    )
    flaps = ", ".join(f"{k} {v}" for k, v in sorted(res["flaps"].items()))
    lines += [
        f"Gateway with ATTEMPT_TIMEOUT_S = 1 over 8 simulated nodes; {bench.options.chaos_conns} "
        f"clients, every {STREAM_EVERY}th request a streamed chat completion; roles "
        f"{', '.join(ROLES)}. Node flaps (seeded, {bench.options.chaos_seed}): {flaps or 'none'}; "
        f"failure modes used: {', '.join(res['modes'])}. Lost = no answer within "
        f"{CLIENT_TIMEOUT_S:g} s, connection error, or a truncated body / stream without `[DONE]`.",
        "",
    ]
    return lines


SECTION = Section(
    9,
    "chaos",
    "Chaos (load on the gateway while nodes flap)",
    run,
    lambda r, b: [SECTION.heading, "", *render(r, b)],
    needs=("gateway",),
)
