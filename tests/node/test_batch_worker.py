"""The batch worker against a real simulated vLLM node (sim.fleet) as its local engine and, for
the gateway, a small in-test HTTP server that keeps the node-facing contract of docs/batch.md
("Node API": leases, input ranges, heartbeats, result parts, conditional commits). The real
gateway is tested with the worker in the e2e suite."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from heady_node import batch_worker, launcher
from heady_node.batch_worker import BatchWorker, WorkerConfig
from heady_node.session import NodeSession
from heady_shared.batchlines import MAX_LINES, split_lines
from sim.fleet import Fleet

ENGINE_TOKEN = "engine-token"
CREDENTIAL = "hn1.7.0123456789abcdef0123456789abcdef"
EP = "/v1/chat/completions"
_PATH = re.compile(
    r"^/api/nodes/v1/leases/([^/]+)/(input|heartbeat|commit|results/(?:output|error))$"
)


# -- the gateway stand-in ---------------------------------------------------------------------
@dataclass
class Work:
    kind: str
    offset: int = 0
    length: int | None = None  # None: to the end
    first_line: int = 0
    n_lines: int = 0
    heartbeat_s: float = 30.0
    cancel_from_beat: int | None = None  # heartbeats from this one on answer cancel: true
    lose_from_beat: int | None = None  # heartbeats from this one on answer 409
    refuse_commit: bool = False  # the lease was taken over: the commit gets 409
    shard_lines: int | None = None  # a validate lease: the gateway's SHARD_LINES
    id: str = ""
    token: str = ""
    beats: int = 0
    lost: bool = False


@dataclass
class Gateway:
    data: bytes = b""
    endpoint: str = EP
    queue: deque[Work] = field(default_factory=deque)
    works: dict[str, Work] = field(default_factory=dict)
    asks: list[dict[str, Any]] = field(default_factory=list)
    parts: dict[tuple[str, str], bytes] = field(default_factory=dict)
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def offer(self, work: Work) -> Work:
        n = len(self.works) + len(self.queue) + 1
        work.id, work.token = f"wrk_{n:024x}", f"tok-{n}"
        self.queue.append(work)
        return work

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        with self.lock:
            self.log.append((method, path))
            if headers.get("authorization") != f"Bearer {CREDENTIAL}":
                return 401, {"error": {"message": "bad credential", "code": "unauthorized"}}
            if method == "POST" and path == "/api/nodes/v1/leases":
                ask = json.loads(body)
                self.asks.append(ask)
                kinds = ask.get("kinds")  # the train runner asks for `train` work only
                if not self.queue or (kinds is not None and self.queue[0].kind not in kinds):
                    return 204, None
                w = self.queue.popleft()
                self.works[w.id] = w
                return 200, {"lease": self._lease(w)}
            m = _PATH.match(path)
            w = self.works.get(m.group(1)) if m else None
            if w is None or m is None:
                return 404, {"error": {"message": "no such lease", "code": "not_found"}}
            what = m.group(2)
            token = headers.get("x-heady-lease-token")
            if method == "POST":
                token = json.loads(body).get("token")
            if token != w.token or w.lost or w.id in self.commits:
                return 409, {"error": {"message": "lease lost", "code": "lease_lost"}}
            if what == "input" and method == "GET":
                end = len(self.data) if w.length is None else w.offset + w.length
                return 200, self.data[w.offset : end]
            if what == "heartbeat":
                w.beats += 1
                if w.lose_from_beat is not None and w.beats >= w.lose_from_beat:
                    w.lost = True
                    return 409, {"error": {"message": "lease lost", "code": "lease_lost"}}
                cancel = w.cancel_from_beat is not None and w.beats >= w.cancel_from_beat
                return 200, {"expires_at": int(time.time()) + 120, "cancel": cancel}
            if what.startswith("results/") and method == "PUT":
                if headers.get("content-length") is None:
                    return 411, {"error": {"message": "length required", "code": "length"}}
                self.parts[(w.id, what.split("/")[1])] = body
                return 200, {"bytes": len(body)}
            if what == "commit":
                commit = json.loads(body)
                if w.refuse_commit:
                    return 409, {"error": {"message": "lease lost", "code": "lease_lost"}}
                counted = commit.get("completed", 0) + commit.get("failed", 0)
                if w.kind == "lines" and not commit.get("partial") and counted != w.n_lines:
                    return 400, {"error": {"message": "counts", "code": "invalid_commit"}}
                self.commits[w.id] = commit
                return 200, {"state": "done"}
            return 405, {"error": {"message": "method", "code": "method"}}

    def _lease(self, w: Work) -> dict[str, Any]:
        extra = {"shard_lines": w.shard_lines, "max_lines": 50_000} if w.shard_lines else {}
        return extra | {
            "id": w.id, "token": w.token, "kind": w.kind, "batch_id": "batch_" + "0" * 24,
            "endpoint": self.endpoint, "seq": 0, "first_line": w.first_line,
            "n_lines": w.n_lines, "lease_s": 120, "heartbeat_s": w.heartbeat_s,
            "expires_at": int(time.time()) + 120, "input": f"/api/nodes/v1/leases/{w.id}/input",
        }  # fmt: skip

    def lines(self, work: Work, part: str) -> list[dict[str, Any]]:
        raw = self.parts.get((work.id, part), b"")
        return [json.loads(x) for x in raw.splitlines()]


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            status, out = gw.answer(self.command, self.path, self.headers, body)
            payload = out if isinstance(out, bytes) else b"" if out is None else json.dumps(out)
            payload = payload.encode() if isinstance(payload, str) else payload
            self.send_response(status)
            if status != 204:
                self.send_header("content-length", str(len(payload)))
            self.end_headers()
            if status != 204:
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    gw.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield gw
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def _fleet() -> Iterator[Fleet]:
    with Fleet(count=1, api_key=ENGINE_TOKEN) as fleet:
        yield fleet


@pytest.fixture
def fleet(_fleet: Fleet) -> Iterator[Fleet]:
    _fleet.reset()
    yield _fleet
    _fleet.reset()


def config(gw: Gateway, fleet: Fleet, **kw: Any) -> WorkerConfig:
    base: dict[str, Any] = {"retry_base_s": 0.05, "retry_max_s": 0.2, "poll_s": 0.05}
    return WorkerConfig(gw.url, CREDENTIAL, fleet.url(1), ENGINE_TOKEN, node=7, **(base | kw))


def run_leases(cfg: WorkerConfig, n: int) -> BatchWorker:
    async def go() -> BatchWorker:
        worker = BatchWorker(cfg)
        try:
            await asyncio.wait_for(worker.run(max_leases=n), 60)
        finally:
            await worker.aclose()
        return worker

    return asyncio.run(go())


def model(fleet: Fleet) -> str:
    return fleet.served_names(1)[0]


def line(cid: str, mdl: str, url: str = EP, **body: Any) -> bytes:
    b = {"model": mdl, "messages": [{"role": "user", "content": f"say {cid}"}], **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": b}).encode() + b"\n"


def test_leases_and_gateway_urls_never_send_the_credential_elsewhere() -> None:
    lease = {"id": "wrk_1", "token": "t", "kind": "lines", "input": "https://elsewhere/x"}
    assert batch_worker._Lease.parse(lease).input == "/api/nodes/v1/leases/wrk_1/input"
    for bad in ({"id": "../x", "token": "t"}, {"id": "wrk_1"}, None):
        with pytest.raises(batch_worker.GatewayError):
            batch_worker._Lease.parse(bad)
    assert batch_worker.check_gateway_url("https://gw.example.com/") == "https://gw.example.com"
    assert batch_worker.check_gateway_url("http://127.0.0.1:8787") == "http://127.0.0.1:8787"
    for bad_url in ("http://gw.example.com", "ftp://x", "gw.example.com"):
        with pytest.raises(ValueError):
            batch_worker.check_gateway_url(bad_url)


# -- validate ---------------------------------------------------------------------------------
def test_validate_commits_errors_with_line_numbers_for_a_bad_file(gateway, fleet) -> None:
    m = model(fleet)
    gateway.data = b"".join(
        [line("a", m), b"{oops\n", line("a", m), line("b", m, url="/v1/completions"),
         line("c", "another-model")]
    )  # fmt: skip
    work = gateway.offer(Work("validate"))
    run_leases(config(gateway, fleet), 1)
    # the worker asked with what the engine serves, and said it is idle
    assert gateway.asks[0] == {"models": list(fleet.served_names(1)), "idle": True}
    commit = gateway.commits[work.id]
    assert commit["token"] == work.token and commit["ok"] is False
    got = [(e["code"], e["line"], e["param"]) for e in commit["errors"]]
    assert got == [
        ("invalid_json_line", 2, None),
        ("duplicate_custom_id", 3, "custom_id"),
        ("invalid_url", 4, "url"),
        ("mismatched_model", 5, "body.model"),
    ]
    assert all(set(e) == {"code", "line", "message", "param"} for e in commit["errors"])


def test_validate_refuses_more_than_50000_lines(gateway, fleet) -> None:
    gateway.data = b"".join(
        b'{"custom_id":"r%d","method":"POST","url":"%s","body":{"model":"m"}}\n' % (i, EP.encode())
        for i in range(MAX_LINES + 1)
    )
    work = gateway.offer(Work("validate"))
    run_leases(config(gateway, fleet), 1)
    commit = gateway.commits[work.id]
    assert commit["ok"] is False
    assert [(e["code"], e["line"]) for e in commit["errors"]] == [
        ("too_many_requests", MAX_LINES + 1)
    ]


def test_validate_commits_the_shard_plan_of_a_good_file(gateway, fleet) -> None:
    m = model(fleet)
    gateway.data = b"".join(line(f"r{i}", m) for i in range(230))
    work = gateway.offer(Work("validate"))
    run_leases(config(gateway, fleet), 1)
    commit = gateway.commits[work.id]
    assert commit["ok"] is True and commit["model"] == m and commit["total"] == 230
    shards = commit["shards"]
    assert [(s["first_line"], s["n_lines"]) for s in shards] == [(0, 100), (100, 100), (200, 30)]
    pos = 0
    for s in shards:
        assert s["offset"] == pos
        part = gateway.data[s["offset"] : s["offset"] + s["length"]]
        ids = [json.loads(x)["custom_id"] for x in split_lines([part])]
        assert ids == [f"r{i}" for i in range(s["first_line"], s["first_line"] + s["n_lines"])]
        pos += s["length"]
    assert pos == len(gateway.data)


def test_validate_cuts_shards_of_the_gateways_shard_lines(gateway, fleet) -> None:
    m = model(fleet)
    gateway.data = b"".join(line(f"r{i}", m) for i in range(45))
    work = gateway.offer(Work("validate", shard_lines=20))
    run_leases(config(gateway, fleet), 1)
    shards = gateway.commits[work.id]["shards"]
    assert [(s["first_line"], s["n_lines"]) for s in shards] == [(0, 20), (20, 20), (40, 5)]


# -- lines ------------------------------------------------------------------------------------
def shard_file(gw: Gateway, m: str, n: int, *, bad: set[int] = frozenset()) -> Work:
    """A file of 2n lines; the work is its second half (lines n..2n-1)."""
    head = b"".join(line(f"x{i}", m) for i in range(n))
    tail = []
    for i in range(n, 2 * n):
        # a line the engine refuses (no messages: 400), as a real bad request would be
        tail.append(line(f"r{i}", m, messages=[]) if i in bad else line(f"r{i}", m, max_tokens=3))
    gw.data = head + b"".join(tail)
    return Work("lines", offset=len(head), length=len(gw.data) - len(head), first_line=n,
                n_lines=n)  # fmt: skip


def test_a_shard_gives_one_output_or_error_line_per_input_line(gateway, fleet) -> None:
    m = model(fleet)
    work = gateway.offer(shard_file(gateway, m, 12, bad={14, 20}))
    run_leases(config(gateway, fleet), 1)
    out, err = gateway.lines(work, "output"), gateway.lines(work, "error")
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"r{i}" for i in range(12, 24))
    assert {x["custom_id"] for x in err} == {"r14", "r20"}
    for x in out:
        assert x["id"].startswith("batch_req_") and x["error"] is None
        resp = x["response"]
        assert resp["status_code"] == 200 and resp["request_id"]
        assert resp["body"]["object"] == "chat.completion"
        assert resp["body"]["choices"][0]["finish_reason"] == "length"  # max_tokens was sent
    for x in err:
        assert x["response"]["status_code"] == 400 and x["error"] is None
    commit = gateway.commits[work.id]
    assert commit["completed"] == 10 and commit["failed"] == 2 and commit["partial"] is False
    usage = commit["usage"]
    assert usage["output_tokens"] == 30 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # every request went to the engine with the node token, none was a stream
    posts = [r for r in fleet.requests(1) if r.method == "POST"]
    assert len(posts) == 12 and all(r.header("authorization") == f"Bearer {ENGINE_TOKEN}"
                                    for r in posts)  # fmt: skip


def test_heartbeats_keep_a_slow_shard_alive(gateway, fleet) -> None:
    fleet.set(1, "slow_headers", delay=0.3)
    work = shard_file(gateway, model(fleet), 6)
    work.heartbeat_s = 0.1
    gateway.offer(work)
    run_leases(config(gateway, fleet, concurrency=2, adaptive=False), 1)
    assert gateway.commits[work.id]["completed"] == 6
    assert work.beats >= 3  # ~0.9 s of work at one beat per 0.1 s (slack for a busy machine)
    beats = [i for i, (_, p) in enumerate(gateway.log) if p.endswith("/heartbeat")]
    commit_at = next(i for i, (_, p) in enumerate(gateway.log) if p.endswith("/commit"))
    assert beats and beats[0] < commit_at


def test_cancel_commits_only_the_finished_lines_as_partial(gateway, fleet) -> None:
    fleet.set(1, "slow_headers", delay=0.2)
    work = shard_file(gateway, model(fleet), 20)
    work.heartbeat_s, work.cancel_from_beat = 0.25, 2
    gateway.offer(work)
    run_leases(config(gateway, fleet, concurrency=1, adaptive=False), 1)
    commit = gateway.commits[work.id]
    out = gateway.lines(work, "output")
    assert commit["partial"] is True
    assert 0 < commit["completed"] < 20 and commit["failed"] == 0
    assert len(out) == commit["completed"]
    assert [x["custom_id"] for x in out] == [f"r{i}" for i in range(20, 20 + len(out))]


@pytest.mark.parametrize("where", ["heartbeat", "commit"])
def test_a_lost_lease_drops_the_shard_and_the_worker_moves_on(gateway, fleet, where) -> None:
    if where == "heartbeat":
        fleet.set(1, "slow_headers", delay=0.2)
    work = shard_file(gateway, model(fleet), 8)
    work.heartbeat_s = 0.1
    if where == "heartbeat":
        work.lose_from_beat = 1
    else:
        work.refuse_commit = True
    gateway.offer(work)
    nxt = gateway.offer(Work("validate"))  # the next work goes on normally
    run_leases(config(gateway, fleet, concurrency=1, adaptive=False), 2)
    assert work.id not in gateway.commits
    if where == "heartbeat":  # nothing was even uploaded
        assert not [k for k in gateway.parts if k[0] == work.id]
    assert gateway.commits[nxt.id]["ok"] is True


def test_engine_503_then_ok_is_retried_not_an_error_line(gateway, fleet) -> None:
    work = gateway.offer(shard_file(gateway, model(fleet), 5))
    fleet.set(1, "status", status=503)
    heal = threading.Timer(0.6, lambda: fleet.set(1, "healthy"))
    heal.start()
    try:
        run_leases(config(gateway, fleet, retries=10, retry_base_s=0.1, retry_max_s=0.4), 1)
    finally:
        heal.cancel()
    assert gateway.lines(work, "error") == []
    assert sorted(x["custom_id"] for x in gateway.lines(work, "output")) == [
        f"r{i}" for i in range(5, 10)
    ]
    posts = [r for r in fleet.requests(1) if r.method == "POST"]
    assert len(posts) > 5  # some lines were sent more than once
    assert gateway.commits[work.id]["completed"] == 5


def test_an_engine_that_stays_down_abandons_the_shard_uncommitted(gateway, fleet) -> None:
    work = gateway.offer(shard_file(gateway, model(fleet), 4))
    fleet.set(1, "refuse")
    cfg = config(gateway, fleet, retries=2)

    async def step() -> bool:
        worker = BatchWorker(cfg)
        try:
            return await worker.step()
        finally:
            await worker.aclose()

    # An engine that does not answer serves no model and is not idle; a batch node still asks
    # (it can validate), and the gateway stand-in hands it lines anyway: they find no engine.
    assert asyncio.run(step()) is True
    assert gateway.asks[-1] == {"models": [], "idle": False}
    assert work.id not in gateway.commits and not gateway.parts  # left to expire, not errors


def test_a_helper_node_asks_only_while_its_engine_is_idle(gateway, fleet) -> None:
    cfg = config(gateway, fleet, always=False)

    async def step() -> bool:
        worker = BatchWorker(cfg)
        try:
            return await worker.step()
        finally:
            await worker.aclose()

    fleet.set_load(1, 3)
    assert asyncio.run(step()) is False and gateway.asks == []
    fleet.set_load(1, 0)
    assert asyncio.run(step()) is False
    assert gateway.asks == [{"models": list(fleet.served_names(1)), "idle": True}]


def test_concurrency_adapts_to_the_engine_queue(gateway, fleet) -> None:
    fleet.set(1, "slow_headers", delay=0.15)  # (the tuner's /metrics reads are slow too)
    gateway.offer(shard_file(gateway, model(fleet), 30))
    grown = run_leases(config(gateway, fleet, concurrency=2, tune_interval_s=0.05), 1)
    assert grown.limit > 2  # an empty queue and a full allowance: more lines in flight

    gateway.offer(shard_file(gateway, model(fleet), 100))  # ~0.5 s at 32 in flight
    fleet.set_load(1, 40)  # interactive requests queue up on the engine
    shrunk = run_leases(config(gateway, fleet, concurrency=32, tune_interval_s=0.05), 1)
    assert shrunk.limit < 32


def test_the_next_shard_starts_while_the_last_one_drains(gateway, fleet) -> None:
    # A paused engine (vLLM's /pause) holds completions but answers /v1/models and /metrics.
    m = model(fleet)
    first = gateway.offer(shard_file(gateway, m, 3))
    second = gateway.offer(Work("lines", offset=first.offset, length=first.length,
                                first_line=3, n_lines=3))  # fmt: skip
    httpx.post(fleet.url(1) + "/pause").raise_for_status()
    held: list[int] = []

    def resume_once_both_leased() -> None:
        wait_for(lambda: len(gateway.works) == 2)
        time.sleep(0.3)
        held.append(sum(1 for r in fleet.requests(1) if r.path == EP))
        httpx.post(fleet.url(1) + "/resume").raise_for_status()

    resumer = threading.Thread(target=resume_once_both_leased)
    resumer.start()
    try:
        run_leases(config(gateway, fleet, concurrency=4, adaptive=False), 2)
    finally:
        resumer.join(30)
    # all three lines of the first shard had started: the second was leased before any
    # commit, and took only what was left of the limit (4 - 3 = 1 line in flight)
    assert held == [4]
    assert gateway.commits[first.id]["completed"] == gateway.commits[second.id]["completed"] == 3


# -- as a process: the CLI and the node session ------------------------------------------------
def wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_worker_process_started_for_a_dev_node(gateway, fleet, tmp_path: Path) -> None:
    m = model(fleet)
    gateway.data = line("a", m) + line("b", m)
    work = gateway.offer(Work("validate"))
    log = tmp_path / "worker.log"
    proc = batch_worker.start_process(
        gateway.url, CREDENTIAL, fleet.url(1), 7, engine_token=ENGINE_TOKEN, log_path=log
    )
    try:
        wait_for(lambda: "valid: 2 lines" in log.read_text())
    finally:
        assert launcher.stop(proc, grace=5) is not None
    assert gateway.commits[work.id]["total"] == 2
    text = log.read_text()
    assert f"lease {work.id} validate batch_{'0' * 24} seq 0: valid: 2 lines, 1 shards, {m}" in text
    assert "HTTP Request" not in text  # one line per lease, not one per request
    assert CREDENTIAL not in text and ENGINE_TOKEN not in text


def test_a_killed_worker_leaves_nothing_behind_and_the_shard_runs_again(
    gateway, fleet, tmp_path: Path
) -> None:
    fleet.set(1, "slow_headers", delay=0.3)
    work = gateway.offer(shard_file(gateway, model(fleet), 10))
    proc = batch_worker.start_process(
        gateway.url, CREDENTIAL, fleet.url(1), 7, engine_token=ENGINE_TOKEN,
        log_path=tmp_path / "w.log", always=True,
    )  # fmt: skip
    try:
        wait_for(lambda: any(r.path == EP for r in fleet.requests(1)))
        os.killpg(proc.pid, 9)  # kill -9 mid-shard
        proc.wait(10)
    finally:
        launcher.stop(proc, grace=1)
    assert not gateway.commits and not gateway.parts  # nothing durable was written
    # the lease expires on the gateway; the same work is leased again (new token) elsewhere
    fleet.set(1, "healthy")
    again = gateway.offer(Work("lines", offset=work.offset, length=work.length,
                               first_line=work.first_line, n_lines=work.n_lines))  # fmt: skip
    run_leases(config(gateway, fleet), 1)
    out = gateway.lines(again, "output")
    assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(10, 20))


def test_cli_refuses_missing_secrets_and_plain_http_to_another_host() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HEADY_NODE_CREDENTIAL", "NODE_TOKEN")}
    cmd = [sys.executable, "-m", "heady_node.cli", "batch-worker", "--gateway"]
    r = subprocess.run([*cmd, "http://gw.example.com"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert "HEADY_NODE_CREDENTIAL" in r.stderr and "https" in r.stderr


def test_node_session_runs_the_worker_when_given_a_gateway(gateway, tmp_path: Path) -> None:
    gateway.offer(Work("validate"))
    gateway.data = b"{bad\n"
    secrets = {"HEADY_GATEWAY_URL": gateway.url, "HEADY_NODE_CREDENTIAL": CREDENTIAL}
    out: list[str] = []
    s = NodeSession(
        node=7, tunnel_kind="none", dry_run=True, log_dir=tmp_path,
        secret=lambda name: secrets.get(name, ""), out=out.append,
    )  # fmt: skip
    try:
        s.preflight()
        s.start_engine()
        assert s.worker_proc is not None
        wait_for(lambda: gateway.commits)
        assert "batch worker EXITED" not in s.status_once()
    finally:
        s.stop()
    assert s.worker_proc is None
    (commit,) = gateway.commits.values()
    assert commit["errors"][0]["line"] == 1
    ask = gateway.asks[0]
    assert ask["idle"] is True and "batch" in ask["models"]  # node 7 serves the batch role
    assert any(x.startswith("Batch worker: pulling batch work from") for x in out)


def test_the_worker_starts_at_the_engines_batch_size() -> None:
    # The session and the fleet give the worker the engine's --max-num-seqs: its batch is full
    # from the first shard (the bench measured the ramp from the default as a lost round).
    argv = batch_worker.worker_argv("https://gw.example", "http://127.0.0.1:8000", 7)
    assert "--concurrency" not in argv
    argv = batch_worker.worker_argv(
        "https://gw.example", "http://127.0.0.1:8000", 7, always=True, concurrency=64
    )
    assert argv[argv.index("--concurrency") + 1] == "64" and "--always" in argv
    args = batch_worker._parser().parse_args(argv[3:])
    assert args.concurrency == 64
