"""More of the Batch API end to end (workerd + Pyodide, the `openai` SDK, real batch workers on
simulated nodes; helpers from tests/e2e/test_batch.py): a batch past its completion window.

Expiry. The window is 24 h (`batches.WINDOW_S`) and the gateway reads the wall clock
(`api_shell.now`), so no setting brings it closer. What a test can move is the batch's own
`expires_at`: the gateway runs on a persisted D1 database (as `make dev` does), is stopped
mid-batch, the batch rows' `expires_at` is set one second into the past with sqlite3 (the
persisted D1 is a SQLite file), and a second gateway on the same state takes over. Everything
after that is the gateway's own expiry path: the lease query's window check, the lazy settle
on a read, the cron's `batches.expire_due`, the close over the done shards.

Embeddings batches have no e2e here: the simulated vLLM nodes serve no `/v1/embeddings`
(sim/node/vllm.py `ROUTES` has none; an unknown path answers 404 `{"detail": "Not Found"}`),
so there is no embedding answer to check the shape of.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from harness.gateway import Gateway, build_config
from heady_shared.nodeauth import node_credential
from sim.fleet import Fleet
from tests.e2e.conftest import fleet_bindings
from tests.e2e.test_batch import (
    CHAT,
    NODE_SECRET,
    Workers,
    requests,
    sdk,
    served,
    status,
    wait_for,
)

SHARD = 20
LINES = 100


def persisted(fleet: Fleet, state: Path) -> dict:
    """The gateway config of tests/e2e/test_batch.py (20-line shards, 4 s leases), with KV,
    R2 and D1 kept under `state` so a second gateway takes over the first one's batches."""
    bindings = fleet_bindings(
        fleet,
        NODE_SECRET=NODE_SECRET,
        SHARD_LINES=str(SHARD),
        BATCH_LEASE_S="4",
        BATCH_HEARTBEAT_S="1",
    )
    return build_config(bindings=bindings, persist=str(state / "kv"))


def move_expiry(state: Path, batch_ids: list[str], expires_at: int) -> None:
    """Set the batches' `expires_at` in the stopped gateway's persisted D1 (miniflare keeps
    each D1 database as one SQLite file under d1/)."""
    (path,) = [p for p in (state / "d1").rglob("*.sqlite") if p.is_file()]
    with sqlite3.connect(path) as db:
        marks = ",".join("?" * len(batch_ids))
        cur = db.execute(
            f"UPDATE batches SET expires_at = ? WHERE id IN ({marks})", (expires_at, *batch_ids)
        )
        assert cur.rowcount == len(batch_ids)
    db.close()  # the context manager commits; the file must be closed before workerd opens it


def test_a_batch_past_its_window_expires_and_keeps_its_finished_shards(fleet, tmp_path):
    state = tmp_path / "state"
    cfg = persisted(fleet, state)
    fleet.reset()
    fleet.set_capacity(7, max_num_seqs=2, token_s=0.1)  # node 7 slow: the batch is mid-way
    with Gateway(cfg) as first:
        client = sdk(first)
        f = client.files.create(file=("e.jsonl", requests(LINES, prefix="e")), purpose="batch")
        running = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        assert running.expires_at == running.created_at + 24 * 3600
        workers = Workers(first, fleet, tmp_path)
        try:
            workers.start(7)
            wait_for(client, running.id, lambda b: b.request_counts.completed >= SHARD)
            workers.kill(7)  # node 7 dies holding a lease: nobody will finish the batch
        finally:
            workers.stop()
        at_kill = client.batches.retrieve(running.id)
        assert at_kill.status == "in_progress", at_kill
        kept = at_kill.request_counts.completed
        assert kept % SHARD == 0 and SHARD <= kept < LINES  # whole shards only
        # A second batch nobody ever leased: still validating when its window ends.
        g = client.files.create(file=("v.jsonl", requests(3, prefix="v")), purpose="batch")
        waiting = client.batches.create(input_file_id=g.id, endpoint=CHAT, completion_window="24h")
        assert waiting.status == "validating"
    fleet.reset()

    past = int(time.time()) - 1
    move_expiry(state, [running.id, waiting.id], past)

    with Gateway(cfg) as second:
        client = sdk(second)
        # The lease query skips batches past their window: both batches still have open work
        # (pending shards, node 7's lapsed lease, the validation), none of it is handed out.
        r = httpx.post(
            f"{second.url}/api/nodes/v1/leases",
            json={"models": ["batch"], "idle": False},
            headers={"authorization": f"Bearer {node_credential(NODE_SECRET, 8)}"},
            timeout=30,
        )
        assert r.status_code == 204, r.text

        # A read settles a batch lazily: validating -> expired, nothing to serve.
        v = client.batches.retrieve(waiting.id)
        assert v.status == "expired" and v.expired_at is not None and v.expired_at >= past
        assert v.output_file_id is None and v.error_file_id is None
        assert v.request_counts.total == 0 and v.in_progress_at is None

        # The cron settles the other one (the one batch it moves; the read moved the first).
        second.scheduled()
        probe = [x for x in second.log_records() if x.get("msg") == "probe"][-1]
        assert probe["batches_moved"] == 1, probe

        done = client.batches.retrieve(running.id)
        assert done.status == "expired", done
        assert done.expires_at == past and done.expired_at >= past
        assert done.completed_at is None and done.cancelled_at is None
        assert done.failed_at is None and done.in_progress_at is not None
        # request_counts are the done shards' lines; the dropped ones count nowhere.
        assert done.request_counts.total == LINES
        assert done.request_counts.completed == kept and done.request_counts.failed == 0
        assert done.usage is not None and done.usage.total_tokens > 0

        # The output file holds the finished requests, each once (OpenAI: "any responses to
        # completed requests are made available via the batch's output file").
        ids, out, err = served(client, done)
        assert len(out) == kept and sum(ids.values()) == len(ids) == kept
        assert set(ids) <= {f"e-{i}" for i in range(LINES)}
        assert all(x["response"]["status_code"] == 200 for x in out)
        assert all(x["response"]["body"]["object"] == "chat.completion" for x in out)
        assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
        # No error file: the dropped requests get no line. OpenAI writes each one to the
        # error file with error.code `batch_expired` (BatchRequestOutput.error); the gateway
        # does not (yet). Pinned here so that a change to it is deliberate.
        assert err == [] and done.error_file_id is None

        # Finished: not cancellable, gone from the status page's open batches.
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(done.id)
        assert {running.id, waiting.id}.isdisjoint(b["id"] for b in status(second)["mine"])
        assert all(x.get("status") != 500 for x in second.log_records())
