"""Handing the GPU over: a drained batch worker (SIGTERM, `batch_worker.drain`) lets its running
lines finish and commits them, and gives the rest back to the gateway at once, so the partner
node leases it long before the lease would lapse; every custom_id ends up exactly once. The
node session drains the worker before the training runner stops the engine and starts it again
afterwards.

The gateway here is the real batch core (work.py, batches.py over sqlite and a dict R2, as the
unit tests drive it) behind the node API over HTTP on the wall clock; the workers are real
worker processes; the engines are simulated vLLM nodes that take real time per token. The
workerd gateway runs the same calls in tests/e2e/test_batch.py."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import work
from heady_node import batch_worker, launcher
from heady_node.finetune import runner as train_runner
from heady_node.session import NodeSession
from jobdb import BatchSettings
from sim.fleet import Fleet
from sim.node.capacity import Capacity
from tests.support import batchkit
from tests.support.stores import drive

ENGINE_TOKEN = "engine-token"
MODEL = "batch-model"
OWNER = "0123456789abcdef"
CREDENTIALS = {"cred-node-7": 7, "cred-node-8": 8}
SETTINGS = BatchSettings(shard_lines=20, lease_s=600, heartbeat_s=1)  # lapse: 10 min
_PATH = re.compile(r"^/api/nodes/v1/leases/([^/]+)/(input|heartbeat|commit|release|results/\w+)$")


class CoreGateway:
    """The gateway's batch core behind the node-facing HTTP API, one call at a time."""

    def __init__(self) -> None:
        self.g = batchkit.Gateway(SETTINGS, now=time.time())
        shared = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.g.db.conn.backup(shared)  # the migrated schema, usable from the server's threads
        shared.row_factory = sqlite3.Row
        self.g.db.conn = shared
        self.lock = threading.Lock()
        self.calls: list[tuple[float, int, str]] = []  # (time, node, what)
        core = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                status, payload = core.answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def locked(self, fn: Callable[[batchkit.Gateway], Any]) -> Any:
        with self.lock:
            self.g.now = time.time()
            return fn(self.g)

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        node = CREDENTIALS.get((headers.get("authorization") or "").removeprefix("Bearer "))
        if node is None:
            return 401, b'{"error": {"code": "unauthorized"}}'
        with self.lock:
            g = self.g
            g.now = time.time()
            if method == "POST" and path == "/api/nodes/v1/leases":
                if "kinds" in json.loads(body or b"{}"):  # the train runner: no train work here
                    return 204, b""
                result = drive(work.lease(g.db, g.ids, node, True, body, g.now, g.settings))
                if result.status == 200:
                    lease = result.body["lease"]
                    self.calls.append((g.now, node, f"lease {lease['kind']} {lease['n_lines']}"))
                return result.status, result.render("req") if result.body is not None else b""
            m = _PATH.match(path)
            if m is None:
                return 404, b'{"error": {"code": "not_found"}}'
            lease_id, what = m.groups()
            self.calls.append((g.now, node, what))
            token = headers.get("x-heady-lease-token")
            if what == "input":
                result = drive(work.lease_input(g.db, g.ids, lease_id, token, g.now))
                if result.status == 200:
                    return 200, drive(g.blobs.read_parts(result.stream))
            elif what.startswith("results/"):
                part = what.split("/")[1]
                target = drive(
                    work.result_target(
                        g.db, g.ids, lease_id, token, part, str(len(body)), g.now, g.settings
                    )
                )
                if isinstance(target, str):
                    drive(g.blobs.put(target, body, length=len(body)))
                    return 200, json.dumps({"bytes": len(body)}).encode()
                result = target
            elif what == "heartbeat":
                result = drive(work.heartbeat(g.db, lease_id, body, g.now, g.settings))
            elif what == "commit":
                result = drive(work.commit(g.db, g.blobs, g.ids, lease_id, body, g.now, g.settings))
            else:
                result = drive(work.release(g.db, g.blobs, g.ids, lease_id, body, g.now))
            return result.status, result.render("req")

    # -- the client side and what the tests look at
    def submit(self, n: int, max_tokens: int) -> str:
        lines = b"".join(
            json.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"line {i}"}],
                        "max_tokens": max_tokens,
                        "ignore_eos": True,  # the sim then answers max_tokens tokens
                    },
                }
            ).encode()
            + b"\n"
            for i in range(n)
        )

        def go(g: batchkit.Gateway) -> str:
            f = g.upload(OWNER, lines)
            assert f.status == 200, f.body
            b = g.create_batch(OWNER, f.body["id"])
            assert b.status == 200, b.body
            return b.body["id"]

        return self.locked(go)

    def status(self, batch_id: str) -> str:
        return self.locked(lambda g: g.batch(OWNER, batch_id)["status"])

    def served(self, batch_id: str) -> tuple[Counter, list[dict]]:
        def go(g: batchkit.Gateway) -> tuple[Counter, list[dict]]:
            b = g.batch(OWNER, batch_id)
            lines = []
            for key in ("output_file_id", "error_file_id"):
                if b[key]:
                    lines += [json.loads(x) for x in g.content(OWNER, b[key]).splitlines()]
            return Counter(x["custom_id"] for x in lines), lines

        return self.locked(go)

    def rows(self, sql: str, params: list[object] | None = None) -> list[dict]:
        return self.locked(lambda g: g.db.rows(sql, params or []))


