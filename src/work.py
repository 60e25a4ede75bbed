"""The node-facing half of the batch core: leases over work items, the lease's input range,
heartbeats, result parts and commits.

Why it is safe to lose a node at any moment: a lease is a token on one work row; it lapses
when its node stops heart-beating and the next `lease` call may take the row over with a new
token. A node PUTs its results under keys that name its own lease, then commits with its token:
the commit is one conditional UPDATE that succeeds only while that token still holds the row,
so each shard is committed exactly once and a refused commit's objects are garbage (deleted),
never served. A commit after the lease lapsed but before anybody took it over is accepted.
"""

from __future__ import annotations

import json

import batches
import jobdb
from jobdb import ApiResult, BatchSettings, Ids, Row, error, num, ok
from storage import Blobs, Db

PARTS = {"output": "out", "error": "err"}
MAX_LINES = 50_000  # OpenAI: at most 50,000 requests per batch
MAX_ERRORS = 1000  # validation errors kept per batch
USAGE_KEYS = ("input_tokens", "output_tokens", "total_tokens")


def lease_lost(lease_id: str) -> ApiResult:
    return error(
        409,
        f"lease {lease_id[:64]} is not current: it lapsed and was taken over, or its batch ended",
        "lease_lost",
    )


def bad_body(message: str, param: str | None = None) -> ApiResult:
    return error(400, message, "invalid_body", param)


def _parse(body: object) -> dict[str, object] | ApiResult:
    try:
        value = jobdb.json_body(body)
    except (UnicodeDecodeError, ValueError):
        return bad_body("the body is not valid JSON")
    if not isinstance(value, dict):
        return bad_body("the body must be a JSON object")
    return value


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= 10**12


def _token(req: dict[str, object]) -> str | ApiResult:
    token = req.get("token")
    if not isinstance(token, str) or not 0 < len(token) <= 128:
        return bad_body("'token' (the lease token) is required", "token")
    return token


def _with_token(body: object) -> tuple[dict[str, object], str] | ApiResult:
    """A node call's JSON body and the lease token it must carry."""
    req = _parse(body)
    if isinstance(req, ApiResult):
        return req
    token = _token(req)
    return token if isinstance(token, ApiResult) else (req, token)


def result_key(w: Row, part: str) -> str:
    """The R2 key of one lease's output or error part: named by the lease, so a taken-over
    lease's objects never mix with its successor's."""
    return f"b/{w['batch_id']}/w/{num(w['seq'])}/{w['lease_id']}.{PARTS[part]}"


def _lease_view(w: Row, settings: BatchSettings) -> dict[str, object]:
    lease_id = str(w["lease_id"])
    view: dict[str, object] = {
        "id": lease_id,
        "token": w["token"],
        "kind": w["kind"],
        "batch_id": w["batch_id"],
        "endpoint": w["endpoint"],
        "model": w.get("model"),
        "seq": num(w["seq"]),
        "first_line": num(w["first_line"]),
        "n_lines": num(w["n_lines"]),
        "bytes": num(w["length"]),
        "lease_s": settings.lease_s,
        "heartbeat_s": settings.heartbeat_s,
        "expires_at": float(w["expires_at"]),  # type: ignore[arg-type]
        "input": f"/api/nodes/v1/leases/{lease_id}/input",
    }
    if w["kind"] == "validate":
        view["shard_lines"] = settings.shard_lines
        view["max_lines"] = MAX_LINES
    return view


async def lease(
    db: Db,
    ids: Ids,
    node: int,
    may_lease_any: bool,
    body: object,
    now: float,
    settings: BatchSettings,
) -> ApiResult:
    """`POST /api/nodes/v1/leases` `{"models": [...], "idle": bool}` -> 200 {"lease": L} or
    204. `may_lease_any`: the node is in the batch pool; any other node leases only when
    BATCH_HELPERS is on and it says it is idle. Shards only of batches whose model the node
    serves; validation work to any node allowed to lease."""
    req = _parse(body)
    if isinstance(req, ApiResult):
        return req
    models = req.get("models", [])
    idle = req.get("idle", False)
    if (
        not isinstance(models, list)
        or len(models) > jobdb.MAX_MODELS
        or not all(isinstance(m, str) and 0 < len(m) <= 256 for m in models)
    ):
        return bad_body(
            f"'models' must be a list of at most {jobdb.MAX_MODELS} model names", "models"
        )
    if not isinstance(idle, bool):
        return bad_body("'idle' must be true or false", "idle")
    if not (may_lease_any or (settings.helpers and idle)):
        return ApiResult(204)
    row = await jobdb.take_lease(
        db,
        node,
        list(dict.fromkeys(models)),
        ids.new("lease_"),
        ids.token(),
        now,
        settings.lease_s,
    )
    if row is None:
        return ApiResult(204)
    return ok({"lease": _lease_view(row, settings)})


