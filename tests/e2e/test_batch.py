"""The Files + Batch API end to end: the official `openai` SDK against the gateway in the real
offline runtime (workerd + Pyodide, R2 and D1 from miniflare, migrations applied by the
harness), and the real node workers (`heady_node.batch_worker`, separate processes with their
node credentials) running the lines on simulated nodes 7 and 8.

One gateway for the module with small batch settings (20-line shards, 4 s leases, 1 s
heartbeats, 200 kB uploads), so a few hundred lines run in seconds. Workers are started per
test after the batch exists (an idle worker backs off its polls) and stopped after it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from harness.gateway import Gateway, build_config
from heady_node import launcher
from heady_node.batch_worker import drain, start_process
from heady_shared.nodeauth import node_credential
from sim.fleet import Fleet
from tests.e2e.conftest import API_KEY, NODE_TOKEN, fleet_bindings

NODE_SECRET = "e2e-node-secret-5f1d2c3b4a"
OTHER_KEY = "other-key"
PAGER_KEY = "pager-key-for-lists"
MAX_FILE_BYTES = 200_000
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Iterator[Gateway]:
    bindings = fleet_bindings(
        fleet,
        GATEWAY_API_KEYS=f"{OTHER_KEY},{API_KEY},{PAGER_KEY}",
        NODE_SECRET=NODE_SECRET,
        MAX_FILE_BYTES=str(MAX_FILE_BYTES),
        SHARD_LINES="20",
        BATCH_LEASE_S="4",
        BATCH_HEARTBEAT_S="1",
    )
    with Gateway(build_config(bindings=bindings)) as g:
        yield g


def sdk(gw: Gateway, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gw.url}/api/heavy/batch/v1", api_key=key, max_retries=0, timeout=30
    )


class Workers:
    """Real batch workers, one process (group) per node, against the sim fleet's node."""

    def __init__(self, gw: Gateway, fleet: Fleet, logs: Path) -> None:
        self.gw, self.fleet, self.logs = gw, fleet, logs
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, *nodes: int) -> None:
        for n in nodes:
            self.procs[n] = start_process(
                self.gw.url,
                node_credential(NODE_SECRET, n),
                self.fleet.url(n),
                n,
                engine_token=NODE_TOKEN,
                log_path=self.logs / f"worker-{n}.log",
            )

    def kill(self, n: int) -> None:
        """SIGKILL: no heartbeat, no commit, no goodbye."""
        proc = self.procs.pop(n)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def log(self, n: int) -> str:
        path = self.logs / f"worker-{n}.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            launcher.stop(proc, grace=5)
        self.procs.clear()


@pytest.fixture
def workers(gw: Gateway, fleet: Fleet, tmp_path: Path) -> Iterator[Workers]:
    fleet.reset()
    w = Workers(gw, fleet, tmp_path)
    try:
        yield w
    finally:
        w.stop()
        fleet.reset()


def requests(n: int, endpoint: str = CHAT, prefix: str = "req", bad=()) -> bytes:
    """JSONL of `n` requests for the `batch` role; lines in `bad` carry a body the engine
    refuses (vLLM answers 400 for an empty `messages` list / `prompt`)."""
    lines = []
    for i in range(n):
        if endpoint == CHAT:
            messages = [] if i in bad else [{"role": "user", "content": f"line {i}"}]
            body = {"model": "batch", "messages": messages, "max_tokens": 4}
        else:
            body = {"model": "batch", "prompt": [] if i in bad else f"line {i}", "max_tokens": 4}
        item = {"custom_id": f"{prefix}-{i}", "method": "POST", "url": endpoint, "body": body}
        lines.append(json.dumps(item))
    return ("\n".join(lines) + "\n").encode()


def wait_for(
    client: openai.OpenAI, batch_id: str, done: Callable[[object], bool], timeout: float = 90
):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if done(b):
            return b
        assert time.monotonic() < deadline, f"batch stuck: {b.status} {b.request_counts}"
        time.sleep(0.3)


def finished(b) -> bool:
    return b.status in ("completed", "failed", "cancelled", "expired")