@pytest.fixture
def core() -> Iterator[CoreGateway]:
    c = CoreGateway()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    # Node 1: the draining node's engine, 4 sequences at once, 50 ms a token (1 s a 20-token
    # line); node 2: its partner's, fast.
    with Fleet(
        count=2,
        api_key=ENGINE_TOKEN,
        served_names={1: [MODEL], 2: [MODEL]},
        capacity={1: Capacity(max_num_seqs=4, token_s=0.05), 2: Capacity(token_s=0.0)},
    ) as f:
        yield f


def start(core: CoreGateway, fleet: Fleet, engine: int, node: int, log: Path, **kw: Any):
    cred = next(c for c, n in CREDENTIALS.items() if n == node)
    return batch_worker.start_process(
        core.url, cred, fleet.url(engine), node, engine_token=ENGINE_TOKEN, log_path=log,
        always=True, concurrency=4, **kw,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def posts(fleet: Fleet, n: int) -> int:
    return sum(1 for r in fleet.requests(n) if r.method == "POST")


def drain_once(
    core: CoreGateway,
    fleet: Fleet,
    tmp: Path,
    drain_s: float | None,
    token_s: float = 0.05,
    started: int = 6,
) -> dict:
    """Node 7 runs a 40-line batch (two 20-line shards) on the slow engine; once some lines
    finished it is drained; node 8 then finishes the batch on the fast engine."""
    fleet.reset()
    fleet.set_capacity(1, max_num_seqs=4, token_s=token_s)
    batch_id = core.submit(40, max_tokens=20)
    a = start(core, fleet, 1, 7, tmp / "a.log", drain_s=drain_s)
    b = None
    try:
        wait_for(lambda: posts(fleet, 1) >= started)  # by default: a few done, four running
        t0 = time.monotonic()
        clean = batch_worker.drain(a, timeout_s=60)
        took = time.monotonic() - t0
        # Right away, before any lease could lapse: node 7 holds nothing, the rest waits.
        held = core.rows("SELECT n_lines FROM work WHERE state = 'leased'")
        waiting = core.rows("SELECT n_lines FROM work WHERE state = 'pending'")
        b = start(core, fleet, 2, 8, tmp / "b.log")
        t1 = time.monotonic()
        wait_for(lambda: core.status(batch_id) == "completed", timeout=SETTINGS.lease_s / 10)
        finished_in = time.monotonic() - t1
    finally:
        for proc in (a, b):
            if proc is not None:
                launcher.stop(proc, grace=5)
    ids, lines = core.served(batch_id)
    done = core.rows(
        "SELECT node, first_line, n_lines, completed, failed FROM work"
        " WHERE kind = 'lines' AND state = 'done' ORDER BY first_line"
    )
    return {
        "clean": clean, "took": took, "held": held, "waiting": waiting, "ids": ids,
        "lines": lines, "done": done, "finished_in": finished_in, "batch": batch_id,
        "log_a": (tmp / "a.log").read_text(), "engine_a": posts(fleet, 1),
        "engine_b": posts(fleet, 2),
    }  # fmt: skip


def test_a_drain_commits_the_running_lines_and_gives_the_rest_back_at_once(
    core: CoreGateway, fleet: Fleet, tmp_path: Path
) -> None:
    r = drain_once(core, fleet, tmp_path, drain_s=None)  # the default 30 s: all lines finish
    assert r["clean"], r["log_a"]
    assert r["took"] < batch_worker.DRAIN_S
    assert r["held"] == [] and sum(w["n_lines"] for w in r["waiting"]) > 0
    # The partner finished what was given back in seconds: the leases (10 min) never lapsed.
    assert r["finished_in"] < 30
    # Every custom_id exactly once, every line a 200 (none ran against a stopped engine).
    assert r["ids"] == Counter(f"req-{i}" for i in range(40))
    assert all(x["response"]["status_code"] == 200 for x in r["lines"])
    by_7 = sum(d["completed"] + d["failed"] for d in r["done"] if d["node"] == 7)
    assert by_7 >= 6, r["done"]  # its finished lines and those running at the drain
    # No line ran twice: node 8's engine saw exactly the lines node 7 gave back.
    assert r["engine_a"] == by_7 and r["engine_b"] == 40 - by_7
    assert re.search(r"drained, gave back \d+ lines, committed: \d+/20 lines", r["log_a"])
    assert "drained" in r["log_a"].splitlines()[-1]
    # The committed prefix and the given-back rest tile the input with no gap or overlap.
    at = 0
    for d in r["done"]:
        assert d["first_line"] == at
        at += d["n_lines"]
    assert at == 40


def test_lines_still_running_at_the_deadline_go_back_too(
    core: CoreGateway, fleet: Fleet, tmp_path: Path
) -> None:
    r = drain_once(core, fleet, tmp_path, drain_s=0.5, token_s=0.25, started=1)  # 5 s a line
    assert r["clean"], r["log_a"]
    assert r["took"] < 5  # the running lines were cancelled at 0.5 s, not waited for
    assert r["held"] == []
    assert r["ids"] == Counter(f"req-{i}" for i in range(40))
    by_7 = sum(d["completed"] + d["failed"] for d in r["done"] if d["node"] == 7)
    assert by_7 + r["engine_b"] == 40  # what node 7 cancelled ran once more, on node 8 only
    assert "drained: gave back all 20 lines" in r["log_a"]


def test_an_idle_worker_drains_at_once(core: CoreGateway, fleet: Fleet, tmp_path: Path) -> None:
    proc = start(core, fleet, 1, 7, tmp_path / "w.log")
    try:
        wait_for(lambda: "pulling batch work" in (tmp_path / "w.log").read_text())
        t0 = time.monotonic()
        assert batch_worker.drain(proc, timeout_s=20) is True
        assert time.monotonic() - t0 < 5
    finally:
        launcher.stop(proc, grace=1)
    assert batch_worker.drain(proc, timeout_s=1) is True  # already gone: says how it ended


def test_drain_kills_a_worker_that_overstays(core: CoreGateway, fleet: Fleet, tmp_path) -> None:
    fleet.reset()
    fleet.set_capacity(1, max_num_seqs=4, token_s=0.25)
    batch_id = core.submit(20, max_tokens=20)
    proc = start(core, fleet, 1, 7, tmp_path / "w.log", drain_s=60)
    try:
        wait_for(lambda: posts(fleet, 1) >= 1)
        t0 = time.monotonic()
        assert batch_worker.drain(proc, timeout_s=1.0) is False
        assert time.monotonic() - t0 < 8 and proc.poll() is not None
    finally:
        launcher.stop(proc, grace=1)
        fleet.reset()
    # Killed mid-drain: the unstarted lines went back already; the running ones' lease lapses.
    waiting = core.rows("SELECT n_lines FROM work WHERE state = 'pending' AND kind = 'lines'")
    assert sum(w["n_lines"] for w in waiting) > 0
    assert core.status(batch_id) == "in_progress"


@pytest.mark.parametrize("restore_fails", [False, True])
def test_hand_over_drains_before_the_engine_stops_and_restarts_after(
    restore_fails: bool, tmp_path: Path
) -> None:
    """HandOver's order, with the real RestartEngine over a real process; when the engine
    does not come back the worker is started again all the same."""
    order: list[str] = []
    port = free_port()
    ok_argv = [sys.executable, "-m", "sim.node", "--port", str(port)]
    engine = train_runner.RestartEngine(
        argv=[sys.executable, "-c", "import sys; sys.exit(3)"] if restore_fails else ok_argv,
        env={}, log_path=tmp_path / "engine.log", base_url=f"http://127.0.0.1:{port}",
        proc=launcher.spawn([sys.executable, "-c", "import time; time.sleep(60)"],
                            log_path=tmp_path / "old.log", env={}),
        health_timeout_s=5,
    )  # fmt: skip
    old = engine.proc
    assert old is not None

    def pause() -> None:
        assert old.poll() is None, "the engine stopped before the worker was drained"
        order.append("drain worker")

    hand = train_runner.HandOver(engine, pause, lambda: order.append("start worker"))
    asyncio.run(hand.release())
    assert old.poll() is not None and engine.proc is None
    order.append("train")
    if restore_fails:
        with pytest.raises(launcher.EngineError):
            asyncio.run(hand.restore())
    else:
        asyncio.run(hand.restore())
        assert engine.proc is not None and engine.proc.poll() is None  # serving again
    assert order == ["drain worker", "train", "start worker"]
    if engine.proc is not None:
        launcher.stop(engine.proc, grace=1)


def test_the_session_drains_its_worker_for_training_and_starts_it_again(
    core: CoreGateway, tmp_path: Path
) -> None:
    secrets = {"HEADY_GATEWAY_URL": core.url, "HEADY_NODE_CREDENTIAL": "cred-node-7"}
    out: list[str] = []
    engine = [sys.executable, "-m", "sim.node", "--node", "7", "--sim-token-s", "0.05"]
    s = NodeSession(
        node=7, tunnel_kind="none", dry_run=True, log_dir=tmp_path, engine=engine,
        secret=lambda name: secrets.get(name, ""), out=out.append,
    )  # fmt: skip
    try:
        s.preflight()
        s.start_engine()
        assert s.worker_proc is not None and s.train_worker is not None
        hand = s.train_worker.runner.engine
        assert isinstance(hand, train_runner.HandOver) and hand.engine is s.train_engine
        model = s.served_names[0]
        lines = b"".join(
            json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "max_tokens": 20, "ignore_eos": True,
                                 "messages": [{"role": "user", "content": str(i)}]}}).encode()
            + b"\n" for i in range(60)
        )  # fmt: skip
        batch_id = core.locked(
            lambda g: g.create_batch(OWNER, g.upload(OWNER, lines).body["id"]).body["id"]
        )
        wait_for(lambda: core.rows("SELECT 1 FROM work WHERE state = 'done' AND kind = 'lines'")
                 or any(w == "heartbeat" for _, _n, w in core.calls))  # fmt: skip
        worker = s.worker_proc
        asyncio.run(hand.release())  # what the runner does before training
        assert worker.poll() == 0 and s.worker_proc is None
        assert s.current_engine() is None
        assert core.rows("SELECT 1 FROM work WHERE state = 'leased'") == []
        assert any(x.startswith("Batch worker drained for training in") for x in out)
        asyncio.run(hand.restore())  # what the runner does after it, whatever happened
        assert s.current_engine() is not None and s.worker_proc is not None
        assert s.worker_proc is not worker and s.worker_proc.poll() is None
        wait_for(lambda: core.status(batch_id) == "completed", timeout=60)
    finally:
        s.stop()
    assert s.worker_proc is None
    ids, served = core.served(batch_id)
    assert ids == Counter(f"req-{i}" for i in range(60))
    assert all(x["response"]["status_code"] == 200 for x in served)


def test_drain_time_on_the_sim(core: CoreGateway, fleet: Fleet, tmp_path: Path) -> None:
    """The number docs/fine-tuning.md quotes: a drain with 4 lines of 1 s running."""
    took = []
    for i in range(3):
        d = tmp_path / str(i)
        d.mkdir()
        r = drain_once(core, fleet, d, drain_s=None)
        assert r["clean"] and r["ids"] == Counter(f"req-{j}" for j in range(40))
        took.append(r["took"])
        print("\n" + "".join(x for x in r["log_a"].splitlines(True) if "drain" in x))
    print(f"drain took {statistics.median(took):.2f} s median of {sorted(took)}")
    assert statistics.median(took) < 5
