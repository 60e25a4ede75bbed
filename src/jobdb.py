"""The batch core's plumbing: its settings, result type, id source, and every SQL statement it
sends to D1 (tables in migrations/0001_batches.sql).

SQL rules (D1 is SQLite): plain SQLite >= 3.35 (RETURNING, JSON1, partial indexes), at most
100 bound parameters per statement, and several statements are atomic only inside one
`Db.batch`. Conditional writes (`... WHERE state='leased' AND token=?`, `INSERT ... SELECT
... WHERE EXISTS`) make every race between isolates resolve inside D1: the loser changes no
row. Counts are recomputed from the work rows, never incremented, so a repeated or refused
write cannot skew them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from storage import Db

Part = tuple[str, int, int]  # (blob key, offset, length): a byte range of an R2 object
Row = dict[str, object]

OPEN_WORK = ("pending", "leased")
ACTIVE_BATCH = ("validating", "in_progress")
MAX_PARAMS = 100


@dataclass(frozen=True, slots=True)
class BatchSettings:
    shard_lines: int = 100  # SHARD_LINES: lines per shard (the validating node cuts them)
    lease_s: float = 120.0  # BATCH_LEASE_S: a lease lives this long without a heartbeat
    heartbeat_s: float = 30.0  # BATCH_HEARTBEAT_S: how often a node heartbeats
    max_file_bytes: int = 100_000_000  # MAX_FILE_BYTES: upload and result part cap
    helpers: bool = False  # BATCH_HELPERS: idle nodes of other roles may lease shards


@dataclass(frozen=True, slots=True)
class ApiResult:
    """What the shell answers: a JSON body (`body`), or the concatenation of byte ranges
    (`stream`: stream each part from R2 in order; `length` is their sum), or nothing
    (status 204). Error bodies are OpenAI's shape; `render` adds the request id."""

    status: int
    body: object = None
    headers: tuple[tuple[str, str], ...] = ()
    stream: tuple[Part, ...] | None = None
    length: int = 0

    def render(self, request_id: str) -> bytes:
        body = self.body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = {"error": {**body["error"], "request_id": request_id}}
        return json.dumps(body, separators=(",", ":")).encode()


def ok(body: object, status: int = 200) -> ApiResult:
    return ApiResult(status, body, (("content-type", "application/json"),))


def list_page(data: list[dict[str, object]], has_more: bool, ends: bool = True) -> ApiResult:
    """An OpenAI list page: `data`, `has_more` and, where the API has them (files, batches,
    checkpoints; not jobs or events), `first_id`/`last_id`."""
    body: dict[str, object] = {"object": "list", "data": data}
    if ends:
        body["first_id"] = data[0]["id"] if data else None
        body["last_id"] = data[-1]["id"] if data else None
    body["has_more"] = has_more
    return ok(body)


def error(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    type_: str = "invalid_request_error",
) -> ApiResult:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return ApiResult(status, body, (("content-type", "application/json"),))


class Ids:
    """Fresh ids and lease tokens (tests pass a deterministic subclass)."""

    def new(self, prefix: str) -> str:
        return prefix + secrets.token_hex(12)

    def token(self) -> str:
        return secrets.token_urlsafe(24)


def json_body(body: object) -> object:
    """A request body as the shell hands it (bytes, str, or already parsed); raises
    ValueError when it is not JSON."""
    if isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body).decode("utf-8")
    if isinstance(body, str):
        return json.loads(body)
    return body


def num(value: object, default: int = 0) -> int:
    """An integer column as D1 hands it back (a JS number may arrive as float)."""
    if value is None:
        return default
    return int(value)  # type: ignore[call-overload]


def opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _marks(n: int) -> str:
    return ",".join("?" * n)


async def _one(db: Db, sql: str, params: Sequence[object]) -> Row | None:
    rows = await db.all(sql, params)
    return rows[0] if rows else None


# ---------------------------------------------------------------------------- files

