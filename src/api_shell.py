"""What every handler of the gateway's own APIs (files, batches, fine-tuning, the node API)
shares: who is calling, the stores, the request's small parts, and the answer.

A handler is written as `async def h(c: Call) -> ApiResult` and wrapped once by
`client_route` (a client key on `/api/heavy/<role>/v1/...`: the role is checked and the owner
resolved first) or `node_route` (a node credential on `/api/nodes/v1/...`, already verified by
entry's auth="node" check). The wrapper opens the stores, turns a storage that is not bound
into a 503 and answers the ApiResult; the handler only reads what the core needs and calls
one core function. Entry (`entry._HANDLERS`) calls the wrapped handlers with
(gateway, call, config, params) like its own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

import js
from workers import Response

import files
import jsio
import sweep
from body import BodyError
from config import GatewayConfig
from headers import cors_headers, presented_key
from heady_shared import nodeauth
from jobdb import ApiResult, Ids, error
from jsstore import D1Db, MissingBinding, R2Blobs

IDS = Ids()
TOKEN_HEADER = "x-heady-lease-token"


def now() -> float:
    return time.time()


def stores(gw) -> tuple[D1Db, R2Blobs]:
    return D1Db(gw.env), R2Blobs(gw.env)


def owner_of(call) -> str:
    """The calling client key's owner id (files.owner_of: a hash, never the key)."""
    return files.owner_of(presented_key(call.headers) or "")


def node_of(config: GatewayConfig, headers) -> int | None:
    """The node a request's credential names (entry's auth="node" check and the handlers)."""
    return nodeauth.node_of(config.node_secret, presented_key(headers))


@dataclass
class Call:
    """One API request as a handler sees it: the stores opened, the caller known (`owner`
    for a client route, `node` for a node route)."""

    gw: object
    call: object
    config: GatewayConfig
    params: dict[str, str]
    db: D1Db
    blobs: R2Blobs
    owner: str = ""
    node: int = 0

    @property
    def headers(self):
        return self.call.headers

    @property
    def token(self) -> str | None:
        """A node call's lease token."""
        return self.call.headers.get(TOKEN_HEADER)

    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.call.query, keep_blank_values=True).items()}

    async def body(self) -> bytes | ApiResult:
        """A small JSON request body read under the upload deadline and MAX_BODY_BYTES; the
        client's fault as an OpenAI error."""
        got = await jsio.read_body(self.call.js, self.call.headers, self.config)
        if isinstance(got, BodyError):
            return error(got.status, got.message, got.type)
        return b"" if got is None else bytes(got.to_bytes())

    async def store_at(self, key: str) -> ApiResult:
        """`pipe_to`, answered as the node calls expect: 200 {"bytes": n}."""
        stored = await self.pipe_to(key)
        return stored if isinstance(stored, ApiResult) else ApiResult(200, {"bytes": stored})

    async def pipe_to(self, key: str) -> int | ApiResult:
        """The request body piped into R2 at `key` (its Content-Length checked by the core
        before): the bytes stored, or a 400 (and nothing kept) when it did not arrive whole."""
        length = int(self.call.headers.get("content-length") or 0)
        stream = self.call.js.body
        try:
            if stream is None or length == 0:
                return await self.blobs.put(key, b"")
            return await self.blobs.put(key, stream, length=length)
        except Exception as exc:  # the sender stopped short or sent more than it declared
            await self.blobs.delete([key])
            return error(400, f"the upload did not arrive whole: {str(exc)[:120]}", "invalid_body")


Handler = Callable[[Call], Awaitable[ApiResult]]


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


async def _answered(gw, call, config: GatewayConfig, work: Callable[[], Awaitable[ApiResult]]):
    """Run one handler body; storage that is not bound is a 503, never a 500."""
    try:
        result = await work()
    except MissingBinding as exc:
        result = error(503, f"job storage is not configured: {exc}", "storage_unavailable")
    return answer(gw, call, config, result)


def client_route(handler: Handler):
    """A client route's handler: the role in the path must be served (it names the pool the
    work is for), the owner is the calling key's."""

    async def route(gw, call, config: GatewayConfig, params):
        async def work() -> ApiResult:
            role = params.get("role", "")
            if role not in config.pools:
                known = ", ".join(config.pools) or "none configured"
                return error(404, f"unknown role {role[:40]!r}; roles: {known}", "unknown_role")
            call.ex.role = role
            db, blobs = stores(gw)
            c = Call(gw, call, config, params, db, blobs, owner=owner_of(call))
            return await handler(c)

        return await _answered(gw, call, config, work)

    route.__doc__ = handler.__doc__
    return route


def node_route(handler: Handler):
    """A node route's handler: the credential was verified by entry's auth="node" check."""

    async def route(gw, call, config: GatewayConfig, params):
        async def work() -> ApiResult:
            node = node_of(config, call.headers)
            assert node is not None  # entry's auth="node" check refused the request otherwise
            call.ex.role = f"node {node}"
            db, blobs = stores(gw)
            return await handler(Call(gw, call, config, params, db, blobs, node=node))

        return await _answered(gw, call, config, work)

    route.__doc__ = handler.__doc__
    return route


async def housekeeping(
    gw,
    name: str,
    moved: str,
    settle: Callable[[D1Db, R2Blobs, GatewayConfig], Awaitable[int]],
    kind: sweep.Kind,
    lease_s: Callable[[GatewayConfig], float],
) -> dict[str, object]:
    """One kind's cron work for the probe log line: `settle` (its moves, bounded by the core)
    under `moved`, then the sweep of its final targets' unreferenced R2 objects under
    `<name>_swept`. Never raises: storage not bound is `moved: None`, a failure is
    `<name>_error` (or `<name>_sweep_error`; the next run resumes from the sweep's mark)."""
    try:
        db, blobs = stores(gw)
        config = gw._config()
        out: dict[str, object] = {moved: await settle(db, blobs, config)}
    except MissingBinding:
        return {moved: None}
    except Exception as exc:  # the probes' log line still goes out
        return {f"{name}_error": str(exc)[:200]}
    try:
        grace = sweep.grace_for(lease_s(config))
        out[f"{name}_swept"] = (await sweep.sweep(db, blobs, kind, now(), grace)).log()
    except Exception as exc:
        out[f"{name}_sweep_error"] = str(exc)[:200]
    return out
