"""The storage sweep (sweep.py): the pure decisions (`doomed`, `due`) and the cron's sweep over
the real SQL and a dict R2, on batches and fine-tuning jobs played to the end the way nodes
play them (a lease taken over leaves its parts behind), plus hypothesis properties: the sweep
never deletes a referenced key and never touches a target that is not final and settled."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

import batches
import sweep
from jobdb import ACTIVE_BATCH
from sweep import BATCHES, JOBS, Budget, Target, doomed, due, grace_for
from tests.support.batchkit import Gateway, jsonl
from tests.support.ftkit import BASE, FtGateway
from tests.support.plans import recorded, table_scans
from tests.support.stores import MemoryBlobs, SqliteDb, drive

ME = "a" * 16
FINAL_BATCH = ("completed", "failed", "expired", "cancelled")
HP = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}


def run(g: Gateway, kind=BATCHES, budget: Budget | None = None, grace: float | None = None):
    lease_s = g.settings.lease_s if kind is BATCHES else g.ft.lease_s  # type: ignore[attr-defined]
    grace_s = grace_for(lease_s) if grace is None else grace
    return drive(sweep.sweep(g.db, g.blobs, kind, g.now, grace_s, budget or Budget()))


# ------------------------------------------------------------------------- pure decisions


def test_doomed_keeps_referenced_keys_and_other_prefixes() -> None:
    listed = ["b/x/w/1/l1.out", "b/x/w/1/l2.out", "b/x/w/2/l3.err", "b/xy/w/1/l9.out"]
    assert doomed("b/x/", listed, ["b/x/w/1/l2.out"]) == ["b/x/w/1/l1.out", "b/x/w/2/l3.err"]
    assert doomed("b/x/", listed + listed, []) == listed[:3]  # each once, in listing order
    assert doomed("b/x/", [], ["b/x/w/1/l1.out"]) == []


keys = st.text(alphabet="bft/xy.0l", min_size=1, max_size=8)


@given(
    prefix=st.sampled_from(["b/x/", "ft/x/", "b/"]),
    listed=st.lists(keys, max_size=30),
    referenced=st.lists(keys, max_size=30),
)
def test_doomed_never_deletes_a_referenced_key(prefix, listed, referenced) -> None:
    gone = doomed(prefix, listed, referenced)
    assert not set(gone) & set(referenced)
    assert set(gone) <= set(listed)
    assert all(k.startswith(prefix) for k in gone)
    # ... and deletes everything else listed under the prefix
    assert set(gone) == {k for k in listed if k.startswith(prefix)} - set(referenced)


def test_due_only_final_settled_targets() -> None:
    t = Target("batch_1", "completed", 1000.0, 1050.0)
    assert not due(BATCHES, t, 1050.0 + 119, 120)  # the last lease expired 119 s ago
    assert due(BATCHES, t, 1050.0 + 120, 120)
    assert due(BATCHES, Target("batch_1", "expired", 1000.0, None), 1120.0, 120)
    for status in (*ACTIVE_BATCH, "cancelling"):
        assert not due(BATCHES, Target("b", status, 1000.0, None), 10**12, 120)
    assert not due(BATCHES, Target("b", "completed", None, None), 10**12, 120)
    assert not due(JOBS, Target("j", "running", 1000.0, None), 10**12, 120)
    assert not due(JOBS, Target("j", "completed", 1000.0, None), 10**12, 120)  # a batch status
    assert due(JOBS, Target("j", "cancelled", 1000.0, 900.0), 1120.0, 120)
    # a node heart-beating a cancelled job for ever holds its sweep at most a day
    forever = Target("j", "cancelled", 1000.0, 10.0**12)
    assert not due(JOBS, forever, 1000.0 + sweep.MAX_LEASE_WAIT_S, 120)
    assert due(JOBS, forever, 1000.0 + sweep.MAX_LEASE_WAIT_S + 120, 120)
    assert grace_for(4) == sweep.MIN_GRACE_S and grace_for(120) == 120


# ------------------------------------------------------------------------- batches


def taken_over_batch(g: Gateway, lines: int = 6) -> tuple[dict, str]:
    """A batch of one shard whose first lease uploads its output and dies; node 8 takes the
    shard over and finishes it. Returns the batch and the dead lease's orphan key."""
    f = g.upload(ME, jsonl(lines)).body
    b = g.create_batch(ME, f["id"]).body
    assert g.validate(g.lease(7)).status == 200
    dead = g.lease(7)
    assert g.put(dead, "output", b"half of it\n").startswith("b/")
    orphan = f"b/{b['id']}/w/1/{dead['id']}.out"
    assert orphan in g.blobs.objects
    g.now += g.settings.lease_s + 1  # node 7 died
    taker = g.lease(8)
    assert taker["seq"] == 1 and taker["id"] != dead["id"]
    assert g.run_shard(taker).status == 200
    assert g.commit(dead, {"completed": lines, "failed": 0}).status == 409  # too late
    return g.batch(ME, b["id"]), orphan


