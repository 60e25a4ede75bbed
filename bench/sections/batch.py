"""Sections 10 and 11: the Batch API on the simulated batch pair (nodes 7-8 with the capacity
model `sim.fleet.BATCH_CAPACITY`, their real `heady_node.batch_worker`s owned by the fleet).

10 `batch` — throughput. The same lines (chat completions of a fixed length: vLLM's
   `ignore_eos` with `max_tokens`) run two ways on the same two engines:
   - direct: a client sends them straight to nodes 7 and 8 from one shared queue (each node
     pulls the next line as soon as one of its connections is free), at a few concurrencies
     around each engine's max_num_seqs; the best is the reference;
   - batch: `files.create` + `batches.create` through the gateway with the openai SDK, the
     nodes' workers lease shards, `batches.retrieve` polled every 0.25 s until `completed`.
   Rate = lines / seconds from the first line sent (direct) or from `batches.create` (batch)
   to the last answer (direct) or the poll that sees `completed` (batch). The workers are
   (re)started at `batches.create`: an idle worker polls for work at most every 30 s, a wait
   that belongs to no throughput. Also: workerd CPU over the batch (control plane only: the
   lines never pass through it) per line, the Worker requests it served by route, and the p50
   of small interactive requests to another role's pair (reasoning, nodes 1-2) through the
   same gateway without and during a batch (BATCH_HELPERS off: nodes 1-2 run no worker).
11 `batch-chaos` — the same batch while nodes die: several times, a node of the pair is
   killed together with its worker (SIGKILL, the node refusing connections) while it runs a
   shard, then revived a few seconds later. The batch must complete with every custom_id
   exactly once in output + error; lines that ran more than once on an engine are counted
   from the simulator's records (the content of each engine request names its line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from bench.common import API_KEY, NODE_TOKEN, SMALL_BODY, log, median
from bench.context import Bench
from bench.probes import cpu_seconds, find_workerd
from bench.render import fmt, met, table
from bench.sections import Section
from harness.bindings import fleet_env
from harness.gateway import Gateway, build_config
from sim.fleet import BATCH_CAPACITY, BATCH_NODES, FleetProcess

SECRET = "bench-node-secret-2c9e41"
CHAT = "/v1/chat/completions"
INTERACTIVE_PATH = "/api/heavy/reasoning/v1/completions"
DONE = ("completed", "failed", "expired", "cancelled")
_LEASE_ID = re.compile(r"/leases/[^/]+/")


@dataclass(frozen=True)
class BatchProfile:
    lines: int
    max_tokens: int  # tokens each answer generates (ignore_eos)
    levels: tuple[float, ...]  # direct concurrency per node, as multiples of its max_num_seqs
    interactive_s: float
    kills: int
    down_s: float  # how long a killed node stays dead
    lease_s: float  # chaos: BATCH_LEASE_S (a dead node's shard is free again after this)


# 256 generated tokens a line: 12.8 s on node 7, 10.2 s on node 8, so the pair's capacity is
# ~17.5 lines/s, which the client, the simulator and the workers can drive on a loaded 2-core
# machine (at 64 tokens, ~70 lines/s, the machine's CPU and not the engines set the pace).
PROFILES = {
    "full": BatchProfile(2000, 256, (1.0, 1.5), 8.0, 4, 3.0, 6.0),
    "quick": BatchProfile(2000, 256, (1.0,), 4.0, 3, 3.0, 6.0),
    # smoke: 64 tokens (3.2 s a line on node 7) so the batch still runs when the kill comes,
    # now that the workers start at the engines' batch size and finish 8-token lines at once.
    "smoke": BatchProfile(200, 64, (1.0,), 1.0, 1, 1.0, 3.0),
}


def lines_jsonl(n: int, max_tokens: int) -> bytes:
    """`n` chat requests for the `batch` role; each prompt names its line (`line-<i>`), so an
    engine request can be traced back to its custom_id."""
    out = []
    for i in range(n):
        body = {
            "model": "batch",
            "messages": [{"role": "user", "content": f"line-{i}"}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        line = {"custom_id": f"line-{i}", "method": "POST", "url": CHAT, "body": body}
        out.append(json.dumps(line, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


class Stack:
    """A fleet with the batch pair's capacity model, a gateway with NODE_SECRET and the batch
    settings, the workers beside 7-8. Its own, so the other sections' fleet stays as it is."""

    def __init__(self, *, lease_s: float, heartbeat_s: float, history: int) -> None:
        self.logs = tempfile.mkdtemp(prefix="heady-bench-workers-")
        self.fleet = FleetProcess(api_key=NODE_TOKEN, capacity=BATCH_CAPACITY, history=history)
        self.fleet.start()
        try:
            bindings = fleet_env(
                self.fleet,
                node_token=NODE_TOKEN,
                api_keys=API_KEY,
                node_secret=SECRET,
                BATCH_LEASE_S=f"{lease_s:g}",
                BATCH_HEARTBEAT_S=f"{heartbeat_s:g}",
            )
            self.gw = Gateway(build_config(bindings=bindings)).start(timeout=180)
            assert self.gw.proc is not None
            self.workerd = find_workerd(self.gw.proc.pid)
        except BaseException:
            self.fleet.stop()
            raise
        self.sdk = openai.OpenAI(
            base_url=f"{self.gw.url}/api/heavy/batch/v1", api_key=API_KEY, max_retries=2, timeout=60
        )

    def start_workers(self) -> None:
        self.fleet.start_workers(self.gw.url, SECRET, BATCH_NODES, log_dir=self.logs)

    def stop(self) -> None:
        try:
            self.gw.stop()
        finally:
            self.fleet.stop()
            shutil.rmtree(self.logs, ignore_errors=True)

    def engine_runs(self) -> Counter[str]:
        """Engine requests per custom_id, from what reached nodes 7-8 (their records)."""
        runs: Counter[str] = Counter()
        for n in BATCH_NODES:
            for rec in self.fleet.requests(n):
                if rec["path"] == CHAT and rec["body"]:
                    with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                        runs[json.loads(rec["body"])["messages"][0]["content"]] += 1
        return runs