LIVE_FILE = "deleted_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
# A fine-tuning job (migrations/0002) still reading its files: their blobs are kept.
FT_OPEN = "status IN ('validating_files', 'queued', 'running')"
FILE_COLUMNS = (
    "id, owner, purpose, filename, bytes, created_at, expires_at, status, blob, data_offset, parts"
)


def insert_file_sql(f: Row, when: str = "") -> tuple[str, list[object]]:
    """INSERT of a files row; `when` (SQL with its params appended by the caller) makes it
    conditional, for inserts that must happen only together with a state change."""
    cols = FILE_COLUMNS.split(", ")
    params = [f.get(c) for c in cols]
    if when:
        sql = f"INSERT INTO files ({FILE_COLUMNS}) SELECT {_marks(len(cols))} WHERE {when}"
    else:
        sql = f"INSERT INTO files ({FILE_COLUMNS}) VALUES ({_marks(len(cols))})"
    return sql, params


async def insert_file(db: Db, f: Row) -> None:
    await db.run(*insert_file_sql(f))


async def live_file(db: Db, owner: str, file_id: str, now: float) -> Row | None:
    return await _one(
        db,
        f"SELECT * FROM files WHERE id = ? AND owner = ? AND {LIVE_FILE}",
        (file_id, owner, now),
    )


