"""The Files + Batch API and the node API in the Worker: HTTP in, a batch-core call, HTTP out.

Shell code over the runtime's objects. It decides nothing: each handler reads what the core
needs from the request (owner, ids, query values, the body), calls one function of files.py,
batches.py or work.py with the stores (jsstore.D1Db, jsstore.R2Blobs), and answers its
`jobdb.ApiResult`: JSON with the request id in errors, or a body streamed from R2 ranges.
Bodies that can be large never enter Python: an upload and a node's result part are piped
from the request into R2 (`R2Blobs.put` over the JS stream), file content and a lease's
input are piped from R2 into the response (`R2Blobs.parts_stream`). Only the two 64 KiB
ends of an upload are read into Python (multipart.locate needs them). docs/batch.md.

Entry (`entry._HANDLERS`) names these handlers; each takes (gateway, call, config, params)
like entry's own and leaves the log line to `Default.fetch`.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs

import js
from workers import Response

import batches
import files
import finetune_nodes
import jsio
import work
from body import BodyError
from config import GatewayConfig
from headers import cors_headers, presented_key
from heady_shared import nodeauth
from jobdb import ApiResult, Ids, error
from jsstore import D1Db, MissingBinding, R2Blobs

_IDS = Ids()
TOKEN_HEADER = "x-heady-lease-token"
BATCH_ROLE = "batch"  # nodes of this role's pair lease any batch work (work.lease)


def _now() -> float:
    return time.time()


def _stores(gw) -> tuple[D1Db, R2Blobs]:
    return D1Db(gw.env), R2Blobs(gw.env)


def answer(gw, call, config: GatewayConfig, result: ApiResult):
    """An ApiResult as the Worker's response: JSON (errors carry the request id), a stream
    of R2 ranges with its Content-Length (`identity`: the edge would compress it and drop the
    length), or nothing (204). CORS and x-request-id as every answer of the gateway's own."""
    ex = call.ex
    ex.status = result.status
    h = {
        "cache-control": "no-store",
        "x-request-id": ex.rid,
        **cors_headers(ex.origin, config.cors_origins),
        **dict(result.headers),
    }
    body = None
    if result.stream is not None:
        h["content-length"] = str(result.length)
        h["content-encoding"] = "identity"
        if result.length > 0:
            body = R2Blobs(gw.env).parts_stream(result.stream, gw._background)
    elif result.status != 204:
        h.setdefault("content-type", "application/json")
        body = result.render(ex.rid).decode()
    return Response(js.Response.new(body, status=result.status, headers=jsio.js_obj(h)))


async def _run(gw, call, config: GatewayConfig, work_fn) -> object:
    """Run one handler body; storage that is not bound is a 503, never a 500."""
    try:
        result = await work_fn()
    except MissingBinding as exc:
        result = error(503, f"batch storage is not configured: {exc}", "storage_unavailable")
    return answer(gw, call, config, result)


def _query(call) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(call.query, keep_blank_values=True).items()}


async def _body(call, config: GatewayConfig) -> bytes | ApiResult:
    """A small JSON request body (batches.create, the node's lease/heartbeat/commit) read
    under the upload deadline and MAX_BODY_BYTES; the client's fault as an OpenAI error."""
    got = await jsio.read_body(call.js, call.headers, config)
    if isinstance(got, BodyError):
        return error(got.status, got.message, got.type)
    return b"" if got is None else bytes(got.to_bytes())


# ---- client routes: /api/heavy/{role}/v1/files|batches ---------------------------------------


def _client(call, config: GatewayConfig, params) -> str | ApiResult:
    """The caller's owner id, once the role is known (the role names the batch's pool)."""
    role = params.get("role", "")
    if role not in config.pools:
        known = ", ".join(config.pools) or "none configured"
        return error(404, f"unknown role {role[:40]!r}; roles: {known}", "unknown_role")
    call.ex.role = role
    return files.owner_of(presented_key(call.headers) or "")


