"""work.release: a node handing its GPU over gives back at once what it will not run. The whole
lease (lines 0), or all but a prefix it keeps and commits as usual; stale tokens change
nothing; every custom_id still ends up in the batch's files exactly once."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import batches
import work
from jobdb import BatchSettings
from tests.support.batchkit import Gateway, custom_ids, jsonl
from tests.support.plans import recorded, table_scans
from tests.support.stores import drive
from tests.unit.test_work import ME, running

S5 = BatchSettings(shard_lines=5)


def prefix_bytes(data: bytes, lines: int) -> int:
    """Where a shard's first `lines` lines end (what the worker sends as `bytes`)."""
    at = 0
    for _ in range(lines):
        at = data.index(b"\n", at) + 1
    return at


def served_ids(g: Gateway, batch_id: str) -> Counter:
    b = g.batch(ME, batch_id)
    got: Counter = Counter()
    for key in ("output_file_id", "error_file_id"):
        if b[key]:
            got.update(json.loads(x)["custom_id"] for x in g.content(ME, b[key]).splitlines())
    return got


def test_give_back_the_rest_then_commit_the_kept_lines() -> None:
    g, batch_id = running(12, S5)
    a = g.lease(7)
    data = g.read_input(a)
    cut = prefix_bytes(data, 2)
    r = g.release(a, 2, cut)
    assert r.status == 200 and r.body == {"state": "leased", "n_lines": 2, "bytes": cut}
    # The rest is leasable by the partner now, long before a's lease would lapse.
    b = g.lease(8)
    assert (b["seq"], b["first_line"], b["n_lines"]) == (1, 2, 3)
    assert g.read_input(b) == data[cut:]
    # a runs on over its two lines (heartbeats still count) and commits them, not five.
    assert g.heartbeat(a).status == 200
    assert g.read_input(a) == data[:cut]
    g.put(a, "output", data)
    five = g.commit(a, {"completed": 5, "failed": 0})  # five lines are no longer a's to commit
    assert five.status == 400 and "2 lines" in five.body["error"]["message"]
    assert g.run_shard(a).status == 200
    assert g.run_shard(b).status == 200
    g.drain(8)
    assert g.batch(ME, batch_id)["status"] == "completed"
    assert served_ids(g, batch_id) == Counter(custom_ids(jsonl(12)))
    counts = g.batch(ME, batch_id)["request_counts"]
    assert counts["completed"] + counts["failed"] == counts["total"] == 12
    # The output file keeps input order across the cut (same seq, ordered by first line).
    out = g.content(ME, g.batch(ME, batch_id)["output_file_id"])
    ids = [json.loads(x)["custom_id"] for x in out.splitlines()]
    assert ids == sorted(ids, key=lambda c: int(c.split("-")[1]))


def test_give_back_everything() -> None:
    g, batch_id = running(7, BatchSettings(shard_lines=3))
    a = g.lease(7)
    g.put(a, "output", b"garbage\n")  # uploaded before the node stopped: never served
    r = g.release(a, 0)
    assert r.status == 200 and r.body == {"state": "released"}
    assert not any(a["id"] in k for k in g.blobs.objects)
    b = g.lease(8)
    assert (b["seq"], b["n_lines"]) == (a["seq"], a["n_lines"]) and b["id"] != a["id"]
    # a's token is stale everywhere now.
    assert g.heartbeat(a).status == 409
    assert g.commit(a, {"completed": 3, "failed": 0}).status == 409
    assert g.release(a, 0).status == 409
    assert g.run_shard(b).status == 200
    assert g.drain(8) >= 1
    assert served_ids(g, batch_id) == Counter(custom_ids(jsonl(7)))


def test_a_validate_lease_is_given_back_whole_only() -> None:
    g = Gateway(S5)
    g.create_batch(ME, g.upload(ME, jsonl(4)).body["id"])
    v = g.lease(7)
    assert v["kind"] == "validate"
    assert g.release(v, 1, 10).status == 400
    assert g.release(v, 0).status == 200
    assert g.lease(8)["kind"] == "validate"