async def _current(db: Db, ids: Ids, lease_id: str, token: str, now: float) -> Row | None:
    """The work a current lease holds, or None. A lease whose batch is past its completion
    window is not current: the batch is expired here and then (its work cancelled)."""
    w = await jobdb.lease_row(db, lease_id, token)
    if w is not None and num(w["batch_expires_at"]) <= now:
        b = await jobdb.batch_by_id(db, str(w["batch_id"]))
        if b is not None:
            await batches.settle(db, ids, b, now)
        return None
    return w


async def lease_input(db: Db, ids: Ids, lease_id: str, token: str | None, now: float) -> ApiResult:
    """`GET .../leases/<id>/input` (token in `x-heady-lease-token`): a stream plan of the
    work's byte range of the input file's data, or 409 when the lease is not current."""
    if not token:
        return bad_body("the x-heady-lease-token header is required", "token")
    w = await _current(db, ids, lease_id, token, now)
    if w is None or w.get("file_blob") is None:
        return lease_lost(lease_id)
    start = num(w["file_data_offset"]) + num(w["offset"])
    length = num(w["length"])
    headers = (
        ("content-type", "application/jsonl"),
        ("content-length", str(length)),
    )
    parts = ((str(w["file_blob"]), start, length),) if length else ()
    return ApiResult(200, None, headers, parts, length)


async def heartbeat(
    db: Db, lease_id: str, body: object, now: float, settings: BatchSettings
) -> ApiResult:
    """`POST .../leases/<id>/heartbeat` `{"token"}` -> 200 {"expires_at", "cancel"}: the
    lease runs `lease_s` from now; `cancel` tells the node its batch is being cancelled
    (commit what is finished, with partial: true)."""
    got = _with_token(body)
    if isinstance(got, ApiResult):
        return got
    _, token = got
    row = await jobdb.extend_lease(db, lease_id, token, now, now + settings.lease_s)
    if row is None:
        return lease_lost(lease_id)
    cancel = row["batch_status"] not in jobdb.ACTIVE_BATCH
    return ok({"expires_at": float(row["expires_at"]), "cancel": cancel})  # type: ignore[arg-type]


async def result_target(
    db: Db,
    ids: Ids,
    lease_id: str,
    token: str | None,
    part: str,
    content_length: str | None,
    now: float,
    settings: BatchSettings,
) -> str | ApiResult:
    """`PUT .../leases/<id>/results/{output|error}`: the R2 key the shell streams the body
    into (then answers {"bytes": n}), or the refusal: 400/411/413, or 409 lease_lost."""
    if part not in PARTS:
        return error(404, "results are 'output' or 'error'", "not_found")
    if not token:
        return bad_body("the x-heady-lease-token header is required", "token")
    if content_length is None:
        return error(411, "Content-Length is required", "length_required")
    if not content_length.strip().isdigit():
        return bad_body("Content-Length is not a number")
    if int(content_length) > settings.max_file_bytes:
        return error(
            413, f"a result part may be at most {settings.max_file_bytes} bytes", "file_too_large"
        )
    w = await _current(db, ids, lease_id, token, now)
    if w is None:
        return lease_lost(lease_id)
    if w["kind"] != "lines":
        return bad_body("a validate lease has no results to upload")
    return result_key(w, part)


async def commit(
    db: Db,
    blobs: Blobs,
    ids: Ids,
    lease_id: str,
    body: object,
    now: float,
    settings: BatchSettings,
) -> ApiResult:
    """`POST .../leases/<id>/commit`: the lease's work -> done, once. 200 {"state": "done"},
    409 lease_lost (a lines lease's uploaded parts are then deleted), 400 malformed."""
    got = _with_token(body)
    if isinstance(got, ApiResult):
        return got
    req, token = got
    w = await _current(db, ids, lease_id, token, now)
    if w is None:
        if await _drop_parts(db, blobs, lease_id, token):
            return ok({"state": "done"})  # a retry of a commit that was accepted
        return lease_lost(lease_id)
    if w["kind"] == "validate":
        result = await _commit_validate(db, ids, w, token, req, now, settings)
    else:
        result = await _commit_lines(db, blobs, w, token, req)
    if result.status == 200:
        await batches.after_commit(db, ids, str(w["batch_id"]), now)
    return result


