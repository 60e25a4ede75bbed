"""jobdb.py: the SQL as D1 will run it. Every statement of a whole lifecycle is run by SQLite
(tests/support SqliteDb also enforces D1's 100-parameter cap and bindable types) and uses an
index; a 50,000-line plan is one statement; racing closers create one set of files."""

from __future__ import annotations

import json

import batches
import files
import jobdb
from jobdb import ApiResult, BatchSettings
from tests.support.batchkit import MODEL, Gateway, jsonl
from tests.support.plans import recorded, table_scans
from tests.support.stores import MIGRATIONS, drive

ME = "a" * 16
ALLOWED_SCANS = ("SCAN json_each", "SCAN CONSTANT ROW")


def test_migration_applies_twice() -> None:
    g = Gateway()
    for sql in sorted(MIGRATIONS.glob("*.sql")):
        g.db.conn.executescript(sql.read_text())
    tables = {r["name"] for r in g.db.rows("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"files", "batches", "work"} <= tables


def test_every_statement_of_a_lifecycle_uses_an_index() -> None:
    g = Gateway(BatchSettings(shard_lines=3))
    with recorded(g.db) as seen:
        f = g.upload(ME, jsonl(10)).body
        b = g.create_batch(ME, f["id"]).body
        g.drain(7)
        drive(files.list_files(g.db, ME, g.now, after=f["id"], purpose="batch"))
        drive(batches.list_batches(g.db, g.ids, ME, g.now, after=b["id"]))
        drive(batches.cancel_batch(g.db, g.ids, ME, b["id"], g.now))
        drive(batches.expire_due(g.db, g.blobs, g.ids, g.now))
        drive(files.delete_file(g.db, g.blobs, ME, f["id"], g.now))
        g.heartbeat({"id": "lease_x", "token": "t"})
    assert len(seen) >= 20
    assert not table_scans(g.db, seen, ALLOWED_SCANS)
    for sql in seen:
        assert "?1" not in sql and ":" not in sql.replace("': '", "")  # plain ? marks only


def test_a_50000_line_plan_is_one_statement() -> None:
    g = Gateway()
    data = b"{}\n" * 50_000
    g.create_batch(ME, g.upload(ME, data).body["id"])
    lease = g.lease(7)
    shards = [
        {"offset": i * 300, "length": 300, "first_line": i * 100, "n_lines": 100}
        for i in range(500)
    ]
    before = g.db.statements
    body = {"ok": True, "model": MODEL, "total": 50_000, "shards": shards}
    assert g.commit(lease, body).status == 200
    assert g.db.statements - before <= 12
    assert g.db.rows("SELECT count(*) AS n, max(seq) AS top FROM work WHERE kind = 'lines'") == [
        {"n": 500, "top": 500}
    ]


def test_racing_closers_make_one_set_of_files() -> None:
    g = Gateway(BatchSettings(shard_lines=3))
    b = g.create_batch(ME, g.upload(ME, jsonl(4)).body["id"]).body
    g.drain(7)
    row = drive(jobdb.batch_by_id(g.db, b["id"]))
    # The batch is completed; a second closer that read it as in_progress changes nothing.
    stale = {**row, "status": "in_progress"}
    assert drive(batches.close(g.db, g.ids, stale, ("in_progress",), "completed", g.now)) is False
    outputs = g.db.rows("SELECT id FROM files WHERE purpose = 'batch_output'")
    assert len(outputs) in (1, 2)  # output (+ error if a line failed), once
    assert {o["id"] for o in outputs} <= {row["output_file_id"], row["error_file_id"]}


def test_render_adds_the_request_id() -> None:
    err = jobdb.error(404, "No such File object: f", "file_not_found", "id")
    assert json.loads(err.render("req-9")) == {
        "error": {
            "message": "No such File object: f",
            "type": "invalid_request_error",
            "param": "id",
            "code": "file_not_found",
            "request_id": "req-9",
        }
    }
    assert json.loads(ApiResult(200, {"a": 1}).render("r")) == {"a": 1}


def test_the_core_imports_only_the_stdlib_and_src() -> None:
    """The Worker bundles src/ as it is and Pyodide has no wheels for it: stdlib only."""
    import ast
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    local = {p.stem for p in src.glob("*.py")} | {"heady_shared"}
    core = ["files", "batches", "work", "jobdb", "multipart", "storage"]
    paths = [src / f"{m}.py" for m in core] + [src / "heady_shared" / "nodeauth.py"]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in local, (path.name, name)