@dataclass
class BatchRun:
    status: str = ""
    seconds: float = 0.0
    upload_s: float = 0.0
    cpu_s: float | None = None
    polls: int = 0
    completed: int = 0
    failed: int = 0
    ids: Counter[str] = field(default_factory=Counter)  # custom_id -> times in output + error
    routes: Counter[str] = field(default_factory=Counter)  # Worker requests by route

    def rate(self, lines: int) -> float | None:
        return lines / self.seconds if self.seconds else None


def run_batch(stack: Stack, data: bytes, on_progress: Any = None, timeout: float = 900) -> BatchRun:
    """Upload, create, (re)start the workers, poll until done; read back output + error."""
    out = BatchRun()
    t0 = time.monotonic()
    f = stack.sdk.files.create(file=("lines.jsonl", data), purpose="batch")
    out.upload_s = time.monotonic() - t0
    before = len(stack.gw.lines)
    cpu0 = cpu_seconds(stack.workerd)
    start = time.monotonic()
    b = stack.sdk.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    stack.start_workers()
    deadline = start + timeout
    while b.status not in DONE and time.monotonic() < deadline:
        time.sleep(0.25)
        b = stack.sdk.batches.retrieve(b.id)
        out.polls += 1
        if on_progress is not None:
            on_progress(b)
    out.seconds = time.monotonic() - start
    cpu1 = cpu_seconds(stack.workerd)
    out.cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    for line in list(stack.gw.lines)[before:]:
        with contextlib.suppress(ValueError, AttributeError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("route"):
                out.routes[_LEASE_ID.sub("/leases/{id}/", str(rec["route"]))] += 1
    out.status = b.status
    counts = b.request_counts
    out.completed, out.failed = (counts.completed, counts.failed) if counts else (0, 0)
    for fid in (b.output_file_id, b.error_file_id):
        if fid:
            for raw in stack.sdk.files.content(fid).text.splitlines():
                if raw.strip():
                    out.ids[json.loads(raw)["custom_id"]] += 1
    return out


# -- direct: the same lines straight to the engines --------------------------------------------
async def _direct(
    urls: dict[int, str], conc: dict[int, int], bodies: list[bytes]
) -> tuple[float, int]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    errors = 0
    headers = {"authorization": f"Bearer {NODE_TOKEN}", "content-type": "application/json"}

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = await client.post(CHAT, content=body, headers=headers)
            errors += r.status_code != 200

    clients = {
        n: httpx.AsyncClient(
            base_url=urls[n],
            timeout=600,
            limits=httpx.Limits(max_connections=c, max_keepalive_connections=c),
        )
        for n, c in conc.items()
    }
    try:
        start = time.monotonic()
        await asyncio.gather(*(one(clients[n]) for n, c in conc.items() for _ in range(c)))
        return time.monotonic() - start, errors
    finally:
        for c in clients.values():
            await c.aclose()


def direct_bodies(data: bytes) -> list[bytes]:
    return [json.dumps(json.loads(raw)["body"]).encode() for raw in data.splitlines() if raw]


# -- interactive p50 on another role's pair ----------------------------------------------------
def interactive(url: str, seconds: float) -> list[float]:
    """Sequential small completions to the reasoning pair through the gateway (ms each)."""
    out: list[float] = []
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=30) as c:
        c.post(INTERACTIVE_PATH, content=SMALL_BODY, headers=headers)  # warm
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            r = c.post(INTERACTIVE_PATH, content=SMALL_BODY, headers=headers)
            if r.status_code == 200:
                out.append((time.monotonic() - t) * 1000)
    return out


