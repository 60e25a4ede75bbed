"""work.py: who may lease what, lease lapse and takeover, stale tokens, result parts, commit
checks, and hypothesis-fuzzed node bodies that must always get 400/409 (never an exception)
and change nothing when refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import work
from jobdb import BatchSettings
from tests.support.batchkit import MODEL, Gateway, jsonl, shard_plan
from tests.support.stores import drive

ME = "a" * 16
S3 = BatchSettings(shard_lines=3)


def running(lines: int = 7, s: BatchSettings = S3) -> tuple[Gateway, str]:
    """A gateway with one validated batch of `lines` lines, shards pending."""
    g = Gateway(s)
    f = g.upload(ME, jsonl(lines))
    b = g.create_batch(ME, f.body["id"]).body
    assert g.validate(g.lease(7, models=[])).status == 200
    return g, b["id"]


def test_lease_shape() -> None:
    g = Gateway(S3)
    g.create_batch(ME, g.upload(ME, jsonl(4)).body["id"])
    v = g.lease(7)
    assert v["kind"] == "validate" and v["shard_lines"] == 3 and v["max_lines"] == 50_000
    assert v["input"] == f"/api/nodes/v1/leases/{v['id']}/input"
    assert v["expires_at"] == g.now + S3.lease_s
    assert (v["lease_s"], v["heartbeat_s"]) == (S3.lease_s, S3.heartbeat_s)
    assert g.validate(v).status == 200
    shard = g.lease(7)
    assert {k: shard[k] for k in ("kind", "seq", "first_line", "n_lines", "model")} == {
        "kind": "lines",
        "seq": 1,
        "first_line": 0,
        "n_lines": 3,
        "model": MODEL,
    }
    assert shard["endpoint"] == "/v1/chat/completions"
    assert g.read_input(shard) == jsonl(4)[: shard["bytes"]]


def test_who_may_lease() -> None:
    g, _ = running()
    # Another role's node: never while BATCH_HELPERS is off, idle or not.
    assert g.lease(3, may_lease_any=False, idle=True) is None
    g.settings = BatchSettings(shard_lines=3, helpers=True)
    assert g.lease(3, may_lease_any=False, idle=False) is None
    assert g.lease(3, may_lease_any=False, idle=True) is not None
    # Shards only for a node serving the batch's model.
    assert g.lease(7, models=["some/other-model"]) is None
    assert g.lease(7, models=[]) is None
    assert g.lease(7, models=["x", MODEL])["seq"] == 2


def test_validation_goes_to_any_node_allowed_to_lease() -> None:
    g = Gateway()
    g.create_batch(ME, g.upload(ME, jsonl(2)).body["id"])
    assert g.lease(7, models=["unrelated"])["kind"] == "validate"


def test_lapsed_lease_is_taken_over_and_the_old_token_is_refused() -> None:
    g, _ = running()
    a = g.lease(7)
    g.now += S3.lease_s - 1
    assert g.heartbeat(a).status == 200  # extends: a live node keeps its lease
    g.now += S3.lease_s - 1
    assert g.lease(8)["seq"] == 2  # shard 1 still held
    g.now += 2  # now a's lease has lapsed
    b = g.lease(8)
    assert (b["seq"], b["id"]) == (1, b["id"]) and b["id"] != a["id"]
    out_before = dict(g.blobs.objects)
    for call in (g.heartbeat(a), g.read_input(a), g.put(a, "output", b"x\n")):
        assert call.status == 409 and call.body["error"]["code"] == "lease_lost"
    assert g.blobs.objects == out_before
    assert g.run_shard(b).status == 200
    row = g.db.rows("SELECT attempts, node, state FROM work WHERE seq = 1 AND kind = 'lines'")
    assert row == [{"attempts": 2, "node": 8, "state": "done"}]


def test_stale_commit_after_takeover_is_refused_and_its_parts_deleted() -> None:
    g, _ = running()
    a = g.lease(7)
    data = g.read_input(a)
    g.put(a, "output", data)  # a runs its shard and uploads...
    g.now += S3.lease_s + 1  # ...but stalls past its lease
    b = g.lease(8)
    assert b["seq"] == a["seq"]
    counts = g.db.rows("SELECT completed, failed FROM batches")
    refused = g.commit(a, {"completed": 3, "failed": 0})
    assert refused.status == 409 and refused.body["error"]["code"] == "lease_lost"
    assert g.db.rows("SELECT completed, failed FROM batches") == counts
    assert g.run_shard(b).status == 200
    # a's upload lies under its own lease's key: the shard serves b's, never a's.
    row = g.db.rows("SELECT out_blob FROM work WHERE seq = ? AND kind = 'lines'", [a["seq"]])
    assert b["id"] in row[0]["out_blob"] and a["id"] not in row[0]["out_blob"]


def test_refused_commit_of_a_still_named_lease_deletes_its_parts() -> None:
    g, _ = running()
    a = g.lease(7)
    g.put(a, "output", g.read_input(a))
    assert any(a["id"] in k for k in g.blobs.objects)
    g.now += 24 * 3600  # the batch expires: a's work is cancelled, its lease id kept
    refused = g.commit(a, {"completed": 3, "failed": 0})
    assert refused.status == 409
    assert not any(a["id"] in k for k in g.blobs.objects)


def test_commit_after_lapse_before_takeover_is_accepted() -> None:
    g, _ = running()
    a = g.lease(7)
    g.now += S3.lease_s * 3
    assert g.run_shard(a).status == 200


def test_retried_commit_is_idempotent() -> None:
    g, _ = running()
    a = g.lease(7)
    assert g.run_shard(a).status == 200
    counts = g.db.rows("SELECT completed, failed FROM batches")
    again = g.commit(a, {"completed": 3, "failed": 0})
    assert again.status == 200 and again.body == {"state": "done"}
    assert g.db.rows("SELECT completed, failed FROM batches") == counts
    assert g.commit({**a, "token": "forged"}, {"completed": 3, "failed": 0}).status == 409


def test_commit_checks() -> None:
    g, _ = running()
    a = g.lease(7)
    data = g.read_input(a)
    cases = [
        ({"completed": 2, "failed": 0}, "must equal"),
        ({"completed": 3, "failed": 0, "partial": True}, "only while the batch is cancelling"),
        ({"completed": 3, "failed": 0}, "no output part"),
        ({"completed": -1, "failed": 4}, "non-negative"),
        ({"completed": 3.0, "failed": 0}, "non-negative"),
        ({"completed": True, "failed": 2}, "non-negative"),
        ({"completed": 3, "failed": 0, "usage": {"input_tokens": "9"}}, "usage"),
        ({"completed": 3, "failed": 0, "partial": "yes"}, "partial"),
    ]
    for body, why in cases:
        r = g.commit(a, body)
        assert r.status == 400 and why in r.body["error"]["message"], (body, r.body)
    g.put(a, "output", data)
    g.put(a, "error", b'{"custom_id": "x"}\n')
    r = g.commit(a, {"completed": 3, "failed": 0})
    assert r.status == 400 and "error part was uploaded" in r.body["error"]["message"]
    assert g.db.rows("SELECT state FROM work WHERE lease_id = ?", [a["id"]]) == [
        {"state": "leased"}
    ]


def test_result_target_refusals() -> None:
    g, _ = running()
    a = g.lease(7)
    s = g.settings
    target = drive(work.result_target(g.db, g.ids, a["id"], a["token"], "output", "10", g.now, s))
    assert target == f"b/{a['batch_id']}/w/1/{a['id']}.out"
    for args, status in (
        ((a["token"], "output", None), 411),
        ((a["token"], "output", str(s.max_file_bytes + 1)), 413),
        ((a["token"], "output", "ten"), 400),
        ((a["token"], "logs", "10"), 404),
        ((None, "output", "10"), 400),
        (("wrong", "error", "10"), 409),
    ):
        token, part, length = args
        r = drive(work.result_target(g.db, g.ids, a["id"], token, part, length, g.now, s))
        assert r.status == status, (args, r.body)


def test_validate_plan_checks() -> None:
    g = Gateway(S3)
    data = jsonl(7)
    g.create_batch(ME, g.upload(ME, data).body["id"])
    v = g.lease(7)
    good = {"offset": 0, "length": len(data), "first_line": 0, "n_lines": 3}
    bad_plans = [
        {"model": "", "total": 3, "shards": [good]},
        {"model": MODEL, "total": 0, "shards": [good]},
        {"model": MODEL, "total": 3, "shards": []},
        {"model": MODEL, "total": 3, "shards": [{**good, "first_line": 1}]},
        {"model": MODEL, "total": 4, "shards": [{**good, "n_lines": 4}]},  # > SHARD_LINES
        {"model": MODEL, "total": 3, "shards": [{**good, "length": len(data) + 1}]},
        {"model": MODEL, "total": 6, "shards": [good, good]},  # overlapping ranges
        {"model": MODEL, "total": 5, "shards": [good]},  # lines do not add up
        {"model": MODEL, "total": 3, "shards": [{**good, "offset": -1}]},
    ]
    for plan in bad_plans:
        r = g.commit(v, {"ok": True, **plan})
        assert r.status == 400, plan
    for errors in ([], [{"code": "x"}], [{"code": "x", "message": "m", "line": 0}], "no"):
        assert g.commit(v, {"ok": False, "errors": errors}).status == 400
    assert g.commit(v, {"ok": "maybe"}).status == 400
    assert g.db.rows("SELECT status FROM batches") == [{"status": "validating"}]
    assert g.db.rows("SELECT count(*) AS n FROM work") == [{"n": 1}]
    many = [{"code": "c", "line": i + 1, "message": "m" * 2000, "param": None} for i in range(1500)]
    assert g.commit(v, {"ok": False, "errors": many}).status == 200
    errors = json.loads(g.db.rows("SELECT errors FROM batches")[0]["errors"])
    assert len(errors) == 1000 and len(errors[0]["message"]) == 1000


def test_late_validate_commit_after_takeover_is_refused() -> None:
    g = Gateway(S3)
    data = jsonl(4)
    g.create_batch(ME, g.upload(ME, data).body["id"])
    a = g.lease(7)
    assert g.read_input(a) == data
    total, shards = shard_plan(data, S3.shard_lines)
    g.now += S3.lease_s + 1
    b = g.lease(8)
    assert b["kind"] == "validate"
    late = g.commit(a, {"ok": True, "model": MODEL, "total": total, "shards": shards})
    assert late.status == 409
    assert g.db.rows("SELECT count(*) AS n FROM work WHERE kind = 'lines'") == [{"n": 0}]
    assert g.validate(b).status == 200
    assert g.db.rows("SELECT count(*) AS n FROM work WHERE kind = 'lines'") == [{"n": 2}]


def test_past_the_window_a_lease_is_lost_everywhere() -> None:
    g, _ = running()
    a = g.lease(7)
    g.now += 24 * 3600
    assert g.heartbeat(a).status == 409
    assert g.read_input(a).status == 409
    assert g.db.rows("SELECT status FROM batches") == [{"status": "expired"}]


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", b"\xff", "7"])
def test_malformed_lease_bodies(body: object) -> None:
    g, _ = running()
    r = drive(work.lease(g.db, g.ids, 7, True, body, g.now, g.settings))
    assert r.status == 400 and r.body["error"]["code"] == "invalid_body"


def test_lease_body_checks() -> None:
    g, _ = running()
    for body in ({"models": "x"}, {"models": [1]}, {"models": ["m"] * 33}, {"idle": "yes"}):
        r = drive(work.lease(g.db, g.ids, 7, True, json.dumps(body), g.now, g.settings))
        assert r.status == 400, body


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(
    [
        "token",
        "completed",
        "failed",
        "partial",
        "usage",
        "ok",
        "model",
        "total",
        "shards",
        "errors",
        "models",
        "idle",
        "lines",
        "bytes",
    ]
)
BODY = st.one_of(
    JSON,
    st.dictionaries(KEYS, JSON, max_size=6),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=BODY,
    real_token=st.booleans(),
    validate=st.booleans(),
    path=st.sampled_from(["commit", "heartbeat", "lease", "release"]),
)
def test_fuzzed_node_bodies_never_break_anything(
    body: object, real_token: bool, validate: bool, path: str
) -> None:
    g = Gateway(S3)
    g.create_batch(ME, g.upload(ME, jsonl(7)).body["id"])
    lease = g.lease(7, models=[])
    if not validate:
        assert g.validate(lease).status == 200
        lease = g.lease(7)
    if real_token and isinstance(body, dict):
        body = {**body, "token": lease["token"]}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    before = g.db.rows("SELECT * FROM work ORDER BY id") + g.db.rows("SELECT * FROM batches")
    if path == "commit":
        r = drive(work.commit(g.db, g.blobs, g.ids, lease["id"], raw, g.now, g.settings))
    elif path == "heartbeat":
        r = drive(work.heartbeat(g.db, lease["id"], raw, g.now, g.settings))
    elif path == "release":
        r = drive(work.release(g.db, g.blobs, g.ids, lease["id"], raw, g.now))
    else:
        r = drive(work.lease(g.db, g.ids, 8, True, raw, g.now, g.settings))
    assert r.status in (200, 204, 400, 409), r
    if r.status in (400, 409):
        assert r.body["error"]["type"] == "invalid_request_error"
        assert isinstance(r.body["error"]["message"], str)
        after = g.db.rows("SELECT * FROM work ORDER BY id") + g.db.rows("SELECT * FROM batches")
        assert after == before, "a refused node request changed state"
    json.loads(r.render("req-1")) if r.body is not None else None
