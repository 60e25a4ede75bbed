"""The OpenAI Batch API over D1: create, retrieve, list, cancel, and the moves no one asks for
(expiry at the completion window, a cancel settling, a finished batch closing).

A batch's state moves only through conditional writes (jobdb), so two isolates, a cron run and
a node's commit may all try the same move: exactly one wins, the others change nothing. A
closed batch's output and error files are created in the same transaction as its final status.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jobdb
from files import parse_limit, purge_deleted
from jobdb import (
    ACTIVE_BATCH,
    ApiResult,
    Ids,
    Row,
    error,
    json_body,
    list_page,
    num,
    ok,
    opt_int,
)
from storage import Blobs, Db

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
WINDOW_S = {"24h": 24 * 3600}
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 20, 100
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
FINISHED = ("completed", "failed", "expired", "cancelled")
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def not_found(batch_id: str) -> ApiResult:
    return error(404, f"No such Batch object: {batch_id}", "batch_not_found", "id")


def _usage(raw: object) -> dict[str, object]:
    u = json.loads(str(raw)) if raw else {}
    return {
        "input_tokens": num(u.get("input_tokens")),
        "input_tokens_details": {"cached_tokens": num(u.get("cached_tokens"))},
        "output_tokens": num(u.get("output_tokens")),
        "output_tokens_details": {"reasoning_tokens": num(u.get("reasoning_tokens"))},
        "total_tokens": num(u.get("total_tokens")),
    }


def batch_object(b: Row) -> dict[str, object]:
    """OpenAI's Batch object from a batches row."""
    errors = json.loads(str(b["errors"])) if b.get("errors") else None
    obj: dict[str, object] = {
        "id": b["id"],
        "object": "batch",
        "endpoint": b["endpoint"],
        "model": b.get("model"),
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": b["input_file_id"],
        "completion_window": b["completion_window"],
        "status": b["status"],
        "output_file_id": b.get("output_file_id"),
        "error_file_id": b.get("error_file_id"),
        "created_at": num(b["created_at"]),
        "expires_at": opt_int(b.get("expires_at")),
    }
    obj.update({k: opt_int(b.get(k)) for k in TIMESTAMPS})
    obj["request_counts"] = {
        "total": num(b.get("total")),
        "completed": num(b.get("completed")),
        "failed": num(b.get("failed")),
    }
    obj["metadata"] = json.loads(str(b["metadata"])) if b.get("metadata") else None
    obj["usage"] = _usage(b.get("usage"))
    return obj


def _check_metadata(meta: object) -> str | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > METADATA_PAIRS:
        return f"metadata must be an object of at most {METADATA_PAIRS} pairs"
    for k, v in meta.items():
        if not isinstance(v, str) or len(k) > METADATA_KEY or len(v) > METADATA_VALUE:
            return (
                f"metadata keys are strings of at most {METADATA_KEY} characters and values"
                f" strings of at most {METADATA_VALUE}"
            )
    return None


def _output_expiry(raw: object) -> int | str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("anchor") != "created_at":
        return "output_expires_after must be {anchor: 'created_at', seconds: N}"
    seconds = raw.get("seconds")
    if type(seconds) is not int or not 3600 <= seconds <= 2_592_000:
        return "output_expires_after.seconds must be an integer from 3600 to 2592000"
    return seconds