@dataclass
class Throughput:
    prof: BatchProfile
    direct: list[tuple[dict[int, int], float, int]] = field(default_factory=list)
    batch: BatchRun | None = None
    batch2: BatchRun | None = None  # the one run with interactive load beside it
    engine_requests: int = 0
    calm_ms: list[float] = field(default_factory=list)
    during_ms: list[float] = field(default_factory=list)


def measure_throughput(bench: Bench) -> Throughput:
    prof = PROFILES[bench.profile.name]
    res = Throughput(prof)
    data = lines_jsonl(prof.lines, prof.max_tokens)
    stack = Stack(lease_s=120, heartbeat_s=30, history=prof.lines * 3)
    try:
        urls = {n: stack.fleet.url(n) for n in BATCH_NODES}
        bodies = direct_bodies(data)
        for k in prof.levels:
            conc = {n: max(1, round(k * (BATCH_CAPACITY[n].max_num_seqs or 1))) for n in urls}
            secs, errors = asyncio.run(_direct(urls, conc, bodies))
            res.direct.append((conc, secs, errors))
            log(f"batch: direct {conc}: {prof.lines / secs:.1f} lines/s, {errors} errors")
        res.calm_ms = interactive(stack.gw.url, prof.interactive_s)
        stack.fleet.reset()  # request records cleared: count this batch's engine requests only
        res.batch = run_batch(stack, data)
        res.engine_requests = sum(stack.engine_runs().values())
        log(f"batch: {res.batch.status} in {res.batch.seconds:.1f} s")
        # Again, with interactive requests to the reasoning pair all along.
        during: list[float] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                during.extend(interactive(stack.gw.url, 1.0))

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        try:
            res.batch2 = run_batch(stack, data)
        finally:
            done.set()
            thread.join(timeout=30)
        res.during_ms = during
    finally:
        stack.stop()
    return res


