"""The node-facing half of fine-tuning: a node leases a job's `train` work like a batch shard
(same `work` table, same lease rules: one conditional UPDATE, a lapsed lease is taken over by
the next caller), validates the files, trains, and reports through its lease: events,
checkpoints, the adapter, the commit. Train lease ids start with `ftlease-`, so the shell sends
`/api/nodes/v1/leases/<id>/...` calls for them here (`is_train_lease`) and the rest to work.py.

Why nothing is lost or doubled when a node dies: every write a node makes is conditional on
its lease being current, in the same D1 transaction; uploads go to keys named by the lease.
A node that stops heart-beating loses the row to the next lease, whose L names the job's latest
recorded checkpoint (`checkpoint`, `resume_from`): the partner resumes instead of restarting.
"""

from __future__ import annotations

import json

import finetune_db
import work
from finetune import METRIC_KEYS, FtSettings, check_hyperparameters, job_hex
from finetune_db import ACTIVE_JOB, CUR
from heady_shared import ftnames
from jobdb import ApiResult, BatchSettings, Ids, Row, error, insert_file_sql, json_body, num, ok
from storage import Blobs, Db

API = "/api/nodes/v1/leases"
LEASE_PREFIX = "ftlease-"
BATCH_KINDS = ("validate", "lines")
KINDS = (*BATCH_KINDS, "train")
MAX_EVENTS_PER_CALL = 100
MAX_MESSAGE = 2000
MAX_DATA_BYTES = 4096
MAX_STEP = ftnames.MAX_STEP  # a checkpoint's step, as its name spells it
LEVELS = ("info", "warn", "error")
TYPES = ("message", "metrics")


def is_train_lease(lease_id: str) -> bool:
    """Which core answers `/api/nodes/v1/leases/<id>/...`: this module for train leases."""
    return lease_id.startswith(LEASE_PREFIX)


def lease_lost(lease_id: str) -> ApiResult:
    return error(
        409,
        f"lease {lease_id[:64]} is not current: it lapsed and was taken over, or its job ended",
        "lease_lost",
    )


def job_not_running(status: object) -> ApiResult:
    return error(409, f"the job is {status}: nothing more is accepted for it", "job_not_running")


def bad_body(message: str, param: str | None = None) -> ApiResult:
    return error(400, message, "invalid_body", param)


def _parse(body: object) -> dict[str, object] | ApiResult:
    try:
        value = json_body(body)
    except (UnicodeDecodeError, ValueError):
        return bad_body("the body is not valid JSON")
    if not isinstance(value, dict):
        return bad_body("the body must be a JSON object")
    return value


def _token(req: dict[str, object]) -> str | ApiResult:
    token = req.get("token")
    if not isinstance(token, str) or not 0 < len(token) <= 128:
        return bad_body("'token' (the lease token) is required", "token")
    return token


def checkpoint_key(job_id: str, step: int, lease_id: str) -> str:
    return f"ft/{job_id}/ckpt/{step}/{lease_id}.tar"


def adapter_key(job_id: str, lease_id: str) -> str:
    return f"ft/{job_id}/adapter/{lease_id}.tar"


def model_name(ctx: Row) -> str:
    job_id = str(ctx["job_id"])
    return ftnames.ft_model_name(str(ctx["model"]), ctx.get("suffix"), job_hex(job_id))  # type: ignore[arg-type]


