"""The Files + Batch API and the node API in the Worker: HTTP in, a batch-core call, HTTP out.

Shell code over the runtime's objects (the shared handler shape: api_shell.py). It decides
nothing: each handler reads what the core needs from the request (owner, ids, query values,
the body), calls one function of files.py, batches.py or work.py with the stores
(jsstore.D1Db, jsstore.R2Blobs), and returns its `jobdb.ApiResult`. Bodies that can be large
never enter Python: an upload and a node's result part are piped from the request into R2
(`Call.pipe_to`), file content and a lease's input are piped from R2 into the response
(`R2Blobs.parts_stream`). Only the two 64 KiB ends of an upload are read into Python
(multipart.locate needs them). docs/batch.md.
"""

from __future__ import annotations

import batches
import files
import finetune_nodes
import sweep
import work
from api_shell import (
    IDS,
    Call,
    answer,
    client_route,
    housekeeping,
    node_route,
    now,
    owner_of,
    stores,
)
from config import GatewayConfig
from jobdb import ApiResult, error

BATCH_ROLE = "batch"  # nodes of this role's pair lease any batch work (work.lease)


# ---- client routes: /api/heavy/{role}/v1/files|batches ---------------------------------------


@client_route
async def files_root(c: Call) -> ApiResult:
    if c.call.method == "GET":
        q = c.query()
        return await files.list_files(
            c.db, c.owner, now(), q.get("after"), q.get("limit"), q.get("order"), q.get("purpose")
        )
    return await _upload(c)


async def _upload(c: Call) -> ApiResult:
    """`POST /v1/files`: refused before a byte is read when too large or of unknown length;
    else the body is piped into R2 as it comes, its two ends read back, and the core
    decides (and deletes the object if it refuses)."""
    settings = c.config.batch
    h = c.headers
    refused = files.precheck_upload(h.get("content-type"), h.get("content-length"), settings)
    if refused is not None:
        return refused
    key = files.upload_key(IDS)
    total = await c.pipe_to(key)
    if isinstance(total, ApiResult):
        return total
    read = files.READ_BYTES
    prefix = await c.blobs.get_range(key, 0, read) or b""
    suffix = await c.blobs.get_range(key, max(0, total - read), read) or b""
    upload = files.Upload(h.get("content-type"), key, total, prefix, suffix)
    return await files.create_file(c.db, c.blobs, IDS, c.owner, upload, now(), settings)


@client_route
async def file_one(c: Call) -> ApiResult:
    if c.call.method == "DELETE":
        return await files.delete_file(c.db, c.blobs, c.owner, c.params["id"], now())
    return await files.get_file(c.db, c.owner, c.params["id"], now())


@client_route
async def file_content(c: Call) -> ApiResult:
    return await files.file_content(c.db, c.owner, c.params["id"], now())


@client_route
async def batches_root(c: Call) -> ApiResult:
    if c.call.method == "GET":
        q = c.query()
        return await batches.list_batches(c.db, IDS, c.owner, now(), q.get("after"), q.get("limit"))
    body = await c.body()
    if isinstance(body, ApiResult):
        return body
    return await batches.create_batch(c.db, IDS, c.owner, c.params["role"], body, now())


@client_route
async def batch_one(c: Call) -> ApiResult:
    return await batches.get_batch(c.db, IDS, c.owner, c.params["id"], now())


@client_route
async def batch_cancel(c: Call) -> ApiResult:
    return await batches.cancel_batch(c.db, IDS, c.owner, c.params["id"], now())


async def unknown(gw, call, config: GatewayConfig, params):
    """Below /v1/files, /v1/batches or /api/nodes but no such endpoint: never a node's."""
    result = error(404, f"no such endpoint: {call.method} {call.path[:120]}", "not_found")
    return answer(gw, call, config, result)


# ---- node routes: /api/nodes/v1/leases... ----------------------------------------------------
# Train leases (ids `ftlease-...`) share the lease, input, heartbeat and commit routes: they go
# to finetune_nodes (docs/fine-tuning-jobs.md).


@node_route
async def node_lease(c: Call) -> ApiResult:
    body = await c.body()
    if isinstance(body, ApiResult):
        return body
    pool = c.config.pools.get(BATCH_ROLE)
    may_lease_any = pool is not None and c.node in pool.pair
    # One lease call for every kind: a request without `kinds` is the batch worker's and gets
    # batch work as work.lease gives it.
    return await finetune_nodes.lease_for_node(
        c.db,
        IDS,
        c.node,
        may_lease_any,
        c.config.may_train(c.node),
        body,
        now(),
        c.config.batch,
        c.config.finetune,
    )


@node_route
async def node_input(c: Call) -> ApiResult:
    if finetune_nodes.is_train_lease(c.params["id"]):  # a training file
        return await finetune_nodes.lease_file(c.db, c.params["id"], c.token, "input")
    return await work.lease_input(c.db, IDS, c.params["id"], c.token, now())


@node_route
async def node_heartbeat(c: Call) -> ApiResult:
    body = await c.body()
    if isinstance(body, ApiResult):
        return body
    lease_id = c.params["id"]
    if finetune_nodes.is_train_lease(lease_id):
        return await finetune_nodes.heartbeat(c.db, lease_id, body, now(), c.config.finetune)
    return await work.heartbeat(c.db, lease_id, body, now(), c.config.batch)


@node_route
async def node_results(c: Call) -> ApiResult:
    """PUT a lease's output or error part: piped from the request into the R2 key the core
    names for this lease (a taken-over lease's parts can never mix with its successor's)."""
    h = c.headers
    target = await work.result_target(
        c.db,
        IDS,
        c.params["id"],
        c.token,
        c.params["part"],
        h.get("content-length"),
        now(),
        c.config.batch,
    )
    if isinstance(target, ApiResult):
        return target
    return await c.store_at(target)


@node_route
async def node_commit(c: Call) -> ApiResult:
    body = await c.body()
    if isinstance(body, ApiResult):
        return body
    lease_id = c.params["id"]
    if finetune_nodes.is_train_lease(lease_id):
        return await finetune_nodes.commit(c.db, c.blobs, IDS, lease_id, body, now())
    return await work.commit(c.db, c.blobs, IDS, lease_id, body, now(), c.config.batch)


@node_route
async def node_release(c: Call) -> ApiResult:
    """A draining worker gives back what it will not run (work.release)."""
    body = await c.body()
    if isinstance(body, ApiResult):
        return body
    if finetune_nodes.is_train_lease(c.params["id"]):
        return error(404, "a train lease is not released this way", "not_found")
    return await work.release(c.db, c.blobs, IDS, c.params["id"], body, now())


# ---- /api/status and the cron -------------------------------------------------------------------


async def status_batches(gw, call, config: GatewayConfig) -> dict | None:
    """/api/status's `batches` for the calling key (batches.status_view); None when the
    storage is not bound or cannot be read (the status page then shows no batch section)."""
    try:
        db, _ = stores(gw)
        return await batches.status_view(db, owner_of(call), now())
    except Exception as exc:  # the status answer must not fail with the batch tables
        call.ex.error = f"status batches: {str(exc)[:160]}"
        return None


async def cron(gw) -> dict[str, object]:
    """The cron's batch work (bounded per run by the core): expiry, cancels settling,
    closes whose write was lost, purges of deleted files' blobs; then the sweep of final
    batches' unreferenced R2 objects (api_shell.housekeeping)."""
    return await housekeeping(
        gw,
        "batches",
        "batches_moved",
        lambda db, blobs, _config: batches.expire_due(db, blobs, IDS, now()),
        sweep.BATCHES,
        lambda config: config.batch.lease_s,
    )