async def files_root(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, blobs = _stores(gw)
        if call.method == "GET":
            q = _query(call)
            return await files.list_files(
                db, owner, _now(), q.get("after"), q.get("limit"), q.get("order"), q.get("purpose")
            )
        return await _upload(call, config, db, blobs, owner)

    return await _run(gw, call, config, go)


async def _upload(call, config: GatewayConfig, db, blobs: R2Blobs, owner: str) -> ApiResult:
    """`POST /v1/files`: refused before a byte is read when too large or of unknown length;
    else the body is piped into R2 as it comes, its two ends read back, and the core
    decides (and deletes the object if it refuses)."""
    settings = config.batch
    h = call.headers
    refused = files.precheck_upload(h.get("content-type"), h.get("content-length"), settings)
    if refused is not None:
        return refused
    length = int(h["content-length"])
    key = files.upload_key(_IDS)
    stream = call.js.body
    try:
        if stream is None or length == 0:
            total = await blobs.put(key, b"")
        else:
            total = await blobs.put(key, stream, length=length)
    except Exception as exc:  # the client stopped short or sent more than it declared
        await blobs.delete([key])
        return error(400, f"the upload did not arrive whole: {str(exc)[:120]}", "invalid_body")
    read = files.READ_BYTES
    prefix = await blobs.get_range(key, 0, read) or b""
    suffix = await blobs.get_range(key, max(0, total - read), read) or b""
    upload = files.Upload(h.get("content-type"), key, total, prefix, suffix)
    return await files.create_file(db, blobs, _IDS, owner, upload, _now(), settings)


async def file_one(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, blobs = _stores(gw)
        if call.method == "DELETE":
            return await files.delete_file(db, blobs, owner, params["id"], _now())
        return await files.get_file(db, owner, params["id"], _now())

    return await _run(gw, call, config, go)


async def file_content(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        return await files.file_content(db, owner, params["id"], _now())

    return await _run(gw, call, config, go)


async def batches_root(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        if call.method == "GET":
            q = _query(call)
            return await batches.list_batches(
                db, _IDS, owner, _now(), q.get("after"), q.get("limit")
            )
        body = await _body(call, config)
        if isinstance(body, ApiResult):
            return body
        return await batches.create_batch(db, _IDS, owner, params["role"], body, _now())

    return await _run(gw, call, config, go)


async def batch_one(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        return await batches.get_batch(db, _IDS, owner, params["id"], _now())

    return await _run(gw, call, config, go)


async def batch_cancel(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        owner = _client(call, config, params)
        if isinstance(owner, ApiResult):
            return owner
        db, _ = _stores(gw)
        return await batches.cancel_batch(db, _IDS, owner, params["id"], _now())

    return await _run(gw, call, config, go)


async def unknown(gw, call, config: GatewayConfig, params):
    """Below /v1/files, /v1/batches or /api/nodes but no such endpoint: never a node's."""
    result = error(404, f"no such endpoint: {call.method} {call.path[:120]}", "not_found")
    return answer(gw, call, config, result)


# ---- node routes: /api/nodes/v1/leases... ----------------------------------------------------


def node_of(config: GatewayConfig, headers) -> int | None:
    """The node a request's credential names (entry's auth="node" check and the handlers)."""
    return nodeauth.node_of(config.node_secret, presented_key(headers))


def _node(call, config: GatewayConfig) -> int:
    node = node_of(config, call.headers)
    assert node is not None  # entry's auth="node" check refused the request otherwise
    call.ex.role = f"node {node}"
    return node


async def node_lease(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        node = _node(call, config)
        body = await _body(call, config)
        if isinstance(body, ApiResult):
            return body
        pool = config.pools.get(BATCH_ROLE)
        may_lease_any = pool is not None and node in pool.pair
        db, _ = _stores(gw)
        # One lease call for every kind (docs/fine-tuning-jobs.md): a request without `kinds`
        # is the batch worker's and gets batch work as work.lease gives it.
        return await finetune_nodes.lease_for_node(
            db,
            _IDS,
            node,
            may_lease_any,
            config.may_train(node),
            body,
            _now(),
            config.batch,
            config.finetune,
        )

    return await _run(gw, call, config, go)


async def node_input(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        _node(call, config)
        db, _ = _stores(gw)
        token = call.headers.get(TOKEN_HEADER)
        if finetune_nodes.is_train_lease(params["id"]):  # a training file
            return await finetune_nodes.lease_file(db, params["id"], token, "input")
        return await work.lease_input(db, _IDS, params["id"], token, _now())

    return await _run(gw, call, config, go)


async def node_heartbeat(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        _node(call, config)
        body = await _body(call, config)
        if isinstance(body, ApiResult):
            return body
        db, _ = _stores(gw)
        if finetune_nodes.is_train_lease(params["id"]):
            return await finetune_nodes.heartbeat(db, params["id"], body, _now(), config.finetune)
        return await work.heartbeat(db, params["id"], body, _now(), config.batch)

    return await _run(gw, call, config, go)


async def node_results(gw, call, config: GatewayConfig, params):
    """PUT a lease's output or error part: piped from the request into the R2 key the core
    names for this lease (a taken-over lease's parts can never mix with its successor's)."""

    async def go() -> ApiResult:
        _node(call, config)
        db, blobs = _stores(gw)
        h = call.headers
        target = await work.result_target(
            db,
            _IDS,
            params["id"],
            h.get(TOKEN_HEADER),
            params["part"],
            h.get("content-length"),
            _now(),
            config.batch,
        )
        if isinstance(target, ApiResult):
            return target
        length = int(h["content-length"])
        stream = call.js.body
        try:
            if stream is None or length == 0:
                stored = await blobs.put(target, b"")
            else:
                stored = await blobs.put(target, stream, length=length)
        except Exception as exc:  # the node stopped short: nothing usable was stored
            await blobs.delete([target])
            return error(400, f"the part did not arrive whole: {str(exc)[:120]}", "invalid_body")
        return ApiResult(200, {"bytes": stored})

    return await _run(gw, call, config, go)


async def node_commit(gw, call, config: GatewayConfig, params):
    async def go() -> ApiResult:
        _node(call, config)
        body = await _body(call, config)
        if isinstance(body, ApiResult):
            return body
        db, blobs = _stores(gw)
        if finetune_nodes.is_train_lease(params["id"]):
            return await finetune_nodes.commit(db, blobs, _IDS, params["id"], body, _now())
        return await work.commit(db, blobs, _IDS, params["id"], body, _now(), config.batch)

    return await _run(gw, call, config, go)


async def node_release(gw, call, config: GatewayConfig, params):
    """A draining worker gives back what it will not run (work.release)."""

    async def go() -> ApiResult:
        _node(call, config)
        body = await _body(call, config)
        if isinstance(body, ApiResult):
            return body
        if finetune_nodes.is_train_lease(params["id"]):
            return error(404, "a train lease is not released this way", "not_found")
        db, blobs = _stores(gw)
        return await work.release(db, blobs, _IDS, params["id"], body, _now())

    return await _run(gw, call, config, go)


# ---- /api/status and the cron -------------------------------------------------------------------


async def status_batches(gw, call, config: GatewayConfig) -> dict | None:
    """/api/status's `batches` for the calling key (batches.status_view); None when the
    storage is not bound or cannot be read (the status page then shows no batch section)."""
    try:
        db, _ = _stores(gw)
        owner = files.owner_of(presented_key(call.headers) or "")
        return await batches.status_view(db, owner, _now())
    except Exception as exc:  # the status answer must not fail with the batch tables
        call.ex.error = f"status batches: {str(exc)[:160]}"
        return None


async def cron(gw) -> dict[str, object]:
    """The cron's batch work (bounded per run by the core): expiry, cancels settling,
    closes whose write was lost, purges of deleted files' blobs."""
    try:
        db, blobs = _stores(gw)
        return {"batches_moved": await batches.expire_due(db, blobs, _IDS, _now())}
    except MissingBinding:
        return {"batches_moved": None}
    except Exception as exc:  # the probes' log line still goes out
        return {"batches_error": str(exc)[:200]}