def lease_view(ctx: Row, settings: FtSettings) -> dict[str, object]:
    """L for a train lease (what `POST /api/nodes/v1/leases` answers)."""
    lease_id = str(ctx["lease_id"])
    base = f"{API}/{lease_id}"
    resume = None
    if ctx.get("ckpt_id") is not None:
        resume = {
            "id": ctx["ckpt_id"],
            "step_number": num(ctx["ckpt_step"]),
            "bytes": num(ctx["ckpt_bytes"]),
            "path": f"{base}/checkpoint",
        }
    name = model_name(ctx)
    method = json.loads(str(ctx["method"]))
    return {
        "id": lease_id,
        "token": ctx["token"],
        "kind": "train",
        "job_id": ctx["job_id"],
        "model": ctx["model"],
        "method": method,
        "hyperparameters": json.loads(str(ctx["hyperparameters"])),
        "seed": num(ctx["seed"]),
        "suffix": ctx.get("suffix"),
        "fine_tuned_model": name,
        "slug": ftnames.slug(name),
        "attempt": num(ctx["attempts"]),
        "validated": ctx["job_status"] != "validating_files",
        "lease_s": settings.lease_s,
        "heartbeat_s": settings.heartbeat_s,
        "expires_at": float(ctx["expires_at"]),  # type: ignore[arg-type]
        "input": f"{base}/input",
        "bytes": num(ctx["train_bytes"]),
        "validation_input": f"{base}/validation" if ctx.get("validation_file") else None,
        "validation_bytes": num(ctx["valid_bytes"]) if ctx.get("validation_file") else 0,
        "checkpoint": resume["path"] if resume else None,
        "resume_from": resume,
        "max_upload_bytes": settings.max_blob_bytes,
    }


async def lease_for_node(
    db: Db,
    ids: Ids,
    node: int,
    may_lease_any: bool,
    may_train: bool,
    body: object,
    now: float,
    settings: BatchSettings,
    ft: FtSettings,
) -> ApiResult:
    """`POST /api/nodes/v1/leases` `{"models", "idle", "kinds"?}`: the one lease call for
    every kind. `kinds` absent = the batch kinds (the batch worker's request, unchanged);
    `"train"` in it asks for a job to train: given only to nodes that may train
    (`may_train`), for jobs whose base model is in `models`, before any batch work."""
    req = _parse(body)
    if isinstance(req, ApiResult):
        return req
    kinds = req.get("kinds", list(BATCH_KINDS))
    if not isinstance(kinds, list) or not all(k in KINDS for k in kinds):
        return bad_body(f"'kinds' must be a list of {', '.join(KINDS)}", "kinds")
    if "train" in kinds and may_train:
        got = await lease_train(db, ids, node, req, now, ft)
        if got.status != 204:
            return got
    if any(k in kinds for k in BATCH_KINDS):
        return await work.lease(db, ids, node, may_lease_any, body, now, settings)
    return ApiResult(204)


async def lease_train(
    db: Db, ids: Ids, node: int, req: dict[str, object], now: float, ft: FtSettings
) -> ApiResult:
    models = req.get("models", [])
    if (
        not isinstance(models, list)
        or not 0 < len(models) <= 32
        or not all(isinstance(m, str) and 0 < len(m) <= 256 for m in models)
    ):
        return bad_body("'models' must list the 1 to 32 models this node serves", "models")
    lease_id, token = ids.new(LEASE_PREFIX), ids.token()
    row = await finetune_db.take_train_lease(
        db, node, list(dict.fromkeys(models)), lease_id, token, now, ft.lease_s, ft.max_attempts
    )
    if row is None:
        return ApiResult(204)
    ctx = await finetune_db.lease_context(db, lease_id, token)
    if ctx is None:  # taken over within the same instant: nothing to hand out
        return ApiResult(204)
    attempt = num(ctx["attempts"])
    if attempt <= 1:
        message = "Fine-tuning job started"
    elif ctx.get("ckpt_id") is not None:
        message = f"Resuming from the checkpoint at step {num(ctx['ckpt_step'])} on another node"
    else:
        message = "Restarting on another node: the previous one stopped responding"
    sql, params = finetune_db.event_sql(
        ids.new("ftevent-"), str(ctx["job_id"]), now, message, when=CUR
    )
    await db.run(sql, [*params, lease_id, token])
    return ok({"lease": lease_view(ctx, ft)})