def test_a_taken_over_leases_part_is_deleted_once_the_batch_is_final() -> None:
    g = Gateway()
    b, orphan = taken_over_batch(g)
    assert b["status"] == "completed"
    want = g.content(ME, b["output_file_id"])
    kept = set(g.blobs.objects) - {orphan}

    # untouched until a lease period after the taker's lease expired (its node may upload)
    g.now += 2 * g.settings.lease_s - 1
    assert run(g).targets == 0 and orphan in g.blobs.objects
    g.now += 1
    done = run(g)
    assert done.log() == {"targets": 1, "deleted": 1, "lists": 1}
    assert set(g.blobs.objects) == kept  # only the orphan went
    assert g.content(ME, b["output_file_id"]) == want  # the output still reads whole
    if b.get("error_file_id"):
        assert g.content(ME, b["error_file_id"])
    # swept once: the next run lists nothing
    g.now += 3600
    assert run(g).log() == {"targets": 0, "deleted": 0, "lists": 0}
    [mark] = g.db.rows("SELECT * FROM sweep_marks")
    assert mark["kind"] == "batch" and mark["id"] == b["id"] and mark["head_id"] is None


def test_a_running_batch_is_never_touched() -> None:
    g = Gateway()
    f = g.upload(ME, jsonl(45)).body
    g.settings = g.settings.__class__(shard_lines=20)
    b = g.create_batch(ME, f["id"]).body
    assert g.validate(g.lease(7)).status == 200
    first = g.lease(7)
    assert g.run_shard(first).status == 200
    stray = f"b/{b['id']}/w/2/lease_from_elsewhere.out"  # an upload nobody committed (yet)
    drive(g.blobs.put(stray, b"x"))
    before = dict(g.blobs.objects)
    g.now += 10 * 86_400  # long after; still in_progress as far as the sweep reads it
    assert g.db.rows("SELECT status FROM batches")[0]["status"] == "in_progress"
    assert run(g).log() == {"targets": 0, "deleted": 0, "lists": 0}
    assert g.blobs.objects == before


def test_the_budget_bounds_list_calls_and_the_next_run_resumes() -> None:
    g = Gateway()
    b, orphan = taken_over_batch(g)
    strays = [f"b/{b['id']}/w/1/lease_{i:03d}.err" for i in range(25)]
    for k in strays:
        drive(g.blobs.put(k, b"x"))
    kept = set(g.blobs.objects) - {orphan, *strays}
    g.now += 3600
    budget = Budget(targets=4, lists=2, page=5)
    calls = []
    while set(g.blobs.objects) != kept:
        before = g.blobs.lists
        done = run(g, budget=budget)
        calls.append(g.blobs.lists - before)
        assert done.lists == calls[-1] <= budget.lists
        assert len(calls) < 10
    assert len(calls) == 3  # 27 keys (26 strays and orphans, 1 referenced), 5 a page, 2 a run
    assert g.content(ME, b["output_file_id"])
    assert run(g, budget=budget).log() == {"targets": 0, "deleted": 0, "lists": 0}


def test_batches_are_swept_oldest_first_and_a_target_not_due_waits() -> None:
    g = Gateway()
    _, orphan1 = taken_over_batch(g)
    g.now += 100
    _, orphan2 = taken_over_batch(g)
    g.now += 60  # the first is due (its last lease expired > 120 s ago), the second not
    done = run(g)
    assert done.targets == 1 and orphan1 not in g.blobs.objects and orphan2 in g.blobs.objects
    g.now += 200
    assert run(g).targets == 1 and orphan2 not in g.blobs.objects