def test_stale_and_malformed_releases_change_nothing() -> None:
    g, _ = running(12, S5)
    a = g.lease(7)
    data = g.read_input(a)
    cut = prefix_bytes(data, 2)
    before = g.db.rows("SELECT * FROM work ORDER BY id")
    assert g.release(a, 2, cut, token="forged").status == 409
    for lines, size in ((6, cut), (2, 0), (2, len(data)), (2, len(data) + 1), (5, cut)):
        r = g.release(a, lines, size)
        assert r.status == 400 and r.body["error"]["code"] == "invalid_body", (lines, size)
    for bad in ({"lines": -1}, {"lines": "2"}, {"lines": 1, "bytes": True}, {}, {"lines": None}):
        raw = json.dumps({"token": a["token"], **bad}).encode()
        r = drive(work.release(g.db, g.blobs, g.ids, a["id"], raw, g.now))
        assert r.status == 400, bad
    for raw in (b"not json", b"[]", json.dumps({"lines": 0}).encode()):
        assert drive(work.release(g.db, g.blobs, g.ids, a["id"], raw, g.now)).status == 400
    keep_all = g.release(a, 5, len(data))
    assert keep_all.status == 200 and keep_all.body["n_lines"] == 5  # nothing to give back
    assert g.db.rows("SELECT * FROM work ORDER BY id") == before


def test_a_lapsed_and_taken_over_lease_cannot_give_back() -> None:
    g, _ = running(12, S5)
    a = g.lease(7)
    g.now += S5.lease_s + 1
    b = g.lease(8)
    assert b["seq"] == a["seq"]
    before = g.db.rows("SELECT * FROM work ORDER BY id")
    assert g.release(a, 0).status == 409
    assert g.release(a, 1, prefix_bytes(g.read_input(b), 1)).status == 409
    assert g.db.rows("SELECT * FROM work ORDER BY id") == before


def test_a_retried_cut_is_a_no_op() -> None:
    g, _ = running(12, S5)
    a = g.lease(7)
    cut = prefix_bytes(g.read_input(a), 3)
    assert g.release(a, 3, cut).status == 200
    again = g.release(a, 3, cut)
    assert again.status == 200 and again.body["n_lines"] == 3
    rows = g.db.rows(
        "SELECT n_lines FROM work WHERE kind = 'lines' AND seq = 1 ORDER BY first_line"
    )
    assert rows == [{"n_lines": 3}, {"n_lines": 2}]  # cut once, not twice


@pytest.mark.parametrize("keep", [0, 2])
def test_given_back_while_cancelling_is_cancelled_and_the_batch_closes(keep: int) -> None:
    g, batch_id = running(5, S5)
    a = g.lease(7)
    data = g.read_input(a)
    assert drive(batches.cancel_batch(g.db, g.ids, ME, batch_id, g.now)).status == 200
    assert g.release(a, keep, prefix_bytes(data, keep)).status == 200
    assert g.lease(8) is None  # nothing given back is run any more
    if keep:
        assert g.run_shard(a, upto=keep, partial=True).status == 200
    b = g.batch(ME, batch_id)
    assert b["status"] == "cancelled"
    assert sum(served_ids(g, batch_id).values()) == keep


def test_release_statements_use_an_index() -> None:
    g, _ = running(12, S5)
    with recorded(g.db) as seen:
        a = g.lease(7)
        assert g.release(a, 2, prefix_bytes(g.read_input(a), 2)).status == 200
        b = g.lease(8)
        assert g.release(b, 0).status == 200
    released = {
        sql: p for sql, p in seen.items() if "n_lines - ?" in sql or "expires_at = NULL" in sql
    }
    assert len(released) == 2
    assert not table_scans(g.db, released)