async def _context(db: Db, lease_id: str, token: str | None) -> Row | ApiResult:
    if not token or len(token) > 128:
        return bad_body("the x-heady-lease-token header is required", "token")
    if not is_train_lease(lease_id):
        return lease_lost(lease_id)
    ctx = await finetune_db.lease_context(db, lease_id, token)
    return lease_lost(lease_id) if ctx is None else ctx


def _stream(blob: object, offset: int, length: int, ctype: str) -> ApiResult:
    headers = (("content-type", ctype), ("content-length", str(length)))
    parts = ((str(blob), offset, length),) if length else ()
    return ApiResult(200, None, headers, parts, length)


async def lease_file(db: Db, lease_id: str, token: str | None, which: str) -> ApiResult:
    """`GET .../leases/<id>/input` (the training file) or `.../validation` (the validation
    file), token in `x-heady-lease-token`: a stream plan of the file's data."""
    ctx = await _context(db, lease_id, token)
    if isinstance(ctx, ApiResult):
        return ctx
    prefix = {"input": "train", "validation": "valid"}.get(which)
    if prefix is None or (which == "validation" and not ctx.get("validation_file")):
        return error(404, "this job has no such file", "not_found")
    if ctx.get(f"{prefix}_blob") is None:
        return error(404, "the file's data is gone (deleted)", "file_not_found")
    return _stream(
        ctx[f"{prefix}_blob"],
        num(ctx[f"{prefix}_offset"]),
        num(ctx[f"{prefix}_bytes"]),
        "application/jsonl",
    )


async def lease_checkpoint(db: Db, lease_id: str, token: str | None) -> ApiResult:
    """`GET .../leases/<id>/checkpoint`: the job's latest checkpoint tar (to resume from)."""
    ctx = await _context(db, lease_id, token)
    if isinstance(ctx, ApiResult):
        return ctx
    if ctx.get("ckpt_id") is None:
        return error(404, "this job has no checkpoint yet", "not_found")
    return _stream(ctx["ckpt_blob"], 0, num(ctx["ckpt_bytes"]), "application/x-tar")


async def heartbeat(db: Db, lease_id: str, body: object, now: float, ft: FtSettings) -> ApiResult:
    """`POST .../leases/<id>/heartbeat` `{"token"}` -> 200 {"expires_at", "cancel"}: cancel
    is true once the job is cancelled (or otherwise final): stop and commit `cancelled`."""
    req = _parse(body)
    if isinstance(req, ApiResult):
        return req
    token = _token(req)
    if isinstance(token, ApiResult):
        return token
    if not is_train_lease(lease_id):
        return lease_lost(lease_id)
    row = await finetune_db.extend_train_lease(db, lease_id, token, now + ft.lease_s)
    if row is None:
        return lease_lost(lease_id)
    cancel = row["job_status"] not in ACTIVE_JOB
    return ok({"expires_at": float(row["expires_at"]), "cancel": cancel})  # type: ignore[arg-type]


def _check_events(raw: object, ids: Ids) -> list[dict[str, object]] | ApiResult:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_EVENTS_PER_CALL:
        return bad_body(f"'events' must be a list of 1 to {MAX_EVENTS_PER_CALL} events", "events")
    out: list[dict[str, object]] = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            return bad_body(f"events[{i}] must be an object", "events")
        level, type_ = e.get("level", "info"), e.get("type", "message")
        message, data = e.get("message"), e.get("data")
        if level not in LEVELS or type_ not in TYPES:
            return bad_body(
                f"events[{i}]: level is info|warn|error, type message|metrics", "events"
            )
        if not isinstance(message, str) or not 0 < len(message) <= MAX_MESSAGE:
            return bad_body(f"events[{i}].message must be 1 to {MAX_MESSAGE} characters", "events")
        data_json = None
        if data is not None:
            data_json = json.dumps(data, separators=(",", ":"))
            if len(data_json) > MAX_DATA_BYTES:
                return bad_body(f"events[{i}].data is over {MAX_DATA_BYTES} bytes", "events")
        out.append(
            {
                "id": ids.new("ftevent-"),
                "level": level,
                "message": message,
                "type": type_,
                "data": data_json,
            }
        )
    return out