def served(client: openai.OpenAI, b) -> tuple[Counter, list[dict], list[dict]]:
    """custom_id counts over output and error files, and both files' lines."""

    def lines(file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]

    out, err = lines(b.output_file_id), lines(b.error_file_id)
    return Counter(x["custom_id"] for x in out + err), out, err


def status(gw: Gateway, key: str = API_KEY) -> dict:
    r = httpx.get(f"{gw.url}/api/status", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["batches"]


# ---- the whole path ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_run(gw: Gateway, fleet: Fleet, tmp_path_factory) -> dict:
    """A 150-line chat batch (3 lines the engine refuses) run to completion by nodes 7 and 8."""
    client = sdk(gw)
    bad = {5, 77, 149}
    data = requests(150, bad=bad)
    f = client.files.create(file=("prompts.jsonl", data), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    seen = status(gw)
    fleet.reset()
    w = Workers(gw, fleet, tmp_path_factory.mktemp("chat-workers"))
    w.start(7, 8)
    try:
        done = wait_for(client, b.id, finished)
    finally:
        w.stop()
    return {"file": f, "created": b, "done": done, "bad": bad, "status": seen, "data": data}


def test_chat_batch_runs_on_the_nodes_with_every_line_once(gw, chat_run):
    client = sdk(gw)
    f, b, done = chat_run["file"], chat_run["created"], chat_run["done"]
    assert (
        f.purpose == "batch" and f.bytes == len(chat_run["data"]) and f.filename == "prompts.jsonl"
    )
    assert b.status == "validating" and b.endpoint == CHAT
    assert done.status == "completed", done
    assert done.request_counts.total == 150
    assert done.request_counts.completed == 147 and done.request_counts.failed == 3
    assert done.usage is not None and done.usage.total_tokens > 0
    ids, out, err = served(client, done)
    assert ids == Counter(f"req-{i}" for i in range(150))  # every custom_id exactly once
    assert {x["custom_id"] for x in err} == {f"req-{i}" for i in chat_run["bad"]}
    assert all(x["response"]["status_code"] == 400 for x in err)
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert {x["response"]["body"]["node"] for x in out} <= {7, 8}
    assert all(x["response"]["body"]["object"] == "chat.completion" for x in out)
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output"
    assert out_file.bytes == len(client.files.content(done.output_file_id).content)


def test_status_lists_only_the_callers_open_batches(gw, chat_run):
    seen = chat_run["status"]  # taken right after batches.create, before any worker ran
    assert seen["running"] >= 1
    mine = {b["id"]: b for b in seen["mine"]}
    assert mine[chat_run["created"].id]["status"] == "validating"
    assert mine[chat_run["created"].id]["role"] == "batch"
    other = status(gw, OTHER_KEY)
    assert chat_run["created"].id not in {b["id"] for b in other["mine"]}
    assert chat_run["done"].id not in {b["id"] for b in status(gw)["mine"]}  # finished: gone


def test_completions_batch(gw, workers):
    client = sdk(gw)
    f = client.files.create(file=("c.jsonl", requests(45, COMPLETIONS, "c")), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    workers.start(8)
    done = wait_for(client, b.id, finished)
    assert done.status == "completed" and done.error_file_id is None
    ids, out, _ = served(client, done)
    assert ids == Counter(f"c-{i}" for i in range(45))
    assert all(x["response"]["body"]["object"] == "text_completion" for x in out)


def test_another_key_sees_nothing(gw, chat_run):
    them = sdk(gw, OTHER_KEY)
    done = chat_run["done"]
    for call in (
        lambda: them.files.retrieve(chat_run["file"].id),
        lambda: them.files.content(done.output_file_id),
        lambda: them.files.content(chat_run["file"].id),
        lambda: them.batches.retrieve(done.id),
        lambda: them.batches.cancel(done.id),
        lambda: them.files.delete(done.output_file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert done.id not in {b.id for b in them.batches.list()}
    assert chat_run["file"].id not in {f.id for f in them.files.list()}


# ---- lists, retrieve, delete ------------------------------------------------------------------


def test_lists_paginate_with_after_and_has_more(gw):
    client = sdk(gw, PAGER_KEY)
    made = [
        client.files.create(file=(f"p{i}.jsonl", requests(1, prefix=f"p{i}")), purpose="batch")
        for i in range(5)
    ]
    # Newest first: created_at (whole seconds) descending, ties by id: one page holds it all.
    whole = [f.id for f in client.files.list().data]
    assert sorted(whole) == sorted(f.id for f in made)
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == whole[:2] and page.has_more
    assert [f.id for f in client.files.list(limit=2)] == whole  # the SDK follows `after`
    second = client.files.list(limit=2, after=page.data[-1].id)
    assert [f.id for f in second.data] == whole[2:4] and second.has_more
    last = client.files.list(limit=2, after=whole[3])
    assert [f.id for f in last.data] == whole[4:] and not last.has_more
    asc = client.files.list(order="asc", purpose="batch")
    assert [f.id for f in asc.data] == whole[::-1]
    with pytest.raises(openai.BadRequestError):
        client.files.list(limit=0)

    batches = [
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        for f in made[:3]
    ]
    order = [b.id for b in client.batches.list(limit=100).data]
    assert sorted(order) == sorted(b.id for b in batches)
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == order[:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == order[2:] and not rest.has_more
    assert [b.id for b in client.batches.list(limit=1)] == order  # walked page by page
    for b in batches:  # nobody leased them: cancelled at once
        assert client.batches.cancel(b.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batches[0].id)  # a finished batch cannot be cancelled


def test_retrieve_delete_and_a_batch_on_a_deleted_file(gw):
    client = sdk(gw)
    f = client.files.create(file=("gone.jsonl", requests(3)), purpose="batch")
    got = client.files.retrieve(f.id)
    assert got.id == f.id and got.bytes == f.bytes and got.status == "processed"
    assert client.files.content(f.id).content == requests(3)
    deleted = client.files.delete(f.id)
    assert deleted.deleted is True and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(f.id)
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert exc.value.body["code"] == "file_not_found"
    assert exc.value.body["param"] == "input_file_id"

    # The cron also runs the batch housekeeping, and says so in its log line.
    gw.scheduled()
    (probe,) = [x for x in gw.log_records() if x.get("msg") == "probe"][-1:]
    assert isinstance(probe["batches_moved"], int)


# ---- bad input ----------------------------------------------------------------------------------


def test_an_invalid_input_file_fails_with_line_numbers(gw, workers):
    client = sdk(gw)
    good = [json.loads(x) for x in requests(4).splitlines()]
    lines = [
        json.dumps(good[0]),
        json.dumps({**good[1], "custom_id": 7}),  # line 2: custom_id not a string
        json.dumps({**good[2], "url": COMPLETIONS}),  # line 3: not the batch's endpoint
        "not json at all",  # line 4
        json.dumps({**good[3], "custom_id": "req-0"}),  # line 5: duplicate
    ]
    f = client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    workers.start(7)
    done = wait_for(client, b.id, finished)
    assert done.status == "failed" and done.failed_at
    assert done.output_file_id is None and done.error_file_id is None
    got = {(e.line, e.code) for e in done.errors.data}
    assert {
        (2, "invalid_custom_id"),
        (3, "invalid_url"),
        (4, "invalid_json_line"),
        (5, "duplicate_custom_id"),
    } <= got


def test_upload_refusals(gw):
    client = sdk(gw)
    with pytest.raises(openai.BadRequestError) as exc:  # not JSONL: refused at once
        client.files.create(file=("notes.jsonl", b"hello, this is prose\n"), purpose="batch")
    assert exc.value.body["code"] == "invalid_file"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", requests(1)), purpose="nonsense")
    assert exc.value.body["param"] == "purpose"

    # Over MAX_FILE_BYTES by Content-Length: 413 before the body is read. Sent by hand, head
    # only, so the answer provably comes without a byte of the body.
    head = (
        "POST /api/heavy/batch/v1/files HTTP/1.1\r\nhost: gw\r\n"
        f"authorization: Bearer {API_KEY}\r\n"
        "content-type: multipart/form-data; boundary=xyz\r\n"
        f"content-length: {MAX_FILE_BYTES + 1}\r\n\r\n"
    )
    status_line, answer = raw(gw, head)
    assert " 413 " in status_line
    assert answer["error"]["code"] == "file_too_large" and answer["error"]["request_id"]

    # No Content-Length (a chunked upload): 411.
    def chunks():
        yield b"--xyz\r\n"

    r = httpx.post(
        f"{gw.url}/api/heavy/batch/v1/files",
        content=chunks(),
        headers={
            "authorization": f"Bearer {API_KEY}",
            "content-type": "multipart/form-data; boundary=xyz",
        },
        timeout=30,
    )
    assert r.status_code == 411 and r.json()["error"]["code"] == "length_required"

    # Unknown endpoints below /v1/files stay the gateway's (never forwarded to a node).
    r = httpx.get(
        f"{gw.url}/api/heavy/batch/v1/files/a/b/c",
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 404 and "x-heady-node" not in r.headers


def raw(gw: Gateway, head: str) -> tuple[str, dict]:
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return head_bytes.split(b"\r\n")[0].decode(), json.loads(body)


# ---- the node API's door ------------------------------------------------------------------------


def test_node_api_takes_node_credentials_only(gw):
    cred = node_credential(NODE_SECRET, 7)
    lease = f"{gw.url}/api/nodes/v1/leases"
    body = {"models": ["batch"], "idle": True}
    with httpx.Client(timeout=30) as http:
        for key in (API_KEY, None, node_credential("another-secret", 7), cred + "0"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = http.post(lease, json=body, headers=headers)
            assert r.status_code == 401, (key, r.text)
            assert r.json()["error"]["request_id"] and r.headers["www-authenticate"] == "Bearer"
        # a node credential is no client key
        r = http.get(
            f"{gw.url}/api/heavy/batch/v1/files", headers={"authorization": f"Bearer {cred}"}
        )
        assert r.status_code == 401
        assert sdk(gw).files.list(limit=1)  # ... and the client key works there

        auth = {"authorization": f"Bearer {cred}"}
        r = http.post(lease, content=b"{not json", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"
        r = http.post(lease, json={"models": "batch"}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "models"
        r = http.post(f"{lease}/lease_nope/commit", json={"token": "t"}, headers=auth)
        assert r.status_code == 409 and r.json()["error"]["code"] == "lease_lost"
        r = http.post(f"{lease}/lease_nope/commit", json=[1], headers=auth)
        assert r.status_code == 400
        r = http.post(f"{lease}/lease_nope/heartbeat", json={"token": "t"}, headers=auth)
        assert r.status_code == 409
        r = http.get(f"{lease}/lease_nope/input", headers=auth)
        assert r.status_code == 400  # no lease token header
        r = http.get(f"{lease}/lease_nope/input", headers={**auth, "x-heady-lease-token": "t"})
        assert r.status_code == 409
        r = http.put(f"{lease}/lease_nope/results/output", content=b"x", headers=auth)
        assert r.status_code == 400
        r = http.put(f"{lease}/lease_nope/results/everything", content=b"x", headers=auth)
        assert r.status_code == 404
        r = http.get(f"{gw.url}/api/nodes/v1/elsewhere", headers=auth)
        assert r.status_code == 404
    logged = [x for x in gw.log_records() if str(x.get("route", "")).startswith("/api/nodes/")]
    assert logged and all(x.get("status") != 500 for x in logged)


# ---- the harness's migrations ------------------------------------------------------------------


def test_a_persisted_database_is_migrated_once(fleet, tmp_path):
    """As `wrangler d1 migrations apply`: applied on first start, recorded, not again."""
    cfg = build_config(bindings=fleet_bindings(fleet), persist=str(tmp_path / "state" / "kv"))
    with Gateway(cfg) as first:
        assert any("applied migrations 0001_batches.sql" in x for x in first.lines)
        f = sdk(first).files.create(file=("kept.jsonl", requests(2)), purpose="batch")
    with Gateway(cfg) as second:
        assert not any("applied migrations" in x for x in second.lines)
        assert sdk(second).files.retrieve(f.id).bytes == f.bytes


# ---- cancel and node death --------------------------------------------------------------------


def test_cancel_keeps_the_partial_output(gw, fleet, workers):
    client = sdk(gw)
    fleet.set_capacity(7, max_num_seqs=4, token_s=0.05)  # ~0.2 s a line, 4 at a time
    f = client.files.create(file=("slow.jsonl", requests(200, prefix="k")), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    workers.start(7)
    wait_for(client, b.id, lambda x: x.request_counts.completed >= 20)
    cancelling = client.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(client, b.id, finished, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at
    ids, out, _ = served(client, done)
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert 20 <= done.request_counts.completed < 200
    assert sum(ids.values()) == len(ids) == done.request_counts.completed
    assert set(ids) <= {f"k-{i}" for i in range(200)}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(b.id)


def test_a_worker_killed_mid_shard_loses_no_line(gw, fleet, workers):
    client = sdk(gw)
    fleet.set_capacity(7, max_num_seqs=2, token_s=0.1)  # node 7 slow: its shard is mid-way
    f = client.files.create(file=("chaos.jsonl", requests(120, prefix="x")), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    workers.start(7)

    def held_by_7() -> list[int]:
        mine = {x["id"]: x for x in status(gw)["mine"]}
        holders = mine.get(b.id, {}).get("holders", [])
        return [h["seq"] for h in holders if h["node"] == 7 and h["kind"] == "lines"]

    deadline = time.monotonic() + 60
    while not held_by_7():  # until node 7 holds a shard of lines (the status page's view)
        assert time.monotonic() < deadline, "node 7 never leased a shard"
        time.sleep(0.2)
    time.sleep(0.5)  # some of its lines have run
    seqs = held_by_7()
    workers.kill(7)
    assert seqs
    # mid-shard: node 7's engine had been given lines of it (they run again on node 8)
    assert any(r.path == CHAT for r in fleet.requests(7))
    workers.start(8)
    done = wait_for(client, b.id, finished, timeout=90)
    assert done.status == "completed", done
    ids, _, _ = served(client, done)
    assert ids == Counter(f"x-{i}" for i in range(120))  # each exactly once
    assert done.request_counts.completed == 120
    # node 8 took the dead node's shards over once their leases lapsed (BATCH_LEASE_S = 4)
    for seq in seqs:
        assert f"{b.id} seq {seq}: committed" in workers.log(8), workers.log(8)


def test_a_drained_worker_commits_its_running_lines_and_hands_the_rest_over(gw, fleet, workers):
    client = sdk(gw)
    fleet.set_capacity(7, max_num_seqs=4, token_s=0.05)  # node 7: 4 lines at a time
    f = client.files.create(file=("drain.jsonl", requests(120, prefix="d")), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    # Lines in flight as many as the engine runs at once (what the node session passes):
    # lines waiting in the engine's queue count as running for the worker too.
    workers.procs[7] = start_process(
        gw.url, node_credential(NODE_SECRET, 7), fleet.url(7), 7, engine_token=NODE_TOKEN,
        log_path=workers.logs / "worker-7.log", concurrency=4,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while sum(r.path == CHAT for r in fleet.requests(7)) < 6:  # mid-shard
        assert time.monotonic() < deadline, "node 7 never ran lines"
        time.sleep(0.05)
    assert drain(workers.procs.pop(7), timeout_s=30) is True  # exit 0: all committed or back
    log7 = workers.log(7)
    cut = re.search(rf"{b.id} seq (\d+): drained, gave back (\d+) lines, committed: (\d+)/", log7)
    assert cut, log7
    seq, back, kept = (int(x) for x in cut.groups())
    ran_on_7 = sum(r.path == CHAT for r in fleet.requests(7))
    workers.start(8)
    done = wait_for(client, b.id, finished, timeout=90)
    assert done.status == "completed", done
    ids, out, _ = served(client, done)
    assert ids == Counter(f"d-{i}" for i in range(120))  # each exactly once
    assert all(x["response"]["status_code"] == 200 for x in out)
    # node 7's running lines were committed by node 7 (none ran again); the rest of its shard
    # came back as a work item of its own, which node 8 leased and committed.
    assert ran_on_7 == kept and sum(r.path == CHAT for r in fleet.requests(8)) == 120 - kept
    assert f"{b.id} seq {seq}: committed: {back}/{back} lines" in workers.log(8)