async def release(
    db: Db, blobs: Blobs, ids: Ids, lease_id: str, body: object, now: float
) -> ApiResult:
    """`POST .../leases/<id>/release` `{"token", "lines", "bytes"}`: a node handing its GPU
    over gives back at once what it will not run, instead of letting the lease lapse.

    Parts the lease uploaded before are deleted (they covered lines it no longer holds).
    `lines: 0`: the whole lease back (its work is leasable again now) -> 200
    {"state": "released"}. `0 < lines < n_lines` (lines work only): the lease
    keeps its first `lines` lines, the first `bytes` bytes of its input range, and runs on (it
    is committed as usual, over those lines); the rest is a new work item, leasable now ->
    200 {"state": "leased", "n_lines", "bytes"}. `lines == n_lines` (and its bytes) changes
    nothing (a retried release). A stale token -> 409 lease_lost, changing nothing. Each
    line stays in exactly one work item, so it is committed at most once."""
    got = _with_token(body)
    if isinstance(got, ApiResult):
        return got
    req, token = got
    lines, size = req.get("lines"), req.get("bytes", 0)
    if not _is_count(lines) or not _is_count(size):
        return bad_body("'lines' and 'bytes' (what the lease keeps) must be counts", "lines")
    w = await _current(db, ids, lease_id, token, now)
    if w is None:
        return lease_lost(lease_id)
    n_lines, length = num(w["n_lines"]), num(w["length"])
    if lines == 0:
        accepted = await jobdb.release_all(db, lease_id, token)
        state: dict[str, object] = {"state": "released"}
    elif w["kind"] != "lines":
        return bad_body("only a lines lease can keep part of its work; give it all back (0)")
    elif (lines, size) == (n_lines, length):
        return ok({"state": "leased", "n_lines": n_lines, "bytes": length})
    elif not (lines < n_lines and 0 < size < length):  # type: ignore[operator]
        return bad_body(
            f"'lines' must be below the lease's {n_lines} lines and 'bytes' inside its"
            f" {length} bytes",
            "lines",
        )
    else:
        new_id = ids.new("wrk_")
        accepted = await jobdb.release_rest(db, lease_id, token, new_id, lines, size)  # type: ignore[arg-type]
        state = {"state": "leased", "n_lines": lines, "bytes": size}
    if not accepted:
        return lease_lost(lease_id)
    if w["kind"] == "lines":  # parts uploaded before this covered lines no longer its own
        await blobs.delete([result_key(w, p) for p in PARTS])
    if w["batch_status"] not in jobdb.ACTIVE_BATCH:  # cancelling: what came back is cancelled
        await batches.after_commit(db, ids, str(w["batch_id"]), now)
    return ok(state)


async def _drop_parts(db: Db, blobs: Blobs, lease_id: str, token: str) -> bool:
    """A refused commit: a lines lease's parts will never be served, so delete them (found
    only while the row still carries this lease id: it is overwritten when taken over).
    Returns True when this lease in fact committed already (a retried commit)."""
    w = await jobdb.work_row(db, lease_id)
    if w is None or w.get("token") != token:
        return False
    if w["state"] == "done":
        return True
    if w["kind"] == "lines":
        await blobs.delete([result_key(w, p) for p in PARTS])
    return False


def _usage(raw: object) -> dict[str, int] | None:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        return None
    out: dict[str, int] = {}
    for k in USAGE_KEYS:
        if k in raw:
            if not _is_count(raw[k]):
                return None
            out[k] = raw[k]  # type: ignore[assignment]
    for outer, inner in (
        ("input_tokens_details", "cached_tokens"),
        ("output_tokens_details", "reasoning_tokens"),
    ):
        details = raw.get(outer)
        if isinstance(details, dict) and _is_count(details.get(inner)):
            out[inner] = details[inner]
    return out