async def append_events(
    db: Db, ids: Ids, lease_id: str, body: object, now: float, ft: FtSettings
) -> ApiResult:
    """`POST .../leases/<id>/events` `{"token", "events": [{level, message, type, data}],
    "validated"?: bool}` -> 200 {"accepted": n}: stored in order, all or none, only while
    the lease is current (409 otherwise). `validated: true` (or any `metrics` event) says
    the node accepted the files: validating_files -> running. Past `max_events` for the job
    the events are dropped (accepted: 0) rather than failing the training."""
    req = _parse(body)
    if isinstance(req, ApiResult):
        return req
    token = _token(req)
    if isinstance(token, ApiResult):
        return token
    events = _check_events(req.get("events"), ids)
    if isinstance(events, ApiResult):
        return events
    validated = req.get("validated", False)
    if not isinstance(validated, bool):
        return bad_body("'validated' must be true or false", "validated")
    validated = validated or any(e["type"] == "metrics" for e in events)
    ctx = await _context(db, lease_id, token)
    if isinstance(ctx, ApiResult):
        return ctx
    changed = await finetune_db.append_events(
        db,
        str(ctx["job_id"]),
        lease_id,
        token,
        json.dumps(events, separators=(",", ":")),
        len(events),
        now,
        ft.max_events,
        validated and ctx["job_status"] == "validating_files",
    )
    accepted = changed[-2]
    if accepted == 0 and await finetune_db.lease_context(db, lease_id, token) is None:
        return lease_lost(lease_id)  # lost between the read and the insert
    return ok({"accepted": accepted})


def _length(content_length: str | None, ft: FtSettings) -> ApiResult | None:
    if content_length is None:
        return error(411, "Content-Length is required", "length_required")
    if not content_length.strip().isdigit():
        return bad_body("Content-Length is not a number")
    if int(content_length) > ft.max_blob_bytes:
        return error(413, f"an upload may be at most {ft.max_blob_bytes} bytes", "file_too_large")
    return None


def _step(raw: str) -> int | ApiResult:
    if not raw.isdigit() or int(raw) > MAX_STEP:
        return bad_body(f"the checkpoint step must be an integer 0..{MAX_STEP}", "step")
    return int(raw)


async def _upload_context(
    db: Db, lease_id: str, token: str | None, content_length: str | None, ft: FtSettings
) -> Row | ApiResult:
    """The lease and job an upload (checkpoint or adapter) belongs to, or the refusal: a bad
    length, a lost lease, a job that is no longer running."""
    refused = _length(content_length, ft)
    if refused is not None:
        return refused
    ctx = await _context(db, lease_id, token)
    if isinstance(ctx, ApiResult):
        return ctx
    if ctx["job_status"] not in ACTIVE_JOB:
        return job_not_running(ctx["job_status"])
    return ctx


async def checkpoint_target(
    db: Db,
    lease_id: str,
    token: str | None,
    step: str,
    content_length: str | None,
    ft: FtSettings,
) -> str | ApiResult:
    """`PUT .../leases/<id>/checkpoints/<step>` (token header; body: the checkpoint tar):
    the R2 key the shell streams the body into, then it calls `record_checkpoint`."""
    n = _step(step)
    if isinstance(n, ApiResult):
        return n
    ctx = await _upload_context(db, lease_id, token, content_length, ft)
    if isinstance(ctx, ApiResult):
        return ctx
    return checkpoint_key(str(ctx["job_id"]), n, lease_id)


def _metrics(raw: str | None, step: int) -> dict[str, object]:
    """The checkpoint's metrics from the `x-heady-checkpoint-metrics` header (JSON); only
    OpenAI's keys with finite numbers are kept."""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {}
    if not isinstance(value, dict):
        value = {}
    out: dict[str, object] = {}
    for k, v in value.items():
        if k in METRIC_KEYS and type(v) in (int, float) and abs(v) < 1e30:
            out[k] = v
    out["step"] = step
    return out