def test_a_cancelled_batch_keeps_its_partial_output() -> None:
    g = Gateway(now=1_800_000_000.0)
    g.settings = g.settings.__class__(shard_lines=3)
    f = g.upload(ME, jsonl(9)).body
    b = g.create_batch(ME, f["id"]).body
    assert g.validate(g.lease(7)).status == 200
    lost = g.lease(7)
    g.put(lost, "output", b"lost\n")
    g.now += g.settings.lease_s + 1
    done_lease = g.lease(8)  # takes the lapsed shard over
    assert done_lease["seq"] == lost["seq"]
    busy = g.lease(7)
    r = drive(batches.cancel_batch(g.db, g.ids, ME, b["id"], g.now))
    assert r.body["status"] == "cancelling"
    assert g.run_shard(done_lease, partial=True).status == 200
    assert g.run_shard(busy, upto=1, partial=True).status == 200
    b = g.batch(ME, b["id"])
    assert b["status"] == "cancelled"
    want = g.content(ME, b["output_file_id"])
    g.now += 3600
    assert run(g).deleted == 1
    assert g.content(ME, b["output_file_id"]) == want


# ------------------------------------------------------------------------- fine-tuning


def test_a_jobs_lost_adapter_goes_and_its_checkpoints_stay() -> None:
    g = FtGateway()
    fid = g.training_file(ME)
    job = g.create_job(ME, {"model": BASE, "training_file": fid}).body
    first = g.train_lease(7)
    assert g.put_checkpoint(first, 10, b"epoch1").status == 200
    lost_adapter = g.put_adapter(first, b"early adapter")  # uploaded, never committed
    g.now += g.ft.lease_s + 1
    partner = g.train_lease(8)
    assert g.put_checkpoint(partner, 20, b"epoch2").status == 200
    assert g.put_adapter(partner, b"adapter-tar").startswith("ft/")
    body = {"ok": True, "trained_tokens": 5, "hyperparameters": HP}
    assert g.commit_train(partner, body).status == 200
    assert g.job(ME, job["id"])["status"] == "succeeded"
    prefix = f"ft/{job['id']}/"
    before = {k for k in g.blobs.objects if k.startswith(prefix)}
    assert lost_adapter in before and len(before) == 5  # 2 checkpoints, 2 adapters, results

    assert run(g, JOBS).targets == 0  # the partner's lease has not expired yet
    g.now += 2 * g.ft.lease_s
    assert run(g, JOBS).log() == {"targets": 1, "deleted": 1, "lists": 1}
    after = {k for k in g.blobs.objects if k.startswith(prefix)}
    assert after == before - {lost_adapter}
    assert [c["step_number"] for c in g.checkpoints(ME, job["id"]).body["data"]] == [20, 10]
    assert run(g, JOBS).lists == 0


def test_a_running_job_is_never_touched() -> None:
    g = FtGateway()
    job = g.create_job(ME, {"model": BASE, "training_file": g.training_file(ME)}).body
    lease = g.train_lease(7)
    g.put_adapter(lease, b"in flight")
    g.now += g.ft.lease_s + 1  # lapsed: the job shows queued, nothing final
    before = dict(g.blobs.objects)
    g.now += 10 * 86_400
    assert run(g, JOBS).lists == 0 and g.blobs.objects == before
    assert g.job(ME, job["id"])["status"] in ("queued", "validating_files")


# ------------------------------------------------------------------------- properties


BATCH_STATUSES = (*ACTIVE_BATCH, "cancelling", *FINAL_BATCH)
TIMESTAMP = {
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
}
batch_spec = st.fixed_dictionaries(
    {
        "status": st.sampled_from(BATCH_STATUSES),
        "ended": st.integers(0, 5000),
        "lease_until": st.none() | st.integers(0, 6000),
        "objects": st.lists(
            st.tuples(st.integers(1, 3), st.sampled_from("abcd"), st.sampled_from(["out", "err"])),
            max_size=8,
            unique=True,
        ),
        "referenced": st.sets(st.integers(0, 7), max_size=8),
        "in_file": st.sets(st.integers(0, 7), max_size=8),
    }
)