async def create_batch(
    db: Db, ids: Ids, owner: str, role: str, body: object, now: float
) -> ApiResult:
    """`POST /v1/batches`: a `validating` batch and the one work item that validates it."""
    try:
        req = json_body(body)
    except (UnicodeDecodeError, ValueError):
        return error(400, "the request body is not valid JSON", "invalid_json")
    if not isinstance(req, dict):
        return error(400, "the request body must be a JSON object", "invalid_request")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(req.get(name), str):
            return error(
                400, f"'{name}' is required (a string)", "missing_required_parameter", name
            )
    endpoint, window = req["endpoint"], req["completion_window"]
    if endpoint not in ENDPOINTS:
        return error(
            400, f"endpoint must be one of {', '.join(ENDPOINTS)}", "invalid_value", "endpoint"
        )
    if window not in WINDOW_S:
        return error(400, "completion_window must be '24h'", "invalid_value", "completion_window")
    why = _check_metadata(req.get("metadata"))
    if why:
        return error(400, why, "invalid_value", "metadata")
    out_expiry = _output_expiry(req.get("output_expires_after"))
    if isinstance(out_expiry, str):
        return error(400, out_expiry, "invalid_value", "output_expires_after")
    f = await jobdb.live_file(db, owner, req["input_file_id"], now)
    if f is None:
        return error(
            400, f"No such File object: {req['input_file_id']}", "file_not_found", "input_file_id"
        )
    if f["purpose"] != "batch":
        return error(
            400, "the input file's purpose must be 'batch'", "invalid_file", "input_file_id"
        )
    if f.get("blob") is None or f.get("parts") is not None:
        return error(
            400, "the input file must be an uploaded file", "invalid_file", "input_file_id"
        )
    created = int(now)
    meta = req.get("metadata")
    row: Row = {
        "id": ids.new("batch_"),
        "owner": owner,
        "role": role,
        "endpoint": endpoint,
        "input_file_id": f["id"],
        "completion_window": window,
        "status": "validating",
        "created_at": created,
        "expires_at": created + WINDOW_S[window],
        "metadata": json.dumps(meta) if meta is not None else None,
        "output_expires_s": out_expiry,
    }
    validate = {"id": ids.new("wrk_"), "offset": 0, "length": num(f["bytes"])}
    await jobdb.insert_batch(db, row, validate)
    stored = await jobdb.owned_batch(db, owner, str(row["id"]))
    assert stored is not None
    return ok(batch_object(stored))


async def get_batch(db: Db, ids: Ids, owner: str, batch_id: str, now: float) -> ApiResult:
    b = await jobdb.owned_batch(db, owner, batch_id)
    if b is None:
        return not_found(batch_id)
    return ok(batch_object(await settle(db, ids, b, now, deep=True)))


async def list_batches(
    db: Db,
    ids: Ids,
    owner: str,
    now: float,
    after: str | None = None,
    limit: str | None = None,
) -> ApiResult:
    """`GET /v1/batches?after=&limit=`: newest first; next page = `after=<last_id>`."""
    n = parse_limit(limit, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX)
    if isinstance(n, ApiResult):
        return n
    cursor = None
    if after is not None:
        cursor = await jobdb.owned_batch(db, owner, after)
        if cursor is None:
            return error(400, f"after: no such Batch object: {after}", "invalid_value", "after")
    rows = await jobdb.list_batches(db, owner, n + 1, cursor)
    data = [batch_object(await settle(db, ids, b, now)) for b in rows[:n]]
    return list_page(data, len(rows) > n)


async def cancel_batch(db: Db, ids: Ids, owner: str, batch_id: str, now: float) -> ApiResult:
    """`POST /v1/batches/{id}/cancel`: -> cancelling (pending work dropped at once; leased
    shards may still commit what their nodes finished), -> cancelled when no lease is left."""
    b = await jobdb.owned_batch(db, owner, batch_id)
    if b is None:
        return not_found(batch_id)
    b = await settle(db, ids, b, now)
    if b["status"] in ACTIVE_BATCH:
        await jobdb.start_cancel(db, batch_id, now)
        b = await settle(db, ids, await _reload(db, batch_id), now)
        if b["status"] in ("cancelling", "cancelled"):
            return ok(batch_object(b))
    elif b["status"] == "cancelling":
        return ok(batch_object(b))
    return error(
        409,
        f"a batch with status '{b['status']}' cannot be cancelled",
        "batch_not_cancellable",
        "id",
    )


async def _reload(db: Db, batch_id: str) -> Row:
    b = await jobdb.batch_by_id(db, batch_id)
    assert b is not None
    return b


async def settle(db: Db, ids: Ids, b: Row, now: float, deep: bool = False) -> Row:
    """Apply the moves a batch is due: expiry past its window, a cancel whose leases are gone,
    and (`deep`: costs a query) completion when its last shard committed but the closing
    write was lost. Returns the row as it is afterwards."""
    status, batch_id = b["status"], str(b["id"])
    if status in ACTIVE_BATCH and num(b["expires_at"]) <= now:
        await jobdb.drop_open_work(db, batch_id, now, expired_leases_only=False)
        await close(db, ids, b, ACTIVE_BATCH, "expired", now)
    elif status == "cancelling":
        await jobdb.drop_open_work(db, batch_id, now, expired_leases_only=True)
        if await jobdb.has_open_work(db, batch_id):
            return b
        await close(db, ids, b, ("cancelling",), "cancelled", now)
    elif status == "in_progress" and deep:
        if await jobdb.has_open_work(db, batch_id):
            return b
        await close(db, ids, b, ("in_progress",), "completed", now)
    else:
        return b
    return await _reload(db, batch_id)