async def record_checkpoint(
    db: Db,
    blobs: Blobs,
    ids: Ids,
    lease_id: str,
    token: str | None,
    step: str,
    metrics: str | None,
    now: float,
) -> ApiResult:
    """After the shell stored the PUT body at `checkpoint_target`'s key: the checkpoint row
    (listed by checkpoints.list; a re-upload of a step replaces it), an event -> 200
    {"id", "step_number", "bytes"}; 409 when the lease or the job ended meanwhile."""
    n = _step(step)
    if isinstance(n, ApiResult):
        return n
    ctx = await _context(db, lease_id, token)
    if isinstance(ctx, ApiResult):
        return ctx
    assert token is not None
    job_id = str(ctx["job_id"])
    key = checkpoint_key(job_id, n, lease_id)
    size = await blobs.size(key)
    if not size:
        return bad_body("no checkpoint was uploaded for this step", "step")
    if ctx["job_status"] not in ACTIVE_JOB:
        await _drop_unreferenced(db, blobs, job_id, n, key)
        return job_not_running(ctx["job_status"])
    old = await finetune_db.checkpoint_at(db, job_id, n)
    row: Row = {
        "id": ids.new("ftckpt-"),
        "job_id": job_id,
        "step_number": n,
        "metrics": json.dumps(_metrics(metrics, n)),
        "fine_tuned_model_checkpoint": ftnames.checkpoint_name(model_name(ctx), n),
        "blob": key,
        "bytes": size,
    }
    if not await finetune_db.record_checkpoint(db, row, lease_id, token, ids.new("ftevent-"), now):
        await _drop_unreferenced(db, blobs, job_id, n, key)
        return lease_lost(lease_id)
    if old is not None and old["blob"] != key:
        await blobs.delete([str(old["blob"])])  # the step's earlier upload, replaced
    stored = await finetune_db.checkpoint_at(db, job_id, n)
    assert stored is not None
    return ok({"id": stored["id"], "step_number": n, "bytes": size})


async def _drop_unreferenced(db: Db, blobs: Blobs, job_id: str, step: int, key: str) -> None:
    """A refused upload's object, unless a row (this lease's earlier record) names it."""
    row = await finetune_db.checkpoint_at(db, job_id, step)
    if row is None or row["blob"] != key:
        await blobs.delete([key])


async def adapter_target(
    db: Db, lease_id: str, token: str | None, content_length: str | None, ft: FtSettings
) -> str | ApiResult:
    """`PUT .../leases/<id>/adapter` (token header; body: the adapter tar, vLLM's form): the
    R2 key the shell streams it into (then answers {"bytes": n}); the commit names it."""
    ctx = await _upload_context(db, lease_id, token, content_length, ft)
    if isinstance(ctx, ApiResult):
        return ctx
    return adapter_key(str(ctx["job_id"]), lease_id)


def _check_error(raw: object) -> dict[str, object] | str:
    if not isinstance(raw, dict):
        return "'error' must be {code, message, param}"
    code, message, param = raw.get("code"), raw.get("message"), raw.get("param")
    if not isinstance(code, str) or not isinstance(message, str) or not message:
        return "'error' needs 'code' and 'message' strings"
    if param is not None and not isinstance(param, str):
        return "'error.param' must be a string or null"
    return {"code": code[:64], "message": message[:MAX_MESSAGE], "param": param and param[:64]}