async def _commit_lines(
    db: Db, blobs: Blobs, w: Row, token: str, req: dict[str, object]
) -> ApiResult:
    completed, failed = req.get("completed"), req.get("failed")
    partial = req.get("partial", False)
    if not _is_count(completed) or not _is_count(failed):
        return bad_body("'completed' and 'failed' must be non-negative integers")
    if not isinstance(partial, bool):
        return bad_body("'partial' must be true or false", "partial")
    usage = _usage(req.get("usage"))
    if usage is None:
        return bad_body("'usage' must be {input_tokens, output_tokens, total_tokens}", "usage")
    n_lines = num(w["n_lines"])
    lines = completed + failed  # type: ignore[operator]
    if partial:
        if w["batch_status"] != "cancelling":
            return bad_body("a partial commit is accepted only while the batch is cancelling")
        if lines > n_lines:
            return bad_body(f"completed + failed exceeds the shard's {n_lines} lines")
    elif lines != n_lines:
        return bad_body(f"completed + failed must equal the shard's {n_lines} lines")
    out_key, err_key = result_key(w, "output"), result_key(w, "error")
    out_bytes = await blobs.size(out_key) or 0
    err_bytes = await blobs.size(err_key) or 0
    for count, size, part in ((completed, out_bytes, "output"), (failed, err_bytes, "error")):
        if count and not size:
            return bad_body(f"{count} lines counted but no {part} part was uploaded")
        if size and not count:
            return bad_body(f"an {part} part was uploaded but its count is 0")
    done = {
        "completed": completed,
        "failed": failed,
        "out_blob": out_key if out_bytes else None,
        "out_bytes": out_bytes,
        "err_blob": err_key if err_bytes else None,
        "err_bytes": err_bytes,
        "usage": json.dumps(usage, separators=(",", ":")),
    }
    if not await jobdb.commit_lines(db, w, token, done, str(w["batch_id"])):
        await _drop_parts(db, blobs, str(w["lease_id"]), token)
        return lease_lost(str(w["lease_id"]))
    return ok({"state": "done"})


def _check_plan(req: dict[str, object], w: Row, settings: BatchSettings) -> str | list[dict]:
    model, total, shards = req.get("model"), req.get("total"), req.get("shards")
    if not isinstance(model, str) or not 0 < len(model) <= 256:
        return "'model' must be the batch's model name"
    if type(total) is not int or not 1 <= total <= MAX_LINES:
        return f"'total' must be the number of lines, 1..{MAX_LINES}"
    if not isinstance(shards, list) or not 0 < len(shards) <= total:
        return "'shards' must be a non-empty list"
    keys = ("offset", "length", "first_line", "n_lines")
    line, end, size = 0, 0, num(w["length"])
    plan: list[dict] = []
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not all(_is_count(s.get(k)) for k in keys):
            return f"shards[{i}] must be {{offset, length, first_line, n_lines}} integers"
        if s["first_line"] != line:
            return f"shards[{i}].first_line must be {line} (contiguous 0-based request indexes)"
        if not 1 <= s["n_lines"] <= settings.shard_lines:
            return f"shards[{i}].n_lines must be 1..{settings.shard_lines}"
        if s["offset"] < end or s["length"] < 1 or s["offset"] + s["length"] > size:
            return f"shards[{i}] must be a byte range after the previous one, inside the file"
        line += s["n_lines"]
        end = s["offset"] + s["length"]
        plan.append({k: s[k] for k in keys} | {"seq": i + 1})
    if line != total:
        return "the shards' n_lines must add up to 'total'"
    return plan


def _check_errors(raw: object) -> str | list[dict]:
    if not isinstance(raw, list) or not raw:
        return "'errors' must be a non-empty list"
    kept: list[dict] = []
    for i, e in enumerate(raw[:MAX_ERRORS]):
        if not isinstance(e, dict):
            return f"errors[{i}] must be an object"
        code, message, line, param = (e.get(k) for k in ("code", "message", "line", "param"))
        if not isinstance(code, str) or not isinstance(message, str):
            return f"errors[{i}] needs 'code' and 'message' strings"
        if line is not None and not (type(line) is int and line >= 1):
            return f"errors[{i}].line must be a 1-based line number or null"
        if param is not None and not isinstance(param, str):
            return f"errors[{i}].param must be a string or null"
        kept.append({"code": code[:64], "line": line, "message": message[:1000], "param": param})
    return kept


async def _commit_validate(
    db: Db,
    ids: Ids,
    w: Row,
    token: str,
    req: dict[str, object],
    now: float,
    settings: BatchSettings,
) -> ApiResult:
    verdict = req.get("ok")
    lease_id, batch_id = str(w["lease_id"]), str(w["batch_id"])
    if verdict is True:
        plan = _check_plan(req, w, settings)
        if isinstance(plan, str):
            return bad_body(plan, "shards")
        for shard in plan:
            shard["id"] = ids.new("wrk_")
        accepted = await jobdb.commit_plan(
            db,
            lease_id,
            token,
            batch_id,
            json.dumps(plan, separators=(",", ":")),
            str(req["model"]),
            num(req["total"]),
            now,
        )
    elif verdict is False:
        errors = _check_errors(req.get("errors"))
        if isinstance(errors, str):
            return bad_body(errors, "errors")
        errors_json = json.dumps(errors, separators=(",", ":"))
        accepted = await jobdb.commit_invalid(db, lease_id, token, batch_id, errors_json, now)
    else:
        return bad_body("a validate commit needs 'ok': true or false", "ok")
    return ok({"state": "done"}) if accepted else lease_lost(lease_id)
