"""batches.status_view: /api/status's `batches` over real SQLite. Only the caller's open
batches, newest first, at most 20; shard progress and current holders; every statement uses
an index."""

from __future__ import annotations

import batches
from jobdb import BatchSettings
from tests.support.batchkit import Gateway, jsonl
from tests.support.plans import recorded, table_scans
from tests.support.stores import drive

ME, OTHER = "a" * 16, "b" * 16
ALLOWED_SCANS = ("SCAN json_each", "SCAN CONSTANT ROW")


def view(g: Gateway, owner: str = ME) -> dict:
    return drive(batches.status_view(g.db, owner, g.now))


def new_batch(g: Gateway, owner: str, lines: int = 7) -> str:
    f = g.upload(owner, jsonl(lines)).body
    r = g.create_batch(owner, f["id"])
    assert r.status == 200, r.body
    return r.body["id"]


def test_empty() -> None:
    assert view(Gateway()) == {"running": 0, "mine": []}


def test_progress_holders_and_ownership() -> None:
    g = Gateway(BatchSettings(shard_lines=3))
    mine = new_batch(g, ME)
    theirs = new_batch(g, OTHER)
    out = view(g)
    assert out["running"] == 2
    assert [b["id"] for b in out["mine"]] == [mine]  # never another key's ids
    (b,) = out["mine"]
    assert b["status"] == "validating" and b["role"] == "batch" and b["model"] is None
    assert b["shards"] == {"total": 0, "pending": 0, "leased": 0, "done": 0}
    assert b["holders"] == []

    v = g.lease(7)  # the oldest batch's validation: mine
    assert v["batch_id"] == mine
    (holder,) = view(g)["mine"][0]["holders"]
    assert holder["node"] == 7 and holder["kind"] == "validate" and holder["seq"] == 0
    assert g.validate(v).status == 200

    s1 = g.lease(8)
    assert s1["batch_id"] == theirs and s1["kind"] == "validate"
    s1 = g.lease(8)
    assert s1["batch_id"] == mine and s1["seq"] == 1
    assert g.run_shard(s1).status == 200
    s2 = g.lease(7)
    b = view(g)["mine"][0]
    assert b["status"] == "in_progress" and b["model"]
    assert b["shards"] == {"total": 3, "pending": 1, "leased": 1, "done": 1}
    assert b["request_counts"]["total"] == 7
    assert b["request_counts"]["completed"] + b["request_counts"]["failed"] == 3
    assert b["holders"] == [
        {"node": 7, "seq": 2, "kind": "lines", "lines": 3, "expires_at": int(s2["expires_at"])}
    ]
    # a lapsed lease is not held by anybody any more
    g.now += g.settings.lease_s + 1
    assert view(g)["mine"][0]["holders"] == []


def test_finished_batches_leave_and_at_most_twenty_newest_first() -> None:
    g = Gateway(BatchSettings(shard_lines=50))
    done = new_batch(g, ME, lines=2)
    g.drain(7)
    assert g.batch(ME, done)["status"] == "completed"
    ids = []
    for _ in range(22):
        g.now += 1
        ids.append(new_batch(g, ME, lines=1))
    out = view(g)
    assert out["running"] == 22
    assert [b["id"] for b in out["mine"]] == ids[::-1][:20]
    assert view(g, OTHER)["mine"] == []


def test_every_statement_uses_an_index() -> None:
    g = Gateway(BatchSettings(shard_lines=3))
    new_batch(g, ME)
    g.lease(7)
    with recorded(g.db) as seen:
        view(g)
    assert len(seen) == 4
    assert not table_scans(g.db, seen, ALLOWED_SCANS)