async def any_file(db: Db, owner: str, file_id: str) -> Row | None:
    """A file of this owner even if deleted or expired (list cursors may point at one)."""
    return await _one(db, "SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner))


async def list_files(
    db: Db,
    owner: str,
    now: float,
    limit: int,
    desc: bool,
    purpose: str | None,
    after: Row | None,
) -> list[Row]:
    sql = f"SELECT * FROM files WHERE owner = ? AND {LIVE_FILE}"
    params: list[object] = [owner, now]
    if purpose is not None:
        sql += " AND purpose = ?"
        params.append(purpose)
    if after is not None:
        op = "<" if desc else ">"
        sql += f" AND (created_at {op} ? OR (created_at = ? AND id {op} ?))"
        params += [after["created_at"], after["created_at"], after["id"]]
    way = "DESC" if desc else "ASC"
    sql += f" ORDER BY created_at {way}, id {way} LIMIT ?"
    params.append(limit)
    return await db.all(sql, params)


async def mark_file_deleted(db: Db, owner: str, file_id: str, now: float) -> bool:
    changed = await db.run(
        f"UPDATE files SET deleted_at = ? WHERE id = ? AND owner = ? AND {LIVE_FILE}",
        (int(now), file_id, owner, now),
    )
    return changed == 1


async def file_in_use(db: Db, file_id: str) -> bool:
    """Whether a batch still reading this file as input is unfinished."""
    row = await _one(
        db,
        "SELECT 1 AS x FROM batches WHERE input_file_id = ? AND status IN (?, ?, ?)"
        f" UNION ALL SELECT 1 FROM ft_jobs WHERE training_file = ? AND {FT_OPEN}"
        f" UNION ALL SELECT 1 FROM ft_jobs WHERE validation_file = ? AND {FT_OPEN} LIMIT 1",
        (file_id, *ACTIVE_BATCH, "cancelling", file_id, file_id),
    )
    return row is not None


async def purgeable_files(db: Db, now: float, limit: int = 20) -> list[Row]:
    """Deleted or expired files whose blobs are still stored and no unfinished batch reads."""
    unread = (
        " AND (blob IS NOT NULL OR parts IS NOT NULL)"
        " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = f.id"
        " AND b.status IN (?, ?, ?))"
        f" AND NOT EXISTS (SELECT 1 FROM ft_jobs j WHERE j.training_file = f.id AND {FT_OPEN})"
        f" AND NOT EXISTS (SELECT 1 FROM ft_jobs j WHERE j.validation_file = f.id AND {FT_OPEN})"
    )
    busy = (*ACTIVE_BATCH, "cancelling")
    return await db.all(
        f"SELECT id, blob, parts FROM files f WHERE deleted_at IS NOT NULL{unread}"
        f" UNION SELECT id, blob, parts FROM files f WHERE expires_at <= ?{unread} LIMIT ?",
        (*busy, now, *busy, limit),
    )


async def forget_blobs(db: Db, file_id: str) -> None:
    await db.run("UPDATE files SET blob = NULL, parts = NULL WHERE id = ?", (file_id,))


# -------------------------------------------------------------------------- batches

BATCH_COLUMNS = (
    "id, owner, role, endpoint, input_file_id, completion_window, status, created_at,"
    " expires_at, metadata, output_expires_s"
)
WORK_INSERT = (
    "INSERT INTO work (id, batch_id, kind, seq, state, offset, length, first_line, n_lines)"
)


async def insert_batch(db: Db, b: Row, validate: Row) -> None:
    """The batch row and its one `validate` work item, atomically."""
    cols = BATCH_COLUMNS.split(", ")
    await db.batch(
        [
            (
                f"INSERT INTO batches ({BATCH_COLUMNS}) VALUES ({_marks(len(cols))})",
                [b[c.strip()] for c in cols],
            ),
            (
                WORK_INSERT + " VALUES (?, ?, 'validate', 0, 'pending', ?, ?, 0, 0)",
                [validate["id"], b["id"], validate["offset"], validate["length"]],
            ),
        ]
    )


async def owned_batch(db: Db, owner: str, batch_id: str) -> Row | None:
    return await _one(db, "SELECT * FROM batches WHERE id = ? AND owner = ?", (batch_id, owner))


async def batch_by_id(db: Db, batch_id: str) -> Row | None:
    return await _one(db, "SELECT * FROM batches WHERE id = ?", (batch_id,))


async def list_batches(db: Db, owner: str, limit: int, after: Row | None) -> list[Row]:
    sql = "SELECT * FROM batches WHERE owner = ?"
    params: list[object] = [owner]
    if after is not None:
        sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
        params += [after["created_at"], after["created_at"], after["id"]]
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    params.append(limit)
    return await db.all(sql, params)


async def batches_to_settle(db: Db, now: float, limit: int = 50) -> list[Row]:
    """Batches whose state must move without a client or node asking: past their window,
    cancelling, or (a finalizer died) in progress with no open work left."""
    return await db.all(
        "SELECT * FROM batches b WHERE (status IN (?, ?) AND expires_at <= ?)"
        " OR status = 'cancelling'"
        " OR (status = 'in_progress' AND NOT EXISTS (SELECT 1 FROM work w"
        " WHERE w.batch_id = b.id AND w.kind = 'lines' AND w.state IN (?, ?)))"
        " LIMIT ?",
        (*ACTIVE_BATCH, now, *OPEN_WORK, limit),
    )


async def start_cancel(db: Db, batch_id: str, now: float) -> bool:
    """validating/in_progress -> cancelling, and its pending work -> cancelled."""
    changed = await db.batch(
        [
            (
                "UPDATE work SET state = 'cancelled' WHERE batch_id = ? AND state = 'pending'"
                " AND EXISTS (SELECT 1 FROM batches WHERE id = ? AND status IN (?, ?))",
                (batch_id, batch_id, *ACTIVE_BATCH),
            ),
            (
                "UPDATE batches SET status = 'cancelling', cancelling_at = ?"
                " WHERE id = ? AND status IN (?, ?)",
                (int(now), batch_id, *ACTIVE_BATCH),
            ),
        ]
    )
    return changed[-1] == 1


async def drop_open_work(db: Db, batch_id: str, now: float, expired_leases_only: bool) -> None:
    """Open work -> cancelled: all of it (expiry), or pending and lapsed leases (cancelling:
    a live lease may still commit what its node finished)."""
    if expired_leases_only:
        await db.run(
            "UPDATE work SET state = 'cancelled' WHERE batch_id = ?"
            " AND (state = 'pending' OR (state = 'leased' AND expires_at < ?))",
            (batch_id, now),
        )
    else:
        await db.run(
            "UPDATE work SET state = 'cancelled' WHERE batch_id = ? AND state IN (?, ?)",
            (batch_id, *OPEN_WORK),
        )


async def has_open_work(db: Db, batch_id: str) -> bool:
    row = await _one(
        db,
        "SELECT 1 AS x FROM work WHERE batch_id = ? AND state IN (?, ?) LIMIT 1",
        (batch_id, *OPEN_WORK),
    )
    return row is not None


async def done_shards(db: Db, batch_id: str) -> list[Row]:
    return await db.all(
        "SELECT seq, out_blob, out_bytes, err_blob, err_bytes FROM work"
        " WHERE batch_id = ? AND kind = 'lines' AND state = 'done' ORDER BY seq, first_line",
        (batch_id,),
    )


def recount_sql(batch_id: str) -> tuple[str, list[object]]:
    """request_counts and usage := the sums over the batch's committed shards."""
    done = "FROM work WHERE batch_id = ? AND kind = 'lines' AND state = 'done'"
    tokens = ", ".join(
        f"'{k}', coalesce(sum(json_extract(usage, '$.{k}')), 0)"
        for k in (
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "cached_tokens",
            "reasoning_tokens",
        )
    )
    sql = (
        f"UPDATE batches SET completed = (SELECT coalesce(sum(completed), 0) {done}),"
        f" failed = (SELECT coalesce(sum(failed), 0) {done}),"
        f" usage = (SELECT json_object({tokens}) {done}) WHERE id = ?"
    )
    return sql, [batch_id, batch_id, batch_id, batch_id]


async def close_batch(
    db: Db,
    batch_id: str,
    from_status: Sequence[str],
    to_status: str,
    now: float,
    files: Sequence[Row],
    output_file_id: str | None,
    error_file_id: str | None,
) -> bool:
    """One transaction: the output/error file rows, the counts, and the status change — all
    only if the batch is still in `from_status` with no open lines work (so the shards read
    for `files` are final). Returns whether this call closed it."""
    marks = _marks(len(from_status))
    cond = (
        f"EXISTS (SELECT 1 FROM batches WHERE id = ? AND status IN ({marks}))"
        " AND NOT EXISTS (SELECT 1 FROM work WHERE batch_id = ? AND state IN (?, ?))"
    )
    cond_params = [batch_id, *from_status, batch_id, *OPEN_WORK]
    statements: list[tuple[str, Sequence[object]]] = []
    for f in files:
        sql, params = insert_file_sql(f, cond)
        statements.append((sql, [*params, *cond_params]))
    statements.append(recount_sql(batch_id))
    stamp = f"{to_status}_at"
    extra = ", finalizing_at = ?" if to_status == "completed" else ""
    statements.append(
        (
            f"UPDATE batches SET status = ?, {stamp} = ?{extra}, output_file_id = ?,"
            f" error_file_id = ? WHERE id = ? AND status IN ({marks})"
            " AND NOT EXISTS (SELECT 1 FROM work WHERE batch_id = ? AND state IN (?, ?))",
            [
                to_status,
                int(now),
                *([int(now)] if extra else []),
                output_file_id,
                error_file_id,
                batch_id,
                *from_status,
                batch_id,
                *OPEN_WORK,
            ],
        )
    )
    changed = await db.batch(statements)
    return changed[-1] == 1


# ----------------------------------------------------------------------------- work

LEASE_RETURNING = (
    " RETURNING id, batch_id, kind, seq, offset, length, first_line, n_lines, lease_id,"
    " token, expires_at,"
    " (SELECT endpoint FROM batches WHERE id = work.batch_id) AS endpoint,"
    " (SELECT model FROM batches WHERE id = work.batch_id) AS model"
)
MAX_MODELS = 32


async def take_lease(
    db: Db,
    node: int,
    models: Sequence[str],
    lease_id: str,
    token: str,
    now: float,
    lease_s: float,
) -> Row | None:
    """Atomically lease one piece of work: pending, or leased with a lapsed lease, of a batch
    still validating/in progress and inside its window. Validation first (it gates a whole
    batch), then the oldest batch's shards in file order."""
    assert len(models) <= MAX_MODELS
    leasable = "(w.state = 'pending' OR (w.state = 'leased' AND w.expires_at < ?))"
    model_ok = "w.kind = 'validate'"
    if models:
        model_ok = f"({model_ok} OR b.model IN ({_marks(len(models))}))"
    pick = (
        f"SELECT w.id FROM work w JOIN batches b ON b.id = w.batch_id WHERE {leasable}"
        f" AND b.status IN (?, ?) AND b.expires_at > ? AND {model_ok}"
        " ORDER BY w.kind = 'validate' DESC, b.created_at, b.id, w.seq LIMIT 1"
    )
    sql = (
        "UPDATE work SET state = 'leased', lease_id = ?, token = ?, node = ?, leased_at = ?,"
        f" expires_at = ?, attempts = attempts + 1 WHERE id = ({pick})"
        " AND (state = 'pending' OR (state = 'leased' AND expires_at < ?))" + LEASE_RETURNING
    )
    params = [lease_id, token, node, now, now + lease_s, now, *ACTIVE_BATCH, now, *models, now]
    return await _one(db, sql, params)


async def lease_row(db: Db, lease_id: str, token: str) -> Row | None:
    """The work a current lease holds (state leased, token matching), with its batch's status
    and the input file's blob; None if the lease is not current."""
    return await _one(
        db,
        "SELECT w.*, b.status AS batch_status, b.expires_at AS batch_expires_at,"
        " b.endpoint AS endpoint, b.model AS model,"
        " f.blob AS file_blob, f.data_offset AS file_data_offset, f.bytes AS file_bytes"
        " FROM work w JOIN batches b ON b.id = w.batch_id"
        " LEFT JOIN files f ON f.id = b.input_file_id"
        " WHERE w.lease_id = ? AND w.token = ? AND w.state = 'leased'",
        (lease_id, token),
    )


async def extend_lease(
    db: Db, lease_id: str, token: str, now: float, expires_at: float
) -> Row | None:
    """A heartbeat: the lease runs on, unless it is not current or its batch's window ended."""
    return await _one(
        db,
        "UPDATE work SET expires_at = ? WHERE lease_id = ? AND token = ? AND state = 'leased'"
        " AND (SELECT expires_at FROM batches WHERE id = work.batch_id) > ?"
        " RETURNING expires_at, (SELECT status FROM batches WHERE id = work.batch_id)"
        " AS batch_status",
        (expires_at, lease_id, token, now),
    )


async def commit_lines(db: Db, w: Row, token: str, done: Row, batch_id: str) -> bool:
    """The shard -> done (only while this lease is current) and the batch's counts
    recomputed, in one transaction."""
    changed = await db.batch(
        [
            (
                "UPDATE work SET state = 'done', completed = ?, failed = ?, out_blob = ?,"
                " out_bytes = ?, err_blob = ?, err_bytes = ?, usage = ?"
                " WHERE lease_id = ? AND token = ? AND state = 'leased'",
                [
                    done["completed"],
                    done["failed"],
                    done["out_blob"],
                    done["out_bytes"],
                    done["err_blob"],
                    done["err_bytes"],
                    done["usage"],
                    w["lease_id"],
                    token,
                ],
            ),
            recount_sql(batch_id),
        ]
    )
    return changed[0] == 1


def _back_state() -> str:
    """Work given back goes to the queue, or straight to cancelled when its batch is ending."""
    return (
        "CASE WHEN (SELECT status FROM batches WHERE id = work.batch_id) IN (?, ?)"
        " THEN 'pending' ELSE 'cancelled' END"
    )


async def release_all(db: Db, lease_id: str, token: str) -> bool:
    """The whole lease back: its work leasable again at once (no wait for the lease to lapse).
    The row keeps the lease id and token, so a later call with them is recognisably stale."""
    changed = await db.run(
        f"UPDATE work SET state = {_back_state()}, expires_at = NULL"
        " WHERE lease_id = ? AND token = ? AND state = 'leased'",
        (*ACTIVE_BATCH, lease_id, token),
    )
    return changed == 1


async def release_rest(
    db: Db, lease_id: str, token: str, new_id: str, lines: int, size: int
) -> bool:
    """Split a lines lease: it keeps its first `lines` lines (`size` bytes) and runs on; the
    rest becomes a new work row (same seq, the byte range after them), leasable at once. One
    transaction, both statements only while the lease is current and longer than the cut."""
    cond = "lease_id = ? AND token = ? AND state = 'leased' AND n_lines > ? AND length > ?"
    params = [lease_id, token, lines, size]
    changed = await db.batch(
        [
            (
                WORK_INSERT[:-1] + ", attempts) SELECT ?, batch_id, kind, seq,"
                f" {_back_state()}, offset + ?, length - ?, first_line + ?, n_lines - ?,"
                f" attempts FROM work WHERE {cond}",
                [new_id, *ACTIVE_BATCH, size, size, lines, lines, *params],
            ),
            (f"UPDATE work SET n_lines = ?, length = ? WHERE {cond}", [lines, size, *params]),
        ]
    )
    return changed[-1] == 1


def _lease_current() -> str:
    return "EXISTS (SELECT 1 FROM work WHERE lease_id = ? AND token = ? AND state = 'leased')"


async def commit_plan(
    db: Db,
    lease_id: str,
    token: str,
    batch_id: str,
    shards_json: str,
    model: str,
    total: int,
    now: float,
) -> bool:
    """A validate lease's success: the shard rows (one statement: json_each over the plan),
    the batch -> in_progress with its model and total, the validate work -> done. Shards
    are inserted only while the lease is current and the batch still validating."""
    cur = _lease_current()
    changed = await db.batch(
        [
            (
                WORK_INSERT + " SELECT json_extract(value, '$.id'), ?, 'lines',"
                " json_extract(value, '$.seq'), 'pending', json_extract(value, '$.offset'),"
                " json_extract(value, '$.length'), json_extract(value, '$.first_line'),"
                " json_extract(value, '$.n_lines') FROM json_each(?)"
                f" WHERE {cur} AND EXISTS (SELECT 1 FROM batches WHERE id = ?"
                " AND status = 'validating')",
                [batch_id, shards_json, lease_id, token, batch_id],
            ),
            (
                "UPDATE batches SET status = 'in_progress', in_progress_at = ?, model = ?,"
                f" total = ? WHERE id = ? AND status = 'validating' AND {cur}",
                [int(now), model, total, batch_id, lease_id, token],
            ),
            (
                "UPDATE work SET state = 'done' WHERE lease_id = ? AND token = ?"
                " AND state = 'leased'",
                [lease_id, token],
            ),
        ]
    )
    return changed[-1] == 1


async def commit_invalid(
    db: Db, lease_id: str, token: str, batch_id: str, errors_json: str, now: float
) -> bool:
    """A validate lease's rejection: the batch -> failed with its errors, the work -> done."""
    cur = _lease_current()
    changed = await db.batch(
        [
            (
                "UPDATE batches SET status = 'failed', failed_at = ?, errors = ?"
                f" WHERE id = ? AND status = 'validating' AND {cur}",
                [int(now), errors_json, batch_id, lease_id, token],
            ),
            (
                "UPDATE work SET state = 'done' WHERE lease_id = ? AND token = ?"
                " AND state = 'leased'",
                [lease_id, token],
            ),
        ]
    )
    return changed[-1] == 1


async def work_row(db: Db, lease_id: str) -> Row | None:
    return await _one(db, "SELECT * FROM work WHERE lease_id = ?", (lease_id,))


# ---------------------------------------------------------------------------- status


async def running_batches(db: Db) -> int:
    """Batches of every owner still at work (validating, in progress, cancelling)."""
    row = await _one(
        db,
        "SELECT COUNT(*) AS n FROM batches WHERE status IN (?, ?, ?)",
        (*ACTIVE_BATCH, "cancelling"),
    )
    return num(row["n"]) if row else 0


async def open_batches(db: Db, owner: str, limit: int) -> list[Row]:
    """This owner's batches still at work, newest first."""
    return await db.all(
        "SELECT * FROM batches WHERE owner = ? AND status IN (?, ?, ?)"
        " ORDER BY created_at DESC, id DESC LIMIT ?",
        (owner, *ACTIVE_BATCH, "cancelling", limit),
    )


async def shard_states(db: Db, batch_ids: Sequence[str]) -> list[Row]:
    """(batch_id, state, n) of the lines work of these batches."""
    if not batch_ids:
        return []
    return await db.all(
        "SELECT batch_id, state, COUNT(*) AS n FROM work"
        f" WHERE batch_id IN ({_marks(len(batch_ids))}) AND kind = 'lines'"
        " GROUP BY batch_id, state",
        list(batch_ids),
    )


async def lease_holders(db: Db, batch_ids: Sequence[str], now: float) -> list[Row]:
    """Current (unlapsed) leases of these batches' work: who holds which shard."""
    if not batch_ids:
        return []
    return await db.all(
        "SELECT batch_id, node, seq, kind, n_lines, expires_at FROM work"
        f" WHERE batch_id IN ({_marks(len(batch_ids))}) AND state = 'leased'"
        " AND expires_at >= ? ORDER BY batch_id, seq",
        [*batch_ids, now],
    )


# ------------------------------------------------------------- storage sweep (sweep.py)

# A batch's end time: the one final timestamp it has. The same expression as the index
# batches_ended (migrations/0003_sweep.sql), so SQLite finds the rows by it.
BATCH_ENDED = "coalesce(completed_at, failed_at, expired_at, cancelled_at)"


async def sweep_mark(db: Db, kind: str) -> Row | None:
    """The sweep's bookkeeping for `kind` ('batch' or 'ft'); None before its first run."""
    rows = await db.all("SELECT * FROM sweep_marks WHERE kind = ?", (kind,))
    return rows[0] if rows else None


async def save_sweep_mark(
    db: Db, kind: str, ended_at: int, target_id: str, head_id: str | None, after: str | None
) -> None:
    """Move the mark forward (never back: a slower overlapping cron run cannot undo a faster
    one's progress)."""
    await db.run(
        "INSERT INTO sweep_marks (kind, ended_at, id, head_id, resume_after)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind) DO UPDATE SET ended_at = excluded.ended_at,"
        " id = excluded.id, head_id = excluded.head_id, resume_after = excluded.resume_after"
        " WHERE (excluded.ended_at, excluded.id) >= (sweep_marks.ended_at, sweep_marks.id)",
        (kind, ended_at, target_id, head_id, after),
    )


async def batches_to_sweep(
    db: Db, ended_at: int, after_id: str, cutoff: float, limit: int
) -> list[Row]:
    """Final batches after (ended_at, after_id) that ended by `cutoff`, oldest first, with
    the latest expiry of any lease their work rows hold (`leases_until`)."""
    e = BATCH_ENDED
    return await db.all(
        f"SELECT id, status, {e} AS ended_at,"
        " (SELECT max(expires_at) FROM work w WHERE w.batch_id = b.id) AS leases_until"
        f" FROM batches b WHERE {e} BETWEEN ? AND ? AND ({e} > ? OR id > ?)"
        f" ORDER BY {e}, id LIMIT ?",
        (ended_at, cutoff, ended_at, after_id, limit),
    )


async def batch_blob_keys(db: Db, batch_id: str) -> list[str]:
    """Every R2 key a row names under a batch: its shards' committed parts and the parts of
    its output and error files."""
    rows = await db.all(
        "SELECT out_blob AS k FROM work WHERE batch_id = ? AND out_blob IS NOT NULL"
        " UNION SELECT err_blob FROM work WHERE batch_id = ? AND err_blob IS NOT NULL"
        " UNION SELECT json_extract(p.value, '$[0]') FROM files f, json_each(f.parts) p"
        " WHERE f.id IN (SELECT output_file_id FROM batches WHERE id = ?"
        " UNION SELECT error_file_id FROM batches WHERE id = ?)",
        (batch_id, batch_id, batch_id, batch_id),
    )
    return [str(r["k"]) for r in rows if r["k"] is not None]