def _insert(db: SqliteDb, i: int, spec: dict) -> tuple[str, set[str], list[str]]:
    """A batch row in any status, its work rows naming some of its objects, an output file
    naming others; returns its id, its referenced keys and all its keys."""
    bid = f"batch_{i:024x}"
    status = spec["status"]
    stamp = TIMESTAMP.get(status)
    cols = {"completed_at": None, "failed_at": None, "expired_at": None, "cancelled_at": None}
    if stamp:
        cols[stamp] = spec["ended"]
    keys = [f"b/{bid}/w/{seq}/{lease}.{part}" for seq, lease, part in spec["objects"]]
    named = {keys[j] for j in spec["referenced"] if j < len(keys)}
    in_file = [keys[j] for j in spec["in_file"] if j < len(keys)]
    out_id = None
    if in_file:
        out_id = f"file-{i:024x}"
        db.conn.execute(
            "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, status, parts)"
            " VALUES (?, ?, 'batch_output', 'o.jsonl', 1, 0, 'processed', ?)",
            (out_id, ME, json.dumps([[k, 0, 1] for k in in_file])),
        )
    db.conn.execute(
        "INSERT INTO batches (id, owner, role, endpoint, input_file_id, completion_window,"
        " status, created_at, expires_at, completed_at, failed_at, expired_at, cancelled_at,"
        " output_file_id) VALUES (?, ?, 'batch', '/v1/chat/completions', 'file-x', '24h', ?,"
        " 0, 86400, ?, ?, ?, ?, ?)",
        (bid, ME, status, *cols.values(), out_id),
    )
    for n, key in enumerate(sorted(named)):
        db.conn.execute(
            "INSERT INTO work (id, batch_id, kind, seq, state, offset, length, first_line,"
            " n_lines, expires_at, out_blob, out_bytes) VALUES (?, ?, 'lines', ?, 'done', 0, 1,"
            " 0, 1, ?, ?, 1)",
            (f"wrk_{i}_{n}", bid, n + 1, spec["lease_until"], key),
        )
    if not named and spec["lease_until"] is not None:
        db.conn.execute(
            "INSERT INTO work (id, batch_id, kind, seq, state, offset, length, first_line,"
            " n_lines, expires_at) VALUES (?, ?, 'lines', 1, 'leased', 0, 1, 0, 1, ?)",
            (f"wrk_{i}_x", bid, spec["lease_until"]),
        )
    return bid, named | set(in_file), keys


def _made(db: SqliteDb, blobs: MemoryBlobs, specs: list[dict]) -> list[tuple]:
    """Each spec's batch inserted (`_insert`) and all its keys put: (id, spec, referenced, keys)."""
    made = []
    for i, spec in enumerate(specs):
        bid, referenced, keys = _insert(db, i, spec)
        for k in keys:
            drive(blobs.put(k, b"x"))
        made.append((bid, spec, referenced, keys))
    return made


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(batch_spec, min_size=1, max_size=5),
    now=st.integers(0, 8000),
    grace=st.sampled_from([0, 10, 120]),
    budget=st.builds(
        Budget,
        targets=st.integers(1, 5),
        lists=st.integers(1, 6),
        page=st.integers(1, 4),
    ),
    runs=st.integers(1, 4),
)
def test_the_sweep_never_deletes_a_referenced_key_nor_touches_an_unsettled_batch(
    specs, now, grace, budget, runs
) -> None:
    db, blobs = SqliteDb(), MemoryBlobs()
    outside = ["u/000000000000000000000001", "b/batch_zzz/w/1/a.out", "ft/ftjob-1/x.tar"]
    for k in outside:
        drive(blobs.put(k, b"x"))
    made = _made(db, blobs, specs)
    for _ in range(runs):
        done = drive(sweep.sweep(db, blobs, BATCHES, float(now), float(grace), budget))
        assert done.lists <= budget.lists and done.targets <= budget.targets
    left = set(blobs.objects)
    assert set(outside) <= left
    for bid, spec, referenced, keys in made:
        assert referenced <= left, bid  # never a referenced key
        t = Target(
            bid,
            spec["status"],
            spec["ended"] if spec["status"] in TIMESTAMP else None,
            None if spec["lease_until"] is None else float(spec["lease_until"]),
        )
        if not due(BATCHES, t, now, grace):
            assert set(keys) <= left, bid  # an unsettled batch is never touched


@settings(max_examples=40, deadline=None)
@given(specs=st.lists(batch_spec, min_size=1, max_size=4), grace=st.sampled_from([0, 120]))
def test_with_budget_enough_every_settled_batch_ends_clean(specs, grace) -> None:
    db, blobs = SqliteDb(), MemoryBlobs()
    made = _made(db, blobs, specs)
    now = 10**6  # everything final is settled
    for _ in range(len(specs) + 1):
        drive(sweep.sweep(db, blobs, BATCHES, float(now), float(grace), Budget(lists=3, page=2)))
    for bid, spec, referenced, keys in made:
        mine = {k for k in blobs.objects if k.startswith(f"b/{bid}/")}
        if spec["status"] in TIMESTAMP:
            assert mine == referenced, bid
        else:
            assert mine == set(keys), bid


