"""Every SQL statement of the fine-tuning core (tables in migrations/0002_fine_tuning.sql; the
`work` table of 0001 holds one row of kind 'train' per job, `work.batch_id` = the job id).

Same rules as jobdb: D1-compatible SQLite, <= 100 bound parameters, atomic only inside one
`Db.batch`. Every node write is conditional on the lease being current (`CUR`: the work row
still `leased` with that lease id and token), and a node commit's statements all carry that
condition with the row -> `done` last, so a refused, stale or repeated call changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobdb import Row, num
from storage import Db

ACTIVE_JOB = ("validating_files", "queued", "running")
FINAL_JOB = ("succeeded", "failed", "cancelled")
CUR = (
    "EXISTS (SELECT 1 FROM work WHERE lease_id = ? AND token = ? AND state = 'leased'"
    " AND kind = 'train')"
)
JOB_SELECT = (
    "SELECT j.*, w.state AS work_state, w.expires_at AS work_expires_at,"
    " w.attempts AS work_attempts FROM ft_jobs j"
    " LEFT JOIN work w ON w.batch_id = j.id AND w.kind = 'train'"
)
JOB_COLUMNS = (
    "id, owner, model, training_file, validation_file, status, hyperparameters, method,"
    " suffix, seed, created_at, metadata"
)
EVENT_INSERT = "INSERT INTO ft_events (id, job_id, created_at, level, message, type, data)"


def _marks(n: int) -> str:
    return ",".join("?" * n)


async def _one(db: Db, sql: str, params: Sequence[object]) -> Row | None:
    rows = await db.all(sql, params)
    return rows[0] if rows else None


def event_sql(
    event_id: str, job_id: str, now: float, message: str, level: str = "info", when: str = ""
) -> tuple[str, list[object]]:
    """A `message` event; `when` (its params appended by the caller) makes it conditional."""
    params: list[object] = [event_id, job_id, int(now), level, message]
    if when:
        return f"{EVENT_INSERT} SELECT ?, ?, ?, ?, ?, 'message', NULL WHERE {when}", params
    return f"{EVENT_INSERT} VALUES (?, ?, ?, ?, ?, 'message', NULL)", params


# ---------------------------------------------------------------------------- client side


async def insert_job(db: Db, job: Row, work_id: str, length: int, event_id: str) -> None:
    """The job, its one `train` work item and its first event, atomically."""
    cols = JOB_COLUMNS.split(", ")
    await db.batch(
        [
            (
                f"INSERT INTO ft_jobs ({JOB_COLUMNS}) VALUES ({_marks(len(cols))})",
                [job[c] for c in cols],
            ),
            (
                "INSERT INTO work (id, batch_id, kind, seq, state, offset, length, first_line,"
                " n_lines) VALUES (?, ?, 'train', 0, 'pending', 0, ?, 0, 0)",
                [work_id, job["id"], length],
            ),
            event_sql(
                event_id,
                str(job["id"]),
                float(job["created_at"]),  # type: ignore[arg-type]
                f"Validating training file: {job['training_file']}",
            ),
        ]
    )


async def owned_job(db: Db, owner: str, job_id: str) -> Row | None:
    return await _one(db, f"{JOB_SELECT} WHERE j.id = ? AND j.owner = ?", (job_id, owner))


async def list_jobs(
    db: Db, owner: str, limit: int, after: Row | None, metadata: Sequence[tuple[str, str]]
) -> list[Row]:
    sql = f"{JOB_SELECT} WHERE j.owner = ?"
    params: list[object] = [owner]
    for key, value in metadata:
        sql += " AND json_extract(j.metadata, ?) = ?"
        params += ['$."' + key.replace('"', "") + '"', value]
    if after is not None:
        sql += " AND (j.created_at < ? OR (j.created_at = ? AND j.id < ?))"
        params += [after["created_at"], after["created_at"], after["id"]]
    sql += " ORDER BY j.created_at DESC, j.id DESC LIMIT ?"
    params.append(limit)
    return await db.all(sql, params)


async def cancel_job(db: Db, job_id: str, owner: str, now: float) -> bool:
    """Any non-final job -> cancelled (OpenAI answers the cancel with the final status)."""
    changed = await db.run(
        "UPDATE ft_jobs SET status = 'cancelled', finished_at = ?"
        f" WHERE id = ? AND owner = ? AND status IN ({_marks(len(ACTIVE_JOB))})",
        (int(now), job_id, owner, *ACTIVE_JOB),
    )
    return changed == 1


async def drop_work(db: Db, job_id: str, now: float, event_id: str | None) -> None:
    """A final job's open work: pending or lapsed -> cancelled (a live lease keeps its row,
    so its node learns of the cancel on its next heartbeat and may still log and stop)."""
    statements: list[tuple[str, Sequence[object]]] = [
        (
            "UPDATE work SET state = 'cancelled' WHERE batch_id = ? AND kind = 'train'"
            " AND (state = 'pending' OR (state = 'leased' AND expires_at < ?))"
            f" AND EXISTS (SELECT 1 FROM ft_jobs WHERE id = ? AND status IN ({_marks(3)}))",
            (job_id, now, job_id, *FINAL_JOB),
        )
    ]
    if event_id is not None:
        statements.append(event_sql(event_id, job_id, now, "The job was cancelled"))
    await db.batch(statements)


async def fail_lost(db: Db, job_id: str, error_json: str, now: float, max_attempts: int) -> bool:
    """An active job whose train work lapsed after `max_attempts` leases -> failed."""
    lost = (
        "EXISTS (SELECT 1 FROM work WHERE batch_id = ? AND kind = 'train' AND state = 'leased'"
        " AND expires_at < ? AND attempts >= ?)"
    )
    changed = await db.batch(
        [
            (
                "UPDATE ft_jobs SET status = 'failed', finished_at = ?, error = ?"
                f" WHERE id = ? AND status IN ({_marks(3)}) AND {lost}",
                (int(now), error_json, job_id, *ACTIVE_JOB, job_id, now, max_attempts),
            ),
            (
                "UPDATE work SET state = 'cancelled' WHERE batch_id = ? AND kind = 'train'"
                " AND state = 'leased' AND expires_at < ? AND attempts >= ?"
                " AND EXISTS (SELECT 1 FROM ft_jobs WHERE id = ? AND status = 'failed')",
                (job_id, now, max_attempts, job_id),
            ),
        ]
    )
    return changed[0] == 1


async def jobs_to_settle(db: Db, now: float, max_attempts: int, limit: int = 50) -> list[Row]:
    """For the cron: jobs with open work that must move (cancelled/final with a lapsed or
    pending lease, or active with a lapsed lease past the attempt limit)."""
    return await db.all(
        f"{JOB_SELECT} WHERE w.state IN ('pending', 'leased') AND ("
        f"(j.status IN ({_marks(3)}) AND (w.state = 'pending' OR w.expires_at < ?))"
        f" OR (j.status IN ({_marks(3)}) AND w.state = 'leased' AND w.expires_at < ?"
        " AND w.attempts >= ?)) LIMIT ?",
        (*FINAL_JOB, now, *ACTIVE_JOB, now, max_attempts, limit),
    )


@dataclass(frozen=True)
class JobList:
    """A job's events or checkpoints as its list endpoints page them: newest first by
    `order`, whose value is the page cursor (`after=<id>` continues below that row's)."""

    table: str
    order: str


EVENTS = JobList("ft_events", "seq")
CHECKPOINTS = JobList("ft_checkpoints", "step_number")


async def list_of_job(
    db: Db, what: JobList, job_id: str, limit: int, before: int | None
) -> list[Row]:
    sql = f"SELECT * FROM {what.table} WHERE job_id = ?"
    params: list[object] = [job_id]
    if before is not None:
        sql += f" AND {what.order} < ?"
        params.append(before)
    sql += f" ORDER BY {what.order} DESC LIMIT ?"
    params.append(limit)
    return await db.all(sql, params)


async def position_in_job(db: Db, what: JobList, job_id: str, row_id: str) -> int | None:
    """The cursor value of row `row_id` of this job (None: no such row of this job)."""
    sql = f"SELECT {what.order} AS at FROM {what.table} WHERE id = ? AND job_id = ?"
    row = await _one(db, sql, (row_id, job_id))
    return None if row is None else num(row["at"])


# ------------------------------------------------------------------------------ node side


async def take_train_lease(
    db: Db,
    node: int,
    models: Sequence[str],
    lease_id: str,
    token: str,
    now: float,
    lease_s: float,
    max_attempts: int,
) -> Row | None:
    """Atomically lease one job's train work: pending, or leased with a lapsed lease, of an
    active job whose base model the node serves, oldest job first."""
    leasable = "(state = 'pending' OR (state = 'leased' AND expires_at < ?))"
    pick = (
        "SELECT w.id FROM work w JOIN ft_jobs j ON j.id = w.batch_id WHERE w.kind = 'train'"
        f" AND (w.state = 'pending' OR (w.state = 'leased' AND w.expires_at < ?))"
        f" AND w.attempts < ? AND j.status IN ({_marks(3)})"
        f" AND j.model IN ({_marks(len(models))}) ORDER BY j.created_at, j.id LIMIT 1"
    )
    return await _one(
        db,
        "UPDATE work SET state = 'leased', lease_id = ?, token = ?, node = ?, leased_at = ?,"
        f" expires_at = ?, attempts = attempts + 1 WHERE id = ({pick}) AND {leasable}"
        " RETURNING id, batch_id, lease_id, token, expires_at, attempts",
        (
            lease_id,
            token,
            node,
            now,
            now + lease_s,
            now,
            max_attempts,
            *ACTIVE_JOB,
            *models,
            now,
        ),
    )


async def lease_context(db: Db, lease_id: str, token: str) -> Row | None:
    """What a current train lease holds: the work row, its job, the job's files' blobs and
    its latest checkpoint (ckpt_*); None if the lease is not current."""
    return await _one(
        db,
        "SELECT w.id, w.batch_id AS job_id, w.lease_id, w.token, w.expires_at, w.attempts,"
        " j.status AS job_status, j.owner, j.model, j.hyperparameters, j.method, j.seed,"
        " j.suffix, j.training_file, j.validation_file,"
        " tf.blob AS train_blob, tf.data_offset AS train_offset, tf.bytes AS train_bytes,"
        " vf.blob AS valid_blob, vf.data_offset AS valid_offset, vf.bytes AS valid_bytes,"
        " c.id AS ckpt_id, c.step_number AS ckpt_step, c.blob AS ckpt_blob,"
        " c.bytes AS ckpt_bytes"
        " FROM work w JOIN ft_jobs j ON j.id = w.batch_id"
        " LEFT JOIN files tf ON tf.id = j.training_file"
        " LEFT JOIN files vf ON vf.id = j.validation_file"
        " LEFT JOIN ft_checkpoints c ON c.id = (SELECT id FROM ft_checkpoints"
        " WHERE job_id = j.id ORDER BY step_number DESC LIMIT 1)"
        " WHERE w.lease_id = ? AND w.token = ? AND w.state = 'leased' AND w.kind = 'train'",
        (lease_id, token),
    )


async def train_work(db: Db, lease_id: str) -> Row | None:
    return await _one(db, "SELECT * FROM work WHERE lease_id = ? AND kind = 'train'", (lease_id,))


async def extend_train_lease(db: Db, lease_id: str, token: str, expires_at: float) -> Row | None:
    """A heartbeat: the lease runs on while current; answers the job's status."""
    return await _one(
        db,
        "UPDATE work SET expires_at = ? WHERE lease_id = ? AND token = ? AND state = 'leased'"
        " AND kind = 'train' RETURNING expires_at,"
        " (SELECT status FROM ft_jobs WHERE id = work.batch_id) AS job_status",
        (expires_at, lease_id, token),
    )


def validated_sql(job_id: str, lease_id: str, token: str) -> tuple[str, list[object]]:
    """validating_files -> running: the node accepted the files (said so, or is training)."""
    return (
        f"UPDATE ft_jobs SET status = 'running' WHERE id = ? AND status = 'validating_files'"
        f" AND {CUR}",
        [job_id, lease_id, token],
    )


async def append_events(
    db: Db,
    job_id: str,
    lease_id: str,
    token: str,
    events_json: str,
    n: int,
    now: float,
    max_events: int,
    validated: bool,
) -> list[int]:
    """The node's events (a JSON list of {id, level, message, type, data-as-JSON-text}) in
    order, only while the lease is current and the job under its event cap."""
    statements: list[tuple[str, Sequence[object]]] = []
    if validated:
        statements.append(validated_sql(job_id, lease_id, token))
    # Both statements test the same condition on the same state (the insert leaves
    # node_events alone), so the events are stored and counted together or not at all.
    room = "(SELECT node_events FROM ft_jobs WHERE id = ?) + ? <= ?"
    statements.append(
        (
            f"{EVENT_INSERT} SELECT json_extract(value, '$.id'), ?, ?,"
            " json_extract(value, '$.level'), json_extract(value, '$.message'),"
            " json_extract(value, '$.type'), json_extract(value, '$.data')"
            f" FROM json_each(?) WHERE {CUR} AND {room} ORDER BY key",
            [job_id, int(now), events_json, lease_id, token, job_id, n, max_events],
        )
    )
    statements.append(
        (
            f"UPDATE ft_jobs SET node_events = node_events + ? WHERE id = ? AND {CUR} AND {room}",
            [n, job_id, lease_id, token, job_id, n, max_events],
        )
    )
    return await db.batch(statements)


async def metrics_events(db: Db, job_id: str, limit: int = 20_000) -> list[Row]:
    return await db.all(
        "SELECT data FROM ft_events WHERE job_id = ? AND type = 'metrics' AND data IS NOT NULL"
        " ORDER BY seq LIMIT ?",
        (job_id, limit),
    )


async def checkpoint_at(db: Db, job_id: str, step: int) -> Row | None:
    return await _one(
        db,
        "SELECT id, blob FROM ft_checkpoints WHERE job_id = ? AND step_number = ?",
        (job_id, step),
    )


async def record_checkpoint(
    db: Db, c: Row, lease_id: str, token: str, event_id: str, now: float
) -> bool:
    """A checkpoint row (a later upload of the same step replaces its blob), the job
    validated, an event — all only while the lease is current and the job active."""
    active = f"EXISTS (SELECT 1 FROM ft_jobs WHERE id = ? AND status IN ({_marks(3)}))"
    job_id = str(c["job_id"])
    changed = await db.batch(
        [
            (
                "INSERT INTO ft_checkpoints (id, job_id, step_number, metrics,"
                " fine_tuned_model_checkpoint, blob, bytes, created_at)"
                f" SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE {CUR} AND {active}"
                " ON CONFLICT (job_id, step_number) DO UPDATE SET metrics = excluded.metrics,"
                " blob = excluded.blob, bytes = excluded.bytes, created_at = excluded.created_at",
                [
                    c["id"],
                    job_id,
                    c["step_number"],
                    c["metrics"],
                    c["fine_tuned_model_checkpoint"],
                    c["blob"],
                    c["bytes"],
                    int(now),
                    lease_id,
                    token,
                    job_id,
                    *ACTIVE_JOB,
                ],
            ),
            validated_sql(job_id, lease_id, token),
            _cond_event(event_id, job_id, now, c, lease_id, token, active),
        ]
    )
    return changed[0] == 1


def _cond_event(
    event_id: str, job_id: str, now: float, c: Row, lease_id: str, token: str, active: str
) -> tuple[str, list[object]]:
    sql, params = event_sql(
        event_id,
        job_id,
        now,
        f"Checkpoint created at step {c['step_number']}",
        when=f"{CUR} AND {active}",
    )
    return sql, [*params, lease_id, token, job_id, *ACTIVE_JOB]


async def commit_train(
    db: Db,
    job_id: str,
    lease_id: str,
    token: str,
    job_update: tuple[str, list[object]] | None,
    extra: Sequence[tuple[str, list[object]]],
    now: float,
) -> list[int]:
    """A train commit in one transaction: `job_update` (conditional on CUR by the caller's
    SQL), `extra` statements (each conditional on CUR), then the work row -> done."""
    statements: list[tuple[str, Sequence[object]]] = []
    if job_update is not None:
        statements.append(job_update)
    statements += list(extra)
    statements.append(
        (
            "UPDATE work SET state = 'done' WHERE lease_id = ? AND token = ?"
            " AND state = 'leased' AND kind = 'train'",
            [lease_id, token],
        )
    )
    return await db.batch(statements)


# -------------------------------------------------------------------------------- serving


async def adapter_by_slug(db: Db, slug: str) -> Row | None:
    return await _one(db, "SELECT * FROM ft_adapters WHERE slug = ?", (slug,))


async def adapter_by_name(db: Db, name: str) -> Row | None:
    return await _one(db, "SELECT * FROM ft_adapters WHERE name = ?", (name,))


async def adapters_of(db: Db, owner: str, limit: int) -> list[Row]:
    return await db.all(
        "SELECT name, base, created_at FROM ft_adapters WHERE owner = ?"
        " ORDER BY created_at, name LIMIT ?",
        (owner, limit),
    )


# ---------------------------------------------------------------------- /api/status's view

STATUS_ACTIVE = 20  # /api/status lists at most this many of the caller's active jobs
STATUS_FINISHED = 10  # ... and of its finished ones
_STATUS_JOB = (
    "SELECT j.id, j.model, j.suffix, j.fine_tuned_model, j.status, j.hyperparameters,"
    " j.created_at, j.finished_at, j.trained_tokens, j.error,"
    " w.state AS work_state, w.node AS work_node, w.expires_at AS work_expires_at,"
    " w.attempts AS work_attempts,"
    # The newest metrics event only: ft_events_job (job_id, seq) walked backwards.
    " (SELECT e.data FROM ft_events e WHERE e.job_id = j.id AND e.type = 'metrics'"
    " AND e.data IS NOT NULL ORDER BY e.seq DESC LIMIT 1) AS last_metrics,"
    " (SELECT COUNT(*) FROM ft_checkpoints c WHERE c.job_id = j.id) AS checkpoints"
    # `+w.kind`: look the work row up by work_batch (batch_id), not by every train row's kind.
    " FROM ft_jobs j LEFT JOIN work w ON w.batch_id = j.id AND +w.kind = 'train'"
    " WHERE {owner} = ? AND j.status IN (?, ?, ?) ORDER BY j.created_at DESC, j.id DESC LIMIT ?"
)


async def status_rows(db: Db, owner: str, now: float) -> tuple[list[Row], Row]:
    """/api/status's two reads: this owner's active jobs (newest first, at most
    STATUS_ACTIVE) then its newest finished ones (at most STATUS_FINISHED), each with its train
    work row, latest metrics event and checkpoint count; and, over every owner, the number of
    active jobs and the nodes holding a live train lease (a comma list, no job ids)."""
    # Rows read stay bounded by the index each branch walks: active jobs by ft_jobs_status
    # (`+j.owner` keeps the owner index out: every key's active jobs, few), finished ones by
    # the owner's index newest first (stops after STATUS_FINISHED, past the owner's active).
    active = _STATUS_JOB.format(owner="+j.owner")
    finished = _STATUS_JOB.format(owner="j.owner")
    mine = await db.all(
        f"SELECT * FROM ({active}) UNION ALL SELECT * FROM ({finished})",
        (owner, *ACTIVE_JOB, STATUS_ACTIVE, owner, *FINAL_JOB, STATUS_FINISHED),
    )
    summary = await _one(
        db,
        f"SELECT (SELECT COUNT(*) FROM ft_jobs WHERE status IN ({_marks(3)})) AS active,"
        " (SELECT group_concat(node) FROM work WHERE kind = 'train' AND state = 'leased'"
        " AND expires_at >= ?) AS nodes",
        (*ACTIVE_JOB, now),
    )
    return mine, summary or {"active": 0, "nodes": None}


# ------------------------------------------------------------- storage sweep (sweep.py)


async def jobs_to_sweep(
    db: Db, ended_at: int, after_id: str, cutoff: float, limit: int
) -> list[Row]:
    """Final jobs after (ended_at, after_id) that finished by `cutoff`, oldest first, with
    the latest expiry of any lease their train work holds (`leases_until`)."""
    return await db.all(
        "SELECT id, status, finished_at AS ended_at,"
        " (SELECT max(expires_at) FROM work w WHERE w.batch_id = j.id) AS leases_until"
        " FROM ft_jobs j WHERE finished_at IS NOT NULL AND finished_at BETWEEN ? AND ?"
        " AND (finished_at > ? OR id > ?) ORDER BY finished_at, id LIMIT ?",
        (ended_at, cutoff, ended_at, after_id, limit),
    )


async def job_blob_keys(db: Db, job_id: str) -> list[str]:
    """Every R2 key a row names under a job: its checkpoints, its adapter, its results file."""
    rows = await db.all(
        "SELECT blob AS k FROM ft_checkpoints WHERE job_id = ?"
        " UNION SELECT blob FROM ft_adapters WHERE job_id = ?"
        " UNION SELECT f.blob FROM ft_jobs j, json_each(j.result_files) r"
        " JOIN files f ON f.id = r.value WHERE j.id = ?",
        (job_id, job_id, job_id),
    )
    return [str(r["k"]) for r in rows if r["k"] is not None]
