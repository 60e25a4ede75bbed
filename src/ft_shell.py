"""Fine-tuning jobs in the Worker: HTTP in, a finetune / finetune_nodes call, HTTP out.

The same shell as the batch API (jobs_shell.py, whose helpers it uses): each handler reads
what the core needs from the request, calls one function with the stores, and answers its
`jobdb.ApiResult`. A checkpoint or adapter upload is piped from the request into R2 as it
comes; a training file, checkpoint or adapter a node downloads is piped from R2 into the
response. Also the two serving hooks the forward path calls: `ft_request` (an `ft:` model:
who may use it, which base, the body for the node) and `models_merged` (`GET /v1/models` with
the caller's fine-tuned models). The lease, heartbeat, input and commit calls of train leases
share the batch routes: jobs_shell sends them to finetune_nodes. docs/fine-tuning-jobs.md.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import files
import finetune
import finetune_db
import finetune_nodes
import ftroute
import status
from config import GatewayConfig
from finetune import FtRoute
from headers import presented_key
from jobdb import ApiResult, error
from jobs_shell import (
    _IDS,
    TOKEN_HEADER,
    _body,
    _client,
    _node,
    _now,
    _query,
    _run,
    _stores,
)
from jsstore import MissingBinding, _u8

METRICS_HEADER = "x-heady-checkpoint-metrics"


def _metadata(query: str) -> dict[str, str]:
    """`metadata[k]=v` query pairs (the SDK's list filter) as {k: v}."""
    out: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k.startswith("metadata[") and k.endswith("]"):
            out[k[len("metadata[") : -1]] = v
    return out


# ---- client routes: /api/heavy/{role}/v1/fine_tuning/jobs... ---------------------------------


async def jobs_root(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        if call.method == "GET":
            q = _query(call)
            return await finetune.list_jobs(
                db,
                owner,
                _now(),
                config.finetune,
                after=q.get("after"),
                limit=q.get("limit"),
                metadata=_metadata(call.query) or None,
            )
        body = await _body(call, config)
        if isinstance(body, ApiResult):
            return body
        return await finetune.create_job(db, _IDS, owner, body, _now())

    return await _run(gw, call, config, go)


async def job_one(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        return await finetune.get_job(db, owner, params["id"], _now(), config.finetune)

    return await _run(gw, call, config, go)


async def job_cancel(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        return await finetune.cancel_job(db, _IDS, owner, params["id"], _now())

    return await _run(gw, call, config, go)


async def job_events(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        q = _query(call)
        return await finetune.list_events(
            db, owner, params["id"], after=q.get("after"), limit=q.get("limit")
        )

    return await _run(gw, call, config, go)


async def job_checkpoints(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        q = _query(call)
        return await finetune.list_checkpoints(
            db, owner, params["id"], after=q.get("after"), limit=q.get("limit")
        )

    return await _run(gw, call, config, go)


# ---- node routes: train leases (ids `ftlease-...`) and adapters -------------------------------


async def node_file(gw, call, config: GatewayConfig, params):
    """`GET leases/<id>/validation` (a train lease's `.../input` is jobs_shell.node_input's)."""

    async def go() -> ApiResult:
        _node(call, config)
        db, _ = _stores(gw)
        which = "validation" if call.path.endswith("/validation") else "input"
        token = call.headers.get(TOKEN_HEADER)
        return await finetune_nodes.lease_file(db, params["id"], token, which)

    return await _run(gw, call, config, go)


async def node_checkpoint(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        _node(call, config)
        db, _ = _stores(gw)
        token = call.headers.get(TOKEN_HEADER)
        return await finetune_nodes.lease_checkpoint(db, params["id"], token)

    return await _run(gw, call, config, go)


async def node_events(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        _node(call, config)
        body = await _body(call, config)
        if isinstance(body, ApiResult):
            return body
        db, _ = _stores(gw)
        return await finetune_nodes.append_events(
            db, _IDS, params["id"], body, _now(), config.finetune
        )

    return await _run(gw, call, config, go)


async def _pipe(call, blobs, key: str) -> ApiResult | None:
    """The request body into R2 at `key` (Content-Length checked by the core before)."""
    length = int(call.headers["content-length"])
    stream = call.js.body
    try:
        if stream is None or length == 0:
            await blobs.put(key, b"")
        else:
            await blobs.put(key, stream, length=length)
    except Exception as exc:  # the node stopped short: nothing usable was stored
        await blobs.delete([key])
        return error(400, f"the upload did not arrive whole: {str(exc)[:120]}", "invalid_body")
    return None


async def node_checkpoint_put(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        _node(call, config)
        db, blobs = _stores(gw)
        h, lease_id, step = call.headers, params["id"], params["step"]
        token = h.get(TOKEN_HEADER)
        target = await finetune_nodes.checkpoint_target(
            db, lease_id, token, step, h.get("content-length"), config.finetune
        )
        if isinstance(target, ApiResult):
            return target
        failed = await _pipe(call, blobs, target)
        if failed is not None:
            return failed
        return await finetune_nodes.record_checkpoint(
            db, blobs, _IDS, lease_id, token, step, h.get(METRICS_HEADER), _now()
        )

    return await _run(gw, call, config, go)


async def node_adapter_put(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        _node(call, config)
        db, blobs = _stores(gw)
        h = call.headers
        target = await finetune_nodes.adapter_target(
            db, params["id"], h.get(TOKEN_HEADER), h.get("content-length"), config.finetune
        )
        if isinstance(target, ApiResult):
            return target
        failed = await _pipe(call, blobs, target)
        if failed is not None:
            return failed
        return ApiResult(200, {"bytes": await blobs.size(target) or 0})

    return await _run(gw, call, config, go)


async def node_adapter_get(gw, call, config: GatewayConfig, params):
    """`GET /api/nodes/v1/adapters/<slug>`: a LoRA resolver fetching an adapter to serve."""

    async def go() -> ApiResult:
        _node(call, config)
        db, _ = _stores(gw)
        return await finetune.adapter_for_node(db, params["slug"])

    return await _run(gw, call, config, go)


# ---- serving: `ft:` models on the forward path, /v1/models -----------------------------------


def _owner(call) -> str:
    return files.owner_of(presented_key(call.headers) or "")


async def ft_request(gw, call, raw: bytes) -> tuple[FtRoute, object] | ApiResult | None:
    """For a body the byte search flagged (`"ft:` in it): None when its model is no `ft:`
    model after all; the 404 when the caller may not use it; else its route and the body for
    the node (a JS Uint8Array) with the model renamed to the adapter's slug."""
    found = ftroute.requested_model(raw)
    if found is None:
        return None
    name, data = found
    db, _ = _stores(gw)
    try:
        route = await finetune.route_ft_model(db, _owner(call), name)
    except MissingBinding as exc:
        return error(503, f"fine-tuning storage is not configured: {exc}", "storage_unavailable")
    if isinstance(route, ApiResult):
        return route
    return route, _u8(ftroute.rewrite_model(raw, data, name, route.slug))


async def models_merged(gw, call, node_text: str) -> str | None:
    """The node's `/v1/models` answer with the caller's fine-tuned models (None: leave the
    node's answer as it is: not a list, or the storage unbound)."""
    try:
        db, _ = _stores(gw)
        mine = await finetune.models_for_owner(db, _owner(call))
    except Exception as exc:  # listing models must not fail with the fine-tuning tables
        call.ex.error = f"models: {str(exc)[:160]}"
        return None
    return ftroute.merge_models(node_text, mine)


async def status_fine_tuning(gw, call) -> dict | None:
    """/api/status's `fine_tuning` for the calling key (status.fine_tuning_view over two
    reads); None when the storage is unbound or unreadable (the page then shows no section)."""
    try:
        db, _ = _stores(gw)
        now = _now()
        return status.fine_tuning_view(*await finetune_db.status_rows(db, _owner(call), now), now)
    except Exception as exc:  # the status answer must not fail with the fine-tuning tables
        call.ex.error = f"status fine-tuning: {str(exc)[:160]}"
        return None


async def cron(gw) -> dict[str, object]:
    """The cron's fine-tuning work: jobs whose node was lost too often fail, open work of
    final jobs is dropped (finetune.settle_due, bounded per run)."""
    try:
        db, _ = _stores(gw)
        config = gw._config()
        return {"ft_settled": await finetune.settle_due(db, _now(), config.finetune)}
    except MissingBinding:
        return {"ft_settled": None}
    except Exception as exc:  # the probes' log line still goes out
        return {"ft_error": str(exc)[:200]}