# ------------------------------------------------------------------------- SQL


def test_every_sweep_statement_uses_an_index() -> None:
    g = FtGateway()
    taken_over_batch(g)
    with recorded(g.db) as seen:
        g.now += 3600
        run(g)
        job = g.create_job(ME, {"model": BASE, "training_file": g.training_file(ME)}).body
        g.cancel_job(ME, job["id"])
        g.now += 3600
        drive(g.blobs.put(f"ft/{job['id']}/adapter/ftlease-x.tar", b"x"))
        assert run(g, JOBS).deleted == 1
    words = ("sweep_marks", "leases_until", " AS k ")
    ours = {s: p for s, p in seen.items() if any(w in s for w in words)}
    assert len(ours) == 6  # mark read and write, two candidate and two key queries
    assert not table_scans(g.db, ours, allow_virtual=True)


JOB_STATUSES = ("validating_files", "running", "succeeded", "failed", "cancelled")
job_spec = st.fixed_dictionaries(
    {
        "status": st.sampled_from(JOB_STATUSES),
        "ended": st.integers(0, 5000),
        "lease_until": st.none() | st.integers(0, 6000),
        "steps": st.lists(st.integers(1, 5), max_size=5, unique=True),
        "lost": st.lists(st.sampled_from(["ckpt/7/l2.tar", "adapter/l1.tar"]), unique=True),
        "adapter": st.booleans(),
    }
)


@settings(max_examples=100, deadline=None)
@given(
    specs=st.lists(job_spec, min_size=1, max_size=4),
    now=st.integers(0, 8000),
    grace=st.sampled_from([0, 120]),
    runs=st.integers(1, 3),
)
def test_the_sweep_never_deletes_a_jobs_referenced_key_nor_touches_an_unsettled_job(
    specs, now, grace, runs
) -> None:
    db, blobs = SqliteDb(), MemoryBlobs()
    made = []
    for i, spec in enumerate(specs):
        jid = f"ftjob-{i:024x}"
        final = spec["status"] in ("succeeded", "failed", "cancelled")
        db.conn.execute(
            "INSERT INTO ft_jobs (id, owner, model, training_file, status, hyperparameters,"
            " method, seed, created_at, finished_at) VALUES (?, ?, ?, 'file-x', ?, '{}', '{}',"
            " 1, 0, ?)",
            (jid, ME, BASE, spec["status"], spec["ended"] if final else None),
        )
        if spec["lease_until"] is not None:
            db.conn.execute(
                "INSERT INTO work (id, batch_id, kind, seq, state, offset, length, first_line,"
                " n_lines, expires_at) VALUES (?, ?, 'train', 0, 'leased', 0, 1, 0, 0, ?)",
                (f"wrk_{i}", jid, spec["lease_until"]),
            )
        referenced = set()
        for step in spec["steps"]:
            key = f"ft/{jid}/ckpt/{step}/l1.tar"
            db.conn.execute(
                "INSERT INTO ft_checkpoints (id, job_id, step_number, metrics,"
                " fine_tuned_model_checkpoint, blob, bytes, created_at)"
                " VALUES (?, ?, ?, '{}', 'x', ?, 1, 0)",
                (f"ftckpt-{i}-{step}", jid, step, key),
            )
            referenced.add(key)
        if spec["adapter"]:
            key = f"ft/{jid}/adapter/l3.tar"
            db.conn.execute(
                "INSERT INTO ft_adapters (name, owner, job_id, base, slug, blob, bytes,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, 1, 0)",
                (f"ft:{jid}", ME, jid, BASE, f"slug-{i}", key),
            )
            referenced.add(key)
        keys = referenced | {f"ft/{jid}/{k}" for k in spec["lost"]}
        for k in keys:
            drive(blobs.put(k, b"x"))
        t = Target(jid, spec["status"], float(spec["ended"]) if final else None, None)
        if spec["lease_until"] is not None:
            t = Target(t.id, t.status, t.ended_at, float(spec["lease_until"]))
        made.append((t, referenced, keys))
    for _ in range(runs):
        drive(sweep.sweep(db, blobs, JOBS, float(now), float(grace), Budget(lists=3, page=2)))
    left = set(blobs.objects)
    for t, referenced, keys in made:
        assert referenced <= left, t
        if not due(JOBS, t, now, grace):
            assert keys <= left, t
