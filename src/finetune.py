"""OpenAI fine-tuning jobs over D1, client side: create, retrieve, list, cancel, events,
checkpoints; and the serving side of the result: the caller's fine-tuned models, routing an
`ft:` model or checkpoint to its base (only for the key that created it), the adapter a node
streams.

A job is trained by a node that leases the job's one `work` row of kind 'train' (the batch
machinery: finetune_nodes.py). Its status as stored: `validating_files` until a node accepts
the files, `running` after that, then `succeeded | failed | cancelled`. A `running` job whose
lease lapsed (its node died; the row waits for the next node) is shown as `queued`: a derived
status, so no write is needed when a node disappears. See docs/fine-tuning-jobs.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import finetune_db
import jobdb
import tarplan
from files import parse_limit
from finetune_db import ACTIVE_JOB
from heady_shared import ftlines, ftnames
from jobdb import ApiResult, Ids, Row, error, json_body, list_page, num, ok, opt_int
from storage import Blobs, Db

JOBS_LIMIT, EVENTS_LIMIT, CHECKPOINTS_LIMIT, LIMIT_MAX = 20, 20, 10, 100
# What a node's LoRA resolver gets for an adapter: the files vLLM loads (heady_node's
# finetune.adapter CONFIG and WEIGHTS; its resolver refuses any other member).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
METRIC_KEYS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


@dataclass(frozen=True, slots=True)
class FtSettings:
    lease_s: float = 120.0  # FT_LEASE_S: a train lease lives this long without a heartbeat
    heartbeat_s: float = 30.0  # FT_HEARTBEAT_S: how often the training node heartbeats
    max_blob_bytes: int = 100_000_000  # a checkpoint or adapter upload (a Worker request body)
    max_attempts: int = 5  # leases of one job before it fails as lost (each lapse costs one)
    max_events: int = 20_000  # events kept per job; beyond, a node's events are dropped


@dataclass(frozen=True, slots=True)
class FtRoute:
    """Where an `ft:` model goes: nodes serving `base`, asked for the LoRA named `slug`."""

    name: str
    base: str
    slug: str


def not_found(job_id: str) -> ApiResult:
    return error(404, f"Could not find fine-tuning job: {job_id[:64]}", "fine_tune_not_found", "id")


def model_not_found(model: str) -> ApiResult:
    return error(
        404,
        f"The model `{model[:300]}` does not exist or you do not have access to it.",
        "model_not_found",
        "model",
    )


def job_hex(job_id: str) -> str:
    return job_id.removeprefix("ftjob-")


def shown_status(j: Row, now: float) -> str:
    """The OpenAI status of a job row (joined with its work row): a `running` job without a
    live lease is `queued` (waiting for a node)."""
    status = str(j["status"])
    if status == "running":
        live = j.get("work_state") == "leased" and float(j["work_expires_at"] or 0) >= now  # type: ignore[arg-type]
        return "running" if live else "queued"
    return status


def job_object(j: Row, now: float) -> dict[str, object]:
    """OpenAI's FineTuningJob from a job row."""
    hp = json.loads(str(j["hyperparameters"]))
    return {
        "id": j["id"],
        "object": "fine_tuning.job",
        "created_at": num(j["created_at"]),
        "error": json.loads(str(j["error"])) if j.get("error") else None,
        "fine_tuned_model": j.get("fine_tuned_model"),
        "finished_at": opt_int(j.get("finished_at")),
        "hyperparameters": hp,
        "model": j["model"],
        "organization_id": ftnames.ORG,
        "result_files": json.loads(str(j.get("result_files") or "[]")),
        "seed": num(j["seed"]),
        "status": shown_status(j, now),
        "trained_tokens": opt_int(j.get("trained_tokens")),
        "training_file": j["training_file"],
        "validation_file": j.get("validation_file"),
        "estimated_finish": None,
        "integrations": None,
        "metadata": json.loads(str(j["metadata"])) if j.get("metadata") else None,
        "method": json.loads(str(j["method"])),
        "user_provided_suffix": j.get("suffix"),
    }


def event_object(e: Row) -> dict[str, object]:
    return {
        "id": e["id"],
        "object": "fine_tuning.job.event",
        "created_at": num(e["created_at"]),
        "level": e["level"],
        "message": e["message"],
        "type": e["type"],
        "data": json.loads(str(e["data"])) if e.get("data") is not None else None,
    }