def render_throughput(res: Throughput, bench: Bench) -> list[str]:
    prof, b = res.prof, res.batch
    assert b is not None
    rows = []
    best = None
    for conc, secs, errors in res.direct:
        rate = prof.lines / secs
        best = rate if best is None or rate > best else best
        label = ", ".join(f"node {n}: {c}" for n, c in conc.items())
        rows.append([f"direct ({label})", fmt(secs, 1), fmt(rate, 1), errors, ""])
    rate = b.rate(prof.lines)
    ratio = None if rate is None or not best else rate / best
    ok_ids = len(b.ids) == prof.lines and set(b.ids.values()) == {1}
    reached = None if ratio is None else ratio >= 0.95
    rows.append(
        [
            "batch (gateway + workers)",
            fmt(b.seconds, 1),
            fmt(rate, 1),
            b.failed,
            f"{fmt(ratio, 3)}x best direct (target >= 0.95: {met(reached)})",
        ]
    )
    if res.batch2 is not None:
        r2 = res.batch2.rate(prof.lines)
        rows.append(
            [
                "batch, interactive load beside it",
                fmt(res.batch2.seconds, 1),
                fmt(r2, 1),
                res.batch2.failed,
                f"{fmt(None if r2 is None or not best else r2 / best, 3)}x best direct",
            ]
        )
    cpu_line = None if b.cpu_s is None else b.cpu_s * 1000 / prof.lines
    calm, during = median(res.calm_ms), median(res.during_ms)
    moved = None if calm is None or during is None else during / calm
    routes = ", ".join(f"{r}: {n}" for r, n in sorted(b.routes.items())) or "n/a"
    served = sum(b.routes.values())
    size = len(lines_jsonl(prof.lines, prof.max_tokens))
    caps = ", ".join(
        f"node {n}: max_num_seqs {c.max_num_seqs}, {c.token_s * 1000:g} ms/token"
        for n, c in BATCH_CAPACITY.items()
    )
    return [
        SECTION.heading,
        "",
        f"{prof.lines:,} chat lines of {prof.max_tokens} generated tokens each on nodes 7-8 "
        f"({caps}: `sim.fleet.BATCH_CAPACITY`). SHARD_LINES 100 (the default).",
        "",
        *table(["how", "seconds", "lines/s", "errors / failed", "ratio"], rows, {1, 2, 3}),
        *table(
            ["control plane", "value"],
            [
                [f"upload ({size:,} bytes, files.create)", f"{fmt(b.upload_s * 1000, 0)} ms"],
                ["workerd CPU over the batch (create to completed seen)", f"{fmt(b.cpu_s)} s"],
                ["workerd CPU per line", f"{fmt(cpu_line, 3)} ms"],
                [f"Worker requests during the batch ({b.polls} retrieve polls)", served],
                [f"engine requests for {prof.lines:,} lines (no node died)", res.engine_requests],
                ["every custom_id exactly once in output + error", met(ok_ids)],
            ],
            {1},
        ),
        f"Worker requests by route: {routes}.",
        "",
        "| interactive (reasoning pair, c=1, through the same gateway) | requests | p50 ms |",
        "|---|---:|---:|",
        f"| no batch | {len(res.calm_ms)} | {fmt(calm, 2)} |",
        f"| during a batch (BATCH_HELPERS off) | {len(res.during_ms)} | {fmt(during, 2)} |",
        f"| ratio | | {fmt(moved, 3)} |",
        "",
    ]


# -- chaos ------------------------------------------------------------------------------------
@dataclass
class Chaos:
    prof: BatchProfile
    run: BatchRun | None = None
    kills: list[tuple[float, int]] = field(default_factory=list)  # (s after create, node)
    runs: Counter[str] = field(default_factory=Counter)


