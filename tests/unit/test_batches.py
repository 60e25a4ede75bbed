"""batches.py: create (and its refusals), the lifecycle to completed / failed / cancelled /
expired with nodes simulated over the core, list pagination as the SDK walks it, ownership.
Every Batch object is checked by the openai SDK's own pydantic model."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from openai.types import Batch

import batches
import files
from jobdb import BatchSettings
from tests.support.batchkit import MODEL, Gateway, custom_ids, fails, jsonl
from tests.support.stores import drive

ME, OTHER = "a" * 16, "b" * 16
S3 = BatchSettings(shard_lines=3)


def new_batch(g: Gateway, lines: int = 10, **extra) -> tuple[bytes, dict]:
    data = jsonl(lines)
    f = g.upload(ME, data)
    r = g.create_batch(ME, f.body["id"], **extra)
    assert r.status == 200, r.body
    Batch.model_validate(r.body)
    return data, r.body


def served_ids(g: Gateway, b: dict) -> Counter:
    got: Counter = Counter()
    for key in ("output_file_id", "error_file_id"):
        if b[key]:
            blob = g.content(ME, b[key])
            got.update(json.loads(line)["custom_id"] for line in blob.splitlines())
    return got


def test_created_batch_shape() -> None:
    g = Gateway()
    _, b = new_batch(g, metadata={"team": "x"})
    assert b["status"] == "validating" and b["object"] == "batch"
    assert b["id"].startswith("batch_") and len(b["id"]) == 30
    assert b["expires_at"] == b["created_at"] + 24 * 3600
    assert b["metadata"] == {"team": "x"}
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert b["errors"] is None and b["output_file_id"] is None and b["model"] is None


def test_full_run_completes_with_every_line_once() -> None:
    g = Gateway(S3)
    data, b = new_batch(g, lines=10, output_expires_after={"anchor": "created_at", "seconds": 3600})
    assert g.drain(7) == 1 + 4  # the validation, then 4 shards (3+3+3+1 lines)
    done = g.batch(ME, b["id"])
    Batch.model_validate(done)
    assert done["status"] == "completed" and done["model"] == MODEL
    n_failed = sum(fails(c) for c in custom_ids(data))
    assert done["request_counts"] == {"total": 10, "completed": 10 - n_failed, "failed": n_failed}
    assert done["in_progress_at"] and done["finalizing_at"] and done["completed_at"]
    assert served_ids(g, done) == Counter(custom_ids(data))
    out = drive(files.get_file(g.db, ME, done["output_file_id"], g.now)).body
    assert out["purpose"] == "batch_output" and out["expires_at"] == int(g.now) + 3600
    assert done["usage"]["input_tokens"] == 30 and done["usage"]["total_tokens"] == 30 + 2 * (
        10 - n_failed
    )
    # Output lines are served exactly as the node wrote them, in shard order.
    lines = g.content(ME, done["output_file_id"]).splitlines()
    assert all(json.loads(x)["response"]["status_code"] == 200 for x in lines)
    assert drive(files.file_content(g.db, OTHER, done["output_file_id"], g.now)).status == 404


def test_only_failures_means_no_output_file() -> None:
    g = Gateway(S3)
    _, b = new_batch(g, lines=1)
    validate = g.lease(7)
    assert g.validate(validate).status == 200
    shard = g.lease(7)
    g.put(shard, "error", b'{"custom_id": "req-0"}\n')
    assert g.commit(shard, {"completed": 0, "failed": 1}).status == 200
    done = g.batch(ME, b["id"])
    assert done["output_file_id"] is None and done["error_file_id"]
    assert done["request_counts"] == {"total": 1, "completed": 0, "failed": 1}


def test_invalid_input_fails_with_line_errors() -> None:
    g = Gateway()
    _, b = new_batch(g)
    lease = g.lease(7)
    errors = [
        {"code": "invalid_json_line", "line": 3, "message": "line 3 is not JSON", "param": None},
        {"code": "duplicate_custom_id", "line": 5, "message": "again", "param": "custom_id"},
    ]
    assert g.commit(lease, {"ok": False, "errors": errors}).status == 200
    failed = g.batch(ME, b["id"])
    Batch.model_validate(failed)
    assert failed["status"] == "failed" and failed["failed_at"] == int(g.now)
    assert failed["errors"] == {"object": "list", "data": errors}
    assert g.lease(7) is None  # nothing left to do


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"endpoint": "/v1/images/edits"}, "endpoint", "invalid_value"),
        ({"completion_window": "48h"}, "completion_window", "invalid_value"),
        ({"input_file_id": None}, "input_file_id", "missing_required_parameter"),
        ({"input_file_id": "file-nope"}, "input_file_id", "file_not_found"),
        ({"metadata": {"k": "v" * 513}}, "metadata", "invalid_value"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "invalid_value"),
        (
            {"output_expires_after": {"anchor": "x", "seconds": 4000}},
            "output_expires_after",
            "invalid_value",
        ),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": True}},
            "output_expires_after",
            "invalid_value",
        ),
    ],
)
def test_create_refusals(change: dict, param: str, code: str) -> None:
    g = Gateway()
    fid = g.upload(ME, jsonl(2)).body["id"]
    body = {
        "input_file_id": fid,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        **change,
    }
    r = drive(batches.create_batch(g.db, g.ids, ME, "batch", json.dumps(body), g.now))
    assert r.status == 400, r.body
    assert (r.body["error"]["param"], r.body["error"]["code"]) == (param, code)


@pytest.mark.parametrize("raw", [b"{", b"[]", b"\xff", "null"])
def test_create_malformed_bodies(raw: object) -> None:
    g = Gateway()
    r = drive(batches.create_batch(g.db, g.ids, ME, "batch", raw, g.now))
    assert r.status == 400 and r.body["error"]["type"] == "invalid_request_error"


def test_input_file_must_be_mine_live_and_for_batch() -> None:
    g = Gateway()
    mine = g.upload(ME, jsonl(2)).body["id"]
    theirs = g.upload(OTHER, jsonl(2)).body["id"]
    other_purpose = g.upload(ME, jsonl(2), purpose="fine-tune").body["id"]
    assert g.create_batch(ME, theirs).body["error"]["code"] == "file_not_found"
    assert g.create_batch(ME, other_purpose).body["error"]["code"] == "invalid_file"
    drive(files.delete_file(g.db, g.blobs, ME, mine, g.now))
    assert g.create_batch(ME, mine).status == 400


def test_another_owner_gets_404() -> None:
    g = Gateway()
    _, b = new_batch(g)
    for call in (
        batches.get_batch(g.db, g.ids, OTHER, b["id"], g.now),
        batches.cancel_batch(g.db, g.ids, OTHER, b["id"], g.now),
    ):
        r = drive(call)
        assert r.status == 404 and r.body["error"]["code"] == "batch_not_found"
    assert drive(batches.list_batches(g.db, g.ids, OTHER, g.now)).body["data"] == []


def test_list_newest_first_cursor_pages() -> None:
    g = Gateway()
    made = []
    for i in range(12):
        g.now += i % 2  # pairs share a second
        made.append(new_batch(g, lines=1)[1]["id"])
    seen, after = [], None
    while True:
        page = drive(batches.list_batches(g.db, g.ids, ME, g.now, after=after, limit="5")).body
        [Batch.model_validate(b) for b in page["data"]]
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == sorted(made) and len(seen) == 12
    created = [g.batch(ME, i)["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)
    default = drive(batches.list_batches(g.db, g.ids, ME, g.now)).body
    assert len(default["data"]) == 12 and default["has_more"] is False
    assert drive(batches.list_batches(g.db, g.ids, ME, g.now, limit="101")).status == 400
    assert drive(batches.list_batches(g.db, g.ids, ME, g.now, after="batch_x")).status == 400


def cancel(g: Gateway, batch_id: str):
    return drive(batches.cancel_batch(g.db, g.ids, ME, batch_id, g.now))


def test_cancel_while_validating_with_nobody_leasing_is_immediate() -> None:
    g = Gateway()
    _, b = new_batch(g)
    r = cancel(g, b["id"])
    assert r.status == 200 and r.body["status"] == "cancelled"
    assert r.body["cancelling_at"] == r.body["cancelled_at"] == int(g.now)
    assert g.lease(7) is None
    again = cancel(g, b["id"])
    assert again.status == 409 and again.body["error"]["code"] == "batch_not_cancellable"


def test_cancel_keeps_exactly_the_committed_shards() -> None:
    g = Gateway(S3)
    data, b = new_batch(g, lines=10)
    assert g.validate(g.lease(7)).status == 200
    first = g.lease(7)
    assert g.run_shard(first).status == 200  # lines 1-3 committed
    held = g.lease(8)  # lines 4-6, running when the cancel comes
    r = cancel(g, b["id"])
    assert r.status == 200 and r.body["status"] == "cancelling"
    assert cancel(g, b["id"]).status == 200  # still cancelling: idempotent
    assert g.lease(7) is None  # the pending shards were dropped
    beat = g.heartbeat(held)
    assert beat.status == 200 and beat.body["cancel"] is True
    # Not partial while cancelling is refused only if the counts are short:
    assert g.commit(held, {"completed": 1, "failed": 0}).status == 400
    assert g.run_shard(held, upto=2, partial=True).status == 200
    done = g.batch(ME, b["id"])
    Batch.model_validate(done)
    assert done["status"] == "cancelled" and done["cancelled_at"] == int(g.now)
    ids = custom_ids(data)
    assert served_ids(g, done) == Counter(ids[:5])
    assert sum(done["request_counts"][k] for k in ("completed", "failed")) == 5
    assert done["request_counts"]["total"] == 10


def test_cancel_with_a_dead_lease_holder_settles_when_the_lease_lapses() -> None:
    g = Gateway(S3)
    _, b = new_batch(g, lines=4)
    assert g.validate(g.lease(7)).status == 200
    g.lease(7)  # the node dies holding it
    assert cancel(g, b["id"]).body["status"] == "cancelling"
    g.now += S3.lease_s - 1
    assert g.batch(ME, b["id"])["status"] == "cancelling"
    g.now += 2
    assert g.batch(ME, b["id"])["status"] == "cancelled"  # settled lazily on read


def test_expiry_keeps_done_output_and_refuses_late_work() -> None:
    g = Gateway(S3)
    data, b = new_batch(g, lines=7)
    assert g.validate(g.lease(7)).status == 200
    assert g.run_shard(g.lease(7)).status == 200
    late = g.lease(8)
    g.now = b["expires_at"]
    assert g.lease(7) is None  # nothing leasable past the window
    moved = drive(batches.expire_due(g.db, g.blobs, g.ids, g.now))
    assert moved == 1
    expired = g.batch(ME, b["id"])
    Batch.model_validate(expired)
    assert expired["status"] == "expired" and expired["expired_at"] == int(g.now)
    assert served_ids(g, expired) == Counter(custom_ids(data)[:3])
    result = g.run_shard(late)
    assert result.status == 409 and result.body["error"]["code"] == "lease_lost"
    assert (
        g.batch(ME, b["id"])["request_counts"]["completed"]
        + g.batch(ME, b["id"])["request_counts"]["failed"]
        == 3
    )
    assert cancel(g, b["id"]).status == 409


def test_expiry_is_applied_lazily_on_read() -> None:
    g = Gateway()
    _, b = new_batch(g)
    g.now += 24 * 3600
    assert g.batch(ME, b["id"])["status"] == "expired"


def test_a_lost_closing_write_is_repaired_by_the_cron() -> None:
    """If the isolate dies between the last commit and closing the batch, the cron (or the
    next read) closes it."""
    g = Gateway(S3)
    _, b = new_batch(g, lines=2)
    assert g.validate(g.lease(7)).status == 200
    shard = g.lease(7)
    original = batches.after_commit

    async def crash(*args, **kwargs) -> None:
        return None

    batches.after_commit = crash
    try:
        assert g.run_shard(shard).status == 200
    finally:
        batches.after_commit = original
    row = g.db.rows("SELECT status FROM batches WHERE id = ?", [b["id"]])[0]
    assert row["status"] == "in_progress"
    assert drive(batches.expire_due(g.db, g.blobs, g.ids, g.now)) == 1
    assert g.batch(ME, b["id"])["status"] == "completed"


def test_deleting_the_input_file_of_a_running_batch_keeps_its_bytes_until_it_ends() -> None:
    g = Gateway(S3)
    data, b = new_batch(g, lines=4)
    assert drive(files.delete_file(g.db, g.blobs, ME, b["input_file_id"], g.now)).status == 200
    g.drain(7)
    done = g.batch(ME, b["id"])
    assert done["status"] == "completed"
    assert served_ids(g, done) == Counter(custom_ids(data))
    before = set(g.blobs.objects)
    drive(batches.expire_due(g.db, g.blobs, g.ids, g.now))
    gone = before - set(g.blobs.objects)
    assert len(gone) == 1 and next(iter(gone)).startswith("u/")  # only the upload's body


def test_deleting_an_output_file_deletes_its_parts() -> None:
    g = Gateway(S3)
    _, b = new_batch(g, lines=4)
    g.drain(7)
    done = g.batch(ME, b["id"])
    keys = set(g.blobs.objects)
    drive(files.delete_file(g.db, g.blobs, ME, done["output_file_id"], g.now))
    removed = keys - set(g.blobs.objects)
    assert removed and all(k.endswith(".out") for k in removed)