def checkpoint_object(c: Row) -> dict[str, object]:
    return {
        "id": c["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": num(c["created_at"]),
        "fine_tuned_model_checkpoint": c["fine_tuned_model_checkpoint"],
        "fine_tuning_job_id": c["job_id"],
        "metrics": json.loads(str(c["metrics"])),
        "step_number": num(c["step_number"]),
    }


# --------------------------------------------------------------------------- validation


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiResult:
    return error(400, message, code, param)


def check_hyperparameters(
    raw: object, param: str, allow_auto: bool = True
) -> dict[str, object] | ApiResult:
    """OpenAI's supervised hyperparameters (heady_shared.ftlines.parse_requested: batch_size
    1..256, learning_rate_multiplier > 0, n_epochs 1..50, each also "auto" when allowed)."""
    try:
        return ftlines.parse_requested(raw, param, allow_auto).values()
    except ftlines.HyperparameterError as exc:
        return _bad(str(exc), exc.param, exc.code)


async def _check_file(db: Db, owner: str, file_id: str, param: str, now: float) -> Row | ApiResult:
    """The caller's live, uploaded `fine-tune` file (its id's shape: ftlines.check_job_request)."""
    f = await jobdb.live_file(db, owner, file_id, now)
    if f is None:
        return _bad(f"invalid {param}: no such File object: {file_id}", param, "file_not_found")
    if f["purpose"] != "fine-tune":
        return _bad(
            f"invalid {param}: {file_id} has purpose '{f['purpose']}', not 'fine-tune'",
            param,
            "invalid_file_purpose",
        )
    if f.get("blob") is None or f.get("parts") is not None:
        return _bad(f"invalid {param}: {file_id} is not an uploaded file", param, "invalid_file")
    return f


# ----------------------------------------------------------------------------- client API


async def create_job(
    db: Db,
    ids: Ids,
    owner: str,
    body: object,
    now: float,
    trainable: Sequence[str] | None = None,
) -> ApiResult:
    """`POST /v1/fine_tuning/jobs`: a `validating_files` job and its pending train work.
    `trainable`: the base models some trainer node serves (None: any model name)."""
    try:
        req = json_body(body)
    except (UnicodeDecodeError, ValueError):
        return error(400, "the request body is not valid JSON", "invalid_json")
    if not isinstance(req, dict):
        return error(400, "the request body must be a JSON object", "invalid_request")
    try:  # the shape: one rule set with the node and the CLI (heady_shared.ftlines)
        job = ftlines.check_job_request(req)
    except ftlines.HyperparameterError as exc:
        return _bad(str(exc), exc.param, exc.code)
    model = job.model
    if trainable is not None and model not in trainable:
        return _bad(
            f"model '{model}' cannot be fine-tuned here; trainable:"
            f" {', '.join(trainable) or 'none'}",
            "model",
            "model_not_available",
        )
    training = await _check_file(db, owner, job.training_file, "training_file", now)
    if isinstance(training, ApiResult):
        return training
    validation = None
    if job.validation_file is not None:
        validation = await _check_file(db, owner, job.validation_file, "validation_file", now)
        if isinstance(validation, ApiResult):
            return validation
    job_id = ids.new("ftjob-")
    seed = job.seed
    if seed is None:  # OpenAI picks one and reports it; training is reproducible from it
        seed = int(ids.new("")[-8:], 16) & ftlines.MAX_SEED
    hp = job.hyperparameters.values()
    row: Row = {
        "id": job_id,
        "owner": owner,
        "model": model,
        "training_file": training["id"],
        "validation_file": validation["id"] if validation else None,
        "status": "validating_files",
        "hyperparameters": json.dumps(hp),
        "method": json.dumps(job.method()),
        "suffix": job.suffix,
        "seed": seed,
        "created_at": int(now),
        "metadata": json.dumps(job.metadata) if job.metadata is not None else None,
    }
    await finetune_db.insert_job(
        db, row, ids.new("wrk_"), num(training["bytes"]), ids.new("ftevent-")
    )
    stored = await finetune_db.owned_job(db, owner, job_id)
    assert stored is not None
    return ok(job_object(stored, now))


async def settle(db: Db, j: Row, now: float, settings: FtSettings) -> Row:
    """Moves a job is due without anyone asking: an active job whose node was lost too
    often -> failed; a final job's pending or lapsed work -> cancelled. Writes only then."""
    lapsed = j.get("work_state") == "leased" and float(j["work_expires_at"] or 0) < now  # type: ignore[arg-type]
    if j["status"] in ACTIVE_JOB and lapsed and num(j["work_attempts"]) >= settings.max_attempts:
        err = {
            "code": "training_interrupted",
            "message": f"the job's training node stopped responding {settings.max_attempts}"
            " times; it was not retried again",
            "param": None,
        }
        await finetune_db.fail_lost(db, str(j["id"]), json.dumps(err), now, settings.max_attempts)
    elif j["status"] not in ACTIVE_JOB and (lapsed or j.get("work_state") == "pending"):
        await finetune_db.drop_work(db, str(j["id"]), now, None)
    else:
        return j
    again = await finetune_db.owned_job(db, str(j["owner"]), str(j["id"]))
    assert again is not None
    return again


async def get_job(db: Db, owner: str, job_id: str, now: float, settings: FtSettings) -> ApiResult:
    """`GET /v1/fine_tuning/jobs/{id}`."""
    j = await finetune_db.owned_job(db, owner, job_id)
    if j is None:
        return not_found(job_id)
    return ok(job_object(await settle(db, j, now, settings), now))


def _metadata_filter(metadata: Mapping[str, str] | None) -> list[tuple[str, str]] | ApiResult:
    pairs = list((metadata or {}).items())
    if len(pairs) > 16 or not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
        return _bad("metadata filters are at most 16 metadata[key]=value pairs", "metadata")
    return pairs


async def list_jobs(
    db: Db,
    owner: str,
    now: float,
    settings: FtSettings,
    after: str | None = None,
    limit: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ApiResult:
    """`GET /v1/fine_tuning/jobs?after=&limit=&metadata[k]=v`: newest first; the next page
    is `after=<last id>` while `has_more`."""
    n = parse_limit(limit, JOBS_LIMIT, LIMIT_MAX)
    if isinstance(n, ApiResult):
        return n
    pairs = _metadata_filter(metadata)
    if isinstance(pairs, ApiResult):
        return pairs
    cursor = None
    if after is not None:
        cursor = await finetune_db.owned_job(db, owner, after)
        if cursor is None:
            return _bad(f"after: no such fine-tuning job: {after[:64]}", "after")
    rows = await finetune_db.list_jobs(db, owner, n + 1, cursor, pairs)
    data = [job_object(await settle(db, j, now, settings), now) for j in rows[:n]]
    return list_page(data, len(rows) > n, ends=False)


async def cancel_job(db: Db, ids: Ids, owner: str, job_id: str, now: float) -> ApiResult:
    """`POST /v1/fine_tuning/jobs/{id}/cancel`: any non-final job -> cancelled at once; its
    pending work is dropped, a node training it hears `cancel: true` on its next heartbeat
    and stops (its late checkpoints, adapter and success are refused)."""
    j = await finetune_db.owned_job(db, owner, job_id)
    if j is None:
        return not_found(job_id)
    if await finetune_db.cancel_job(db, job_id, owner, now):
        await finetune_db.drop_work(db, job_id, now, ids.new("ftevent-"))
    else:
        j = await finetune_db.owned_job(db, owner, job_id)
        assert j is not None
        if j["status"] != "cancelled":
            return error(
                409,
                f"a fine-tuning job with status '{j['status']}' cannot be cancelled",
                "job_not_cancellable",
                "id",
            )
    j = await finetune_db.owned_job(db, owner, job_id)
    assert j is not None
    return ok(job_object(j, now))


async def _job_list(
    db: Db,
    owner: str,
    job_id: str,
    what: finetune_db.JobList,
    after: str | None,
    limit: str | None,
    default: int,
) -> tuple[list[Row], int] | ApiResult:
    """One page (plus one row, for has_more) of a job's events or checkpoints, newest first,
    and the page size;
    `after` = a row id of this job, the page continues with the rows before it."""
    n = parse_limit(limit, default, LIMIT_MAX)
    if isinstance(n, ApiResult):
        return n
    if await finetune_db.owned_job(db, owner, job_id) is None:
        return not_found(job_id)
    before = None
    if after is not None:
        before = await finetune_db.position_in_job(db, what, job_id, after)
        if before is None:
            noun = "event" if what is finetune_db.EVENTS else "checkpoint"
            return _bad(f"after: no such {noun} of this job: {after[:64]}", "after")
    return await finetune_db.list_of_job(db, what, job_id, n + 1, before), n


async def list_events(
    db: Db, owner: str, job_id: str, after: str | None = None, limit: str | None = None
) -> ApiResult:
    """`GET /v1/fine_tuning/jobs/{id}/events?after=&limit=`: newest first."""
    got = await _job_list(db, owner, job_id, finetune_db.EVENTS, after, limit, EVENTS_LIMIT)
    if isinstance(got, ApiResult):
        return got
    rows, n = got
    return list_page([event_object(e) for e in rows[:n]], len(rows) > n, ends=False)


async def list_checkpoints(
    db: Db, owner: str, job_id: str, after: str | None = None, limit: str | None = None
) -> ApiResult:
    """`GET /v1/fine_tuning/jobs/{id}/checkpoints?after=&limit=`: newest (highest step)
    first, with first_id/last_id as OpenAI's."""
    what, default = finetune_db.CHECKPOINTS, CHECKPOINTS_LIMIT
    got = await _job_list(db, owner, job_id, what, after, limit, default)
    if isinstance(got, ApiResult):
        return got
    rows, n = got
    return list_page([checkpoint_object(c) for c in rows[:n]], len(rows) > n)


async def settle_due(db: Db, now: float, settings: FtSettings) -> int:
    """The cron: fail jobs whose node was lost too often, drop a final job's open work.
    Returns how many jobs it looked at."""
    rows = await finetune_db.jobs_to_settle(db, now, settings.max_attempts)
    for j in rows:
        await settle(db, j, now, settings)
    return len(rows)


# -------------------------------------------------------------------------------- serving


async def models_for_owner(db: Db, owner: str, limit: int = 1000) -> list[dict[str, object]]:
    """The caller's fine-tuned models as OpenAI Model objects (for `GET /v1/models`)."""
    return [
        {
            "id": a["name"],
            "object": "model",
            "created": num(a["created_at"]),
            "owned_by": ftnames.ORG,
            "parent": a["base"],
        }
        for a in await finetune_db.adapters_of(db, owner, limit)
    ]


async def route_ft_model(db: Db, owner: str, model: str) -> FtRoute | ApiResult:
    """A request's `ft:` model -> its base and LoRA slug, or 404 `model_not_found` when it
    does not exist or another key created it (the two are not told apart). A checkpoint
    (`...:ckpt-step-<n>`) routes like its job's model once checkpoints.list lists it, whatever
    the job's status since (running, succeeded, failed or cancelled: docs/fine-tuning-jobs.md)."""
    name = ftnames.parse(model)
    if name is None:
        return model_not_found(model)
    if name.step is not None:
        job = await finetune_db.owned_job(db, owner, f"ftjob-{name.job_hex}")
        c = None if job is None else await checkpoint_row(db, str(job["id"]), name.step)
        if job is None or c is None or c["fine_tuned_model_checkpoint"] != model:
            return model_not_found(model)
        return FtRoute(model, str(job["model"]), ftnames.slug(model))
    a = await finetune_db.adapter_by_name(db, model)
    if a is None or a["owner"] != owner:
        return model_not_found(model)
    return FtRoute(str(a["name"]), str(a["base"]), str(a["slug"]))


async def checkpoint_row(db: Db, job_id: str, step: int) -> Row | None:
    """The job's checkpoint at exactly `step` (one indexed row: the highest step <= it)."""
    rows = await finetune_db.list_of_job(db, finetune_db.CHECKPOINTS, job_id, 1, step + 1)
    return rows[0] if rows and num(rows[0]["step_number"]) == step else None


def adapter_not_found(why: str = "no such adapter") -> ApiResult:
    return error(404, why, "adapter_not_found")


def _adapter_headers(size: int, base: str) -> tuple[tuple[str, str], ...]:
    headers = [("content-type", "application/x-tar"), ("content-length", str(size))]
    if base.isascii() and base.isprintable():
        headers.append(("x-heady-ft-base", base))
    return tuple(headers)


async def adapter_for_node(db: Db, blobs: Blobs, slug: str) -> ApiResult:
    """`GET /api/nodes/v1/adapters/<slug>` (node credential): a stream plan of the adapter
    tar (adapter_config.json + adapter_model.safetensors), or 404. A job's model is its
    uploaded adapter tar as it is; a checkpoint is served from its checkpoint tar, as the
    ranges of those two files and the tar's end (tarplan: the trainer's state.json and
    anything else stay out, so the resolver, which refuses other files, can load it)."""
    if not ftnames.is_slug(slug):
        return adapter_not_found()
    a = await finetune_db.adapter_by_slug(db, slug)
    if a is not None:
        size = num(a["bytes"])
        parts = ((str(a["blob"]), 0, size),)
        return ApiResult(200, None, _adapter_headers(size, str(a["base"])), parts, size)
    found = ftnames.checkpoint_of_slug(slug)
    if found is None:
        return adapter_not_found()
    c = await checkpoint_row(db, f"ftjob-{found[0]}", found[1])
    name = str(c["fine_tuned_model_checkpoint"]) if c is not None else ""
    if c is None or ftnames.slug(name) != slug:  # the form is not proof: the digest is
        return adapter_not_found()
    key = str(c["blob"])

    async def read(offset: int, length: int) -> bytes | None:
        return await blobs.get_range(key, offset, length)

    try:
        ranges = await tarplan.member_ranges(read, num(c["bytes"]), ADAPTER_FILES)
    except tarplan.TarError as exc:
        return adapter_not_found(f"checkpoint {slug} holds no adapter vLLM can load: {exc}")
    size = sum(n for _, n in ranges)
    parts = tuple((key, offset, n) for offset, n in ranges)
    return ApiResult(200, None, _adapter_headers(size, ftnames.ft_base(name) or ""), parts, size)