def measure_chaos(bench: Bench) -> Chaos:
    prof = PROFILES[bench.profile.name]
    res = Chaos(prof)
    data = lines_jsonl(prof.lines, prof.max_tokens)
    stack = Stack(lease_s=prof.lease_s, heartbeat_s=prof.lease_s / 3, history=prof.lines * 4)
    try:
        stack.fleet.reset()
        start = time.monotonic()
        state: dict[str, Any] = {"next": start + 2.0, "node": BATCH_NODES[0], "dead": None}

        def chaos(b: Any) -> None:
            now = time.monotonic()
            if state["dead"] is not None and now >= state["revive"]:
                stack.fleet.revive(state["dead"])
                state["dead"] = None
                state["next"] = now + prof.down_s
            if state["dead"] is None and len(res.kills) < prof.kills and now >= state["next"]:
                # The node whose turn it is, else the other one if only it is running lines
                # (one node may hold every shard of a small batch).
                nodes = stack.fleet.state()
                turn = [state["node"], *(m for m in BATCH_NODES if m != state["node"])]
                n = next((m for m in turn if nodes[str(m)]["running"] > 0), state["node"])
                if b.status == "in_progress" and nodes[str(n)]["running"] > 0:
                    stack.fleet.kill(n)  # mid-shard: its engine is running lines
                    res.kills.append((now - start, n))
                    log(f"batch-chaos: killed node {n} and its worker at {now - start:.1f} s")
                    state.update(dead=n, revive=now + prof.down_s)
                    state["node"] = BATCH_NODES[1] if n == BATCH_NODES[0] else BATCH_NODES[0]

        res.run = run_batch(stack, data, on_progress=chaos)
        if state["dead"] is not None:
            stack.fleet.revive(state["dead"])
        res.runs = stack.engine_runs()
    finally:
        stack.stop()
    return res


def render_chaos(res: Chaos, bench: Bench) -> list[str]:
    prof, r = res.prof, res.run
    assert r is not None
    expected = {f"line-{i}" for i in range(prof.lines)}
    once = set(r.ids) == expected and set(r.ids.values()) == {1}
    twice = sum(1 for v in res.runs.values() if v > 1)
    extra = sum(v - 1 for v in res.runs.values() if v > 1)
    never = len(expected - set(res.runs))
    kills = ", ".join(f"node {n} at {t:.1f} s" for t, n in res.kills) or "none"
    rows = [
        ["status", r.status, met(r.status == "completed")],
        ["seconds (create → completed)", fmt(r.seconds, 1), ""],
        [
            "kills (node + worker, SIGKILL, mid-shard)",
            f"{len(res.kills)}: {kills}",
            met(len(res.kills) == prof.kills),
        ],
        [
            "completed / failed",
            f"{r.completed} / {r.failed}",
            met(r.completed + r.failed == prof.lines),
        ],
        ["custom_ids in output + error", f"{len(r.ids)} distinct, {sum(r.ids.values())} lines", ""],
        ["every custom_id exactly once", "", met(once)],
        ["lines that ran more than once on an engine", f"{twice} ({extra} extra runs)", ""],
        ["lines never seen by an engine (must be 0)", never, met(never == 0)],
    ]
    return [
        CHAOS.heading,
        "",
        f"{prof.lines:,} lines ({prof.max_tokens} tokens each) on nodes 7-8 with BATCH_LEASE_S "
        f"{prof.lease_s:g}, BATCH_HEARTBEAT_S {prof.lease_s / 3:g}; a killed node stays down "
        f"{prof.down_s:g} s, then node and worker come back (`sim.fleet` kill/revive).",
        "",
        *table(["what", "value", "ok?"], rows),
        "A line runs again when its node died with the line in flight or finished but "
        "uncommitted: the shard's lease lapses and another worker runs the whole shard. The "
        "output never has it twice (the dead lease's commit could not happen, or is refused).",
        "",
    ]


SECTION = Section(
    10,
    "batch",
    "Batch API: throughput, control-plane CPU, interactive p50",
    measure_throughput,
    render_throughput,
    needs=(),
)
CHAOS = Section(
    11, "batch-chaos", "Batch API under node deaths", measure_chaos, render_chaos, needs=()
)