async def commit(
    db: Db, blobs: Blobs, ids: Ids, lease_id: str, body: object, now: float
) -> ApiResult:
    """`POST .../leases/<id>/commit`, once per lease:
    - `{"token", "ok": true, "trained_tokens", "hyperparameters"?}` with the adapter
      uploaded -> job succeeded, `fine_tuned_model` = ft:<base>:heady:<suffix>:<job hex>,
      the adapter registered for serving;
    - `{"token", "ok": false, "error": {code, message, param}}` -> job failed (a bad file
      names its line in the message, param training_file|validation_file);
    - `{"token", "ok": false, "cancelled": true}` -> the node stopped for a cancel.
    200 {"state": "done", ...}; 409 lease_lost / job_not_running; 400 malformed."""
    req = _parse(body)
    if isinstance(req, ApiResult):
        return req
    token = _token(req)
    if isinstance(token, ApiResult):
        return token
    verdict = req.get("ok")
    if not isinstance(verdict, bool):
        return bad_body("a train commit needs 'ok': true or false", "ok")
    ctx = await finetune_db.lease_context(db, lease_id, token) if is_train_lease(lease_id) else None
    if ctx is None:
        return await _refused(db, blobs, lease_id, token)
    if verdict:
        return await _succeed(db, blobs, ids, ctx, token, req, now)
    if req.get("cancelled") is True:
        if ctx["job_status"] != "cancelled":
            return bad_body("'cancelled': true answers a cancel; the job is not cancelled")
        changed = await finetune_db.commit_train(
            db, str(ctx["job_id"]), lease_id, token, None, [], now
        )
        return ok({"state": "done"}) if changed[-1] == 1 else lease_lost(lease_id)
    err = _check_error(req.get("error"))
    if isinstance(err, str):
        return bad_body(err, "error")
    return await _fail(db, ids, ctx, token, err, now)


async def _refused(db: Db, blobs: Blobs, lease_id: str, token: str) -> ApiResult:
    """Not current: 200 again for a retry of an accepted commit; else 409, and the lease's
    adapter object is deleted when its row still names the lease (it is never served)."""
    w = await finetune_db.train_work(db, lease_id)
    if w is None or w.get("token") != token:
        return lease_lost(lease_id)
    if w["state"] == "done":
        return ok({"state": "done"})
    await blobs.delete([adapter_key(str(w["batch_id"]), lease_id)])
    return lease_lost(lease_id)


async def _succeed(
    db: Db,
    blobs: Blobs,
    ids: Ids,
    ctx: Row,
    token: str,
    req: dict[str, object],
    now: float,
) -> ApiResult:
    lease_id, job_id = str(ctx["lease_id"]), str(ctx["job_id"])
    tokens = req.get("trained_tokens")
    if type(tokens) is not int or not 0 <= tokens <= 10**15:
        return bad_body("'trained_tokens' must be a non-negative integer", "trained_tokens")
    hp_json = None
    if req.get("hyperparameters") is not None:
        hp = check_hyperparameters(req["hyperparameters"], "hyperparameters", allow_auto=False)
        if isinstance(hp, ApiResult):
            return hp
        hp_json = json.dumps(hp)
    key = adapter_key(job_id, lease_id)
    size = await blobs.size(key)
    if not size:
        return bad_body("upload the adapter (PUT .../adapter) before committing ok: true")
    name = model_name(ctx)
    done = "EXISTS (SELECT 1 FROM ft_jobs WHERE id = ? AND status = 'succeeded')"
    results = await _results_file(db, blobs, ids, ctx, now)
    job_update = (
        "UPDATE ft_jobs SET status = 'succeeded', finished_at = ?, fine_tuned_model = ?,"
        " trained_tokens = ?, hyperparameters = coalesce(?, hyperparameters),"
        " method = CASE WHEN ? IS NULL THEN method"
        " ELSE json_set(method, '$.supervised.hyperparameters', json(?)) END,"
        " result_files = ?"
        f" WHERE id = ? AND status IN (?, ?, ?) AND {CUR}",
        [
            int(now),
            name,
            tokens,
            hp_json,
            hp_json,
            hp_json,
            json.dumps([results["id"]]),
            job_id,
            *ACTIVE_JOB,
            lease_id,
            token,
        ],
    )
    sql, params = insert_file_sql(results, f"{CUR} AND {done}")
    results_row = (sql, [*params, lease_id, token, job_id])
    adapter = (
        "INSERT INTO ft_adapters (name, owner, job_id, base, slug, blob, bytes, created_at)"
        f" SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE {CUR} AND {done} ON CONFLICT (name) DO NOTHING",
        [
            name,
            ctx["owner"],
            job_id,
            ctx["model"],
            ftnames.slug(name),
            key,
            size,
            int(now),
            lease_id,
            token,
            job_id,
        ],
    )
    extra = [adapter, results_row]
    for message in (f"New fine-tuned model created: {name}", "The job has successfully completed"):
        sql, params = finetune_db.event_sql(
            ids.new("ftevent-"), job_id, now, message, when=f"{CUR} AND {done}"
        )
        extra.append((sql, [*params, lease_id, token, job_id]))
    changed = await finetune_db.commit_train(db, job_id, lease_id, token, job_update, extra, now)
    if changed[0] == 1:
        return ok({"state": "done", "fine_tuned_model": name})
    await blobs.delete([key, str(results["blob"])])  # never served
    if changed[-1] == 1:  # the job ended (cancelled) while its node finished: not succeeded
        return job_not_running("cancelled")
    return await _refused(db, blobs, lease_id, token)


RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def _cell(value: object) -> str:
    return repr(value) if type(value) in (int, float) else ""


async def _results_file(db: Db, blobs: Blobs, ids: Ids, ctx: Row, now: float) -> Row:
    """The job's results file (OpenAI's `result_files`: a CSV of the metrics per logged
    step), built from its `metrics` events and stored under this lease's key; its files row
    is inserted by the commit's transaction only if the job succeeds."""
    job_id, lease_id = str(ctx["job_id"]), str(ctx["lease_id"])
    lines = [",".join(RESULT_COLUMNS)]
    for e in await finetune_db.metrics_events(db, job_id):
        try:
            data = json.loads(str(e["data"]))
        except ValueError:
            continue
        if not isinstance(data, dict) or type(data.get("step")) is not int:
            continue
        data.setdefault("train_accuracy", data.get("train_mean_token_accuracy"))
        lines.append(",".join(_cell(data.get(k)) for k in RESULT_COLUMNS))
    body = ("\n".join(lines) + "\n").encode()
    key = f"ft/{job_id}/results/{lease_id}.csv"
    await blobs.put(key, body, length=len(body), content_type="text/csv")
    return {
        "id": ids.new("file-"),
        "owner": ctx["owner"],
        "purpose": "fine-tune-results",
        "filename": "step_metrics.csv",
        "bytes": len(body),
        "created_at": int(now),
        "expires_at": None,
        "status": "processed",
        "blob": key,
        "data_offset": 0,
        "parts": None,
    }


async def _fail(
    db: Db, ids: Ids, ctx: Row, token: str, err: dict[str, object], now: float
) -> ApiResult:
    lease_id, job_id = str(ctx["lease_id"]), str(ctx["job_id"])
    job_update = (
        "UPDATE ft_jobs SET status = 'failed', finished_at = ?, error = ?"
        f" WHERE id = ? AND status IN (?, ?, ?) AND {CUR}",
        [int(now), json.dumps(err), job_id, *ACTIVE_JOB, lease_id, token],
    )
    failed = "EXISTS (SELECT 1 FROM ft_jobs WHERE id = ? AND status = 'failed')"
    sql, params = finetune_db.event_sql(
        ids.new("ftevent-"),
        job_id,
        now,
        f"The job failed: {err['message']}",
        level="error",
        when=f"{CUR} AND {failed}",
    )
    extra = [(sql, [*params, lease_id, token, job_id])]
    changed = await finetune_db.commit_train(db, job_id, lease_id, token, job_update, extra, now)
    return ok({"state": "done"}) if changed[-1] == 1 else lease_lost(lease_id)
