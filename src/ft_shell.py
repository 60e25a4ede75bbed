"""Fine-tuning jobs in the Worker: HTTP in, a finetune / finetune_nodes call, HTTP out.

The same shell as the batch API (the handler shape: api_shell.py): each handler reads what
the core needs from the request, calls one function with the stores, and returns its
`jobdb.ApiResult`. A checkpoint or adapter upload is piped from the request into R2 as it
comes; a training file, checkpoint or adapter a node downloads is piped from R2 into the
response. Also the two serving hooks the forward path calls: `ft_request` (an `ft:` model:
who may use it, which base, the body for the node) and `models_merged` (`GET /v1/models` with
the caller's fine-tuned models). The lease, heartbeat, input and commit calls of train leases
share the batch routes: jobs_shell sends them to finetune_nodes. docs/fine-tuning-jobs.md.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import finetune
import finetune_db
import finetune_nodes
import ftroute
import status
import sweep
from api_shell import IDS, Call, client_route, housekeeping, node_route, now, owner_of, stores
from finetune import FtRoute
from jobdb import ApiResult, error
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


@client_route
async def jobs_root(c: Call) -> ApiResult:
    if c.call.method == "GET":
        q = c.query()
        return await finetune.list_jobs(
            c.db,
            c.owner,
            now(),
            c.config.finetune,
            after=q.get("after"),
            limit=q.get("limit"),
            metadata=_metadata(c.call.query) or None,
        )
    body = await c.body()
    if isinstance(body, ApiResult):
        return body
    return await finetune.create_job(c.db, IDS, c.owner, body, now())


@client_route
async def job_one(c: Call) -> ApiResult:
    return await finetune.get_job(c.db, c.owner, c.params["id"], now(), c.config.finetune)


@client_route
async def job_cancel(c: Call) -> ApiResult:
    return await finetune.cancel_job(c.db, IDS, c.owner, c.params["id"], now())


@client_route
async def job_events(c: Call) -> ApiResult:
    q = c.query()
    return await finetune.list_events(
        c.db, c.owner, c.params["id"], after=q.get("after"), limit=q.get("limit")
    )


@client_route
async def job_checkpoints(c: Call) -> ApiResult:
    q = c.query()
    return await finetune.list_checkpoints(
        c.db, c.owner, c.params["id"], after=q.get("after"), limit=q.get("limit")
    )


# ---- node routes: train leases (ids `ftlease-...`) and adapters -------------------------------


@node_route
async def node_file(c: Call) -> ApiResult:
    """`GET leases/<id>/validation` (a train lease's `.../input` is jobs_shell.node_input's)."""
    which = "validation" if c.call.path.endswith("/validation") else "input"
    return await finetune_nodes.lease_file(c.db, c.params["id"], c.token, which)


@node_route
async def node_checkpoint(c: Call) -> ApiResult:
    return await finetune_nodes.lease_checkpoint(c.db, c.params["id"], c.token)


@node_route
async def node_events(c: Call) -> ApiResult:
    body = await c.body()
    if isinstance(body, ApiResult):
        return body
    return await finetune_nodes.append_events(
        c.db, IDS, c.params["id"], body, now(), c.config.finetune
    )


@node_route
async def node_checkpoint_put(c: Call) -> ApiResult:
    lease_id, step, length = c.params["id"], c.params["step"], c.headers.get("content-length")
    target = await finetune_nodes.checkpoint_target(
        c.db, lease_id, c.token, step, length, c.config.finetune
    )
    if isinstance(target, ApiResult):
        return target
    stored = await c.pipe_to(target)
    if isinstance(stored, ApiResult):
        return stored
    metrics = c.headers.get(METRICS_HEADER)
    return await finetune_nodes.record_checkpoint(
        c.db, c.blobs, IDS, lease_id, c.token, step, metrics, now()
    )


@node_route
async def node_adapter_put(c: Call) -> ApiResult:
    length = c.headers.get("content-length")
    target = await finetune_nodes.adapter_target(
        c.db, c.params["id"], c.token, length, c.config.finetune
    )
    if isinstance(target, ApiResult):
        return target
    return await c.store_at(target)


@node_route
async def node_adapter_get(c: Call) -> ApiResult:
    """`GET /api/nodes/v1/adapters/<slug>`: a LoRA resolver fetching an adapter to serve."""
    return await finetune.adapter_for_node(c.db, c.blobs, c.params["slug"])


# ---- serving: `ft:` models on the forward path, /v1/models -----------------------------------


async def ft_request(gw, call, raw: bytes) -> tuple[FtRoute, object] | ApiResult | None:
    """For a body the byte search flagged (`"ft:` in it): None when its model is no `ft:`
    model after all; the 404 when the caller may not use it; else its route and the body for
    the node (a JS Uint8Array) with the model renamed to the adapter's slug."""
    found = ftroute.requested_model(raw)
    if found is None:
        return None
    name, data = found
    db, _ = stores(gw)
    try:
        route = await finetune.route_ft_model(db, owner_of(call), name)
    except MissingBinding as exc:
        return error(503, f"fine-tuning storage is not configured: {exc}", "storage_unavailable")
    if isinstance(route, ApiResult):
        return route
    return route, _u8(ftroute.rewrite_model(raw, data, name, route.slug))


async def models_merged(gw, call, node_text: str) -> str | None:
    """The node's `/v1/models` answer with the caller's fine-tuned models (None: leave the
    node's answer as it is: not a list, or the storage unbound)."""
    try:
        db, _ = stores(gw)
        mine = await finetune.models_for_owner(db, owner_of(call))
    except Exception as exc:  # listing models must not fail with the fine-tuning tables
        call.ex.error = f"models: {str(exc)[:160]}"
        return None
    return ftroute.merge_models(node_text, mine)


async def status_fine_tuning(gw, call) -> dict | None:
    """/api/status's `fine_tuning` for the calling key (status.fine_tuning_view over two
    reads); None when the storage is unbound or unreadable (the page then shows no section)."""
    try:
        db, _ = stores(gw)
        t = now()
        return status.fine_tuning_view(*await finetune_db.status_rows(db, owner_of(call), t), t)
    except Exception as exc:  # the status answer must not fail with the fine-tuning tables
        call.ex.error = f"status fine-tuning: {str(exc)[:160]}"
        return None


async def cron(gw) -> dict[str, object]:
    """The cron's fine-tuning work: jobs whose node was lost too often fail, open work of
    final jobs is dropped (finetune.settle_due, bounded per run); then the sweep of final
    jobs' unreferenced R2 objects (api_shell.housekeeping)."""
    return await housekeeping(
        gw,
        "ft",
        "ft_settled",
        lambda db, _blobs, config: finetune.settle_due(db, now(), config.finetune),
        sweep.JOBS,
        lambda config: config.finetune.lease_s,
    )