async def close(
    db: Db, ids: Ids, b: Row, from_status: Sequence[str], to_status: str, now: float
) -> bool:
    """Close a batch whose lines work is all done or cancelled: output file over the done
    shards' output parts (if any line completed), error file over their error parts (if any
    failed), final counts, final status. A no-op if open work remains or another caller
    closed it first."""
    batch_id = str(b["id"])
    shards = await jobdb.done_shards(db, batch_id)
    out = [(str(s["out_blob"]), 0, num(s["out_bytes"])) for s in shards if num(s["out_bytes"])]
    err = [(str(s["err_blob"]), 0, num(s["err_bytes"])) for s in shards if num(s["err_bytes"])]
    created = int(now)
    keep_s = b.get("output_expires_s")
    expires_at = created + num(keep_s) if keep_s is not None else None
    rows: list[Row] = []
    out_id = err_id = None
    for parts, suffix in ((out, "output"), (err, "error")):
        if not parts:
            continue
        file_id = ids.new("file-")
        rows.append(
            {
                "id": file_id,
                "owner": b["owner"],
                "purpose": "batch_output",
                "filename": f"{batch_id}_{suffix}.jsonl",
                "bytes": sum(n for _, _, n in parts),
                "created_at": created,
                "expires_at": expires_at,
                "status": "processed",
                "blob": None,
                "data_offset": 0,
                "parts": json.dumps(parts, separators=(",", ":")),
            }
        )
        if suffix == "output":
            out_id = file_id
        else:
            err_id = file_id
    return await jobdb.close_batch(db, batch_id, from_status, to_status, now, rows, out_id, err_id)


async def after_commit(db: Db, ids: Ids, batch_id: str, now: float) -> None:
    """After a node's commit: close the batch if that was its last open work."""
    b = await jobdb.batch_by_id(db, batch_id)
    if b is not None:
        await settle(db, ids, b, now, deep=True)


async def expire_due(db: Db, blobs: Blobs, ids: Ids, now: float) -> int:
    """The cron: expire batches past their window, settle cancels, close batches whose
    closing write was lost, purge blobs of deleted files. Returns how many batches moved."""
    moved = 0
    for b in await jobdb.batches_to_settle(db, now):
        after = await settle(db, ids, b, now, deep=True)
        moved += after["status"] != b["status"]
    await purge_deleted(db, blobs, now)
    return moved


STATUS_MINE = 20  # /api/status lists at most this many of the caller's open batches


async def status_view(db: Db, owner: str, now: float) -> dict[str, object]:
    """/api/status's `batches`: how many batches of all owners are at work, and the caller's
    own open ones (never another owner's ids), newest first, with shard progress and which
    node holds which shard. A read only: nothing is settled here."""
    mine = await jobdb.open_batches(db, owner, STATUS_MINE)
    ids = [str(b["id"]) for b in mine]
    shards: dict[str, dict[str, int]] = {
        i: {"total": 0, "pending": 0, "leased": 0, "done": 0} for i in ids
    }
    for r in await jobdb.shard_states(db, ids):
        counts = shards[str(r["batch_id"])]
        counts["total"] += num(r["n"])
        if str(r["state"]) in counts:
            counts[str(r["state"])] += num(r["n"])
    holders: dict[str, list[dict[str, object]]] = {i: [] for i in ids}
    for r in await jobdb.lease_holders(db, ids, now):
        holders[str(r["batch_id"])].append(
            {
                "node": opt_int(r["node"]),
                "seq": num(r["seq"]),
                "kind": r["kind"],
                "lines": num(r["n_lines"]),
                "expires_at": int(float(r["expires_at"])),  # type: ignore[arg-type]
            }
        )
    return {
        "running": await jobdb.running_batches(db),
        "mine": [
            {
                "id": b["id"],
                "status": b["status"],
                "role": b["role"],
                "model": b.get("model"),
                "created_at": num(b["created_at"]),
                "expires_at": num(b["expires_at"]),
                "request_counts": {
                    "total": num(b["total"]),
                    "completed": num(b["completed"]),
                    "failed": num(b["failed"]),
                },
                "shards": shards[str(b["id"])],
                "holders": holders[str(b["id"])],
            }
            for b in mine
        ],
    }
