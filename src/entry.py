"""Heady gateway Worker: the imperative shell.

It turns the JS request into plain data, lets the pure modules decide (routing, forward,
sync, cron, status), performs the fetches and KV calls they ask for, and hands the node's
body stream back to the runtime. Bytes never pass through Python: a relayed body is piped
JS-side, and Python only hears how the pipe ended.
"""

import asyncio
import contextlib
import json
import time
import traceback
from dataclasses import replace

import js
from pyodide.ffi import create_proxy, to_js
from workers import Response, WorkerEntrypoint

import body as bd
import cron
import forward as fw
import status_page
from attempt import Head, error_kind
from config import GatewayConfig, load_config
from errors import error_body, sse_error_event
from exchange import Exchange
from headers import (
    MAX_HEADER_BYTES,
    auth_problem,
    cors_headers,
    header_bytes,
    preflight_headers,
    request_headers_for_node,
    request_id,
    response_header_drop,
)
from heady_shared.failures import HEAD_FIELDS
from health import KV_KEY
from routing import HEAVY_PREFIX, RouteError, make_plan, parse_route, split_url, upstream_url
from settings import CONFIG_KEYS
from status import status_body
from sync import HealthSync
from version import VERSION

_NO_BODY_METHODS = frozenset({"GET", "HEAD"})
_NO_BODY_STATUSES = frozenset({101, 204, 205, 304})
_PROBE_FIELDS = (*HEAD_FIELDS, "content-type")


class _Isolate:
    """What survives between requests in one isolate: config, health, balance turn."""

    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.sync = HealthSync()
        self.turn = 0


_ISO = _Isolate()
_PENDING: set[asyncio.Future] = set()  # relays being finished (a task needs a reference)
_IGNORE = create_proxy(lambda *_: None)
# The pipe leaves the client's stream open whatever happens, so _finish decides its end.
_PIPE_OPTIONS = to_js(
    {"preventClose": True, "preventAbort": True}, dict_converter=js.Object.fromEntries
)


def reset_isolate() -> None:
    """Forget health and balance state (the test harness's reset route)."""
    config = _ISO.config
    _ISO.__init__()
    _ISO.config = config


def _clock() -> float:
    return time.time()


def _log(line: dict) -> None:
    print(json.dumps(line, separators=(",", ":")))


def _js_obj(d: dict):
    return to_js(d, dict_converter=js.Object.fromEntries)


def _json_response(body: str, status: int, headers: dict[str, str]) -> Response:
    h = {"content-type": "application/json", "cache-control": "no-store", **headers}
    return Response(js.Response.new(body, status=status, headers=_js_obj(h)))


class _KvStore:
    """sync.HealthStore over the KV binding."""

    def __init__(self, kv) -> None:
        self._kv = kv

    async def read(self) -> str | None:
        # 60 s is the shortest edge cache KV allows.
        raw = await self._kv.get(KV_KEY, cacheTtl=60)
        return None if raw is None else str(raw)

    async def write(self, body: str, ttl_s: int) -> None:
        await self._kv.put(KV_KEY, body, expirationTtl=ttl_s)


class _Upstream:
    """forward.Upstream: one fetch per node, up to the response head, with the client's
    request body (buffered once, so any node can be sent the same bytes)."""

    def __init__(self, config: GatewayConfig, route, method: str, headers, body, client) -> None:
        self._config = config
        self._route = route
        self._method = method
        self._headers = headers
        self._body = body
        # The incoming request's AbortSignal fires when the client disconnects before our
        # response (compat flag enable_request_signal; docs/client-faults.md). The runtime
        # ignores it for subrequests, so each fetch gets a fresh signal that follows it.
        self._client = client
        self._tried = 0
        self.responses: dict[int, object] = {}

    async def head(self, node: int, timeout_s: float):
        if self._tried and self._client.aborted:  # gone while the last node failed
            return "client_gone"
        self._tried += 1
        url = upstream_url(self._config.node(node).base_url, self._route)
        resp, error = await _fetch_head(
            url,
            timeout_s,
            self._client,
            method=self._method,
            headers=self._headers,
            body=self._body,
        )
        if error:
            return "client_gone" if self._client.aborted else error
        self.responses[node] = resp
        h = resp.headers
        return Head(int(resp.status), {f: h.get(f) for f in HEAD_FIELDS})

    def discard(self, node: int) -> None:
        _discard(self.responses.pop(node, None))


class _Prober:
    """cron.Prober: GET a node path with the node token and a head time-out."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        h = {"ngrok-skip-browser-warning": "1", "accept": "application/json, text/plain"}
        if config.node_token:
            h["authorization"] = f"Bearer {config.node_token}"
        self._headers = _js_obj(h)

    async def get(self, node: int, path: str, timeout_s: float):
        url = self._config.node(node).base_url + path
        resp, error = await _fetch_head(url, timeout_s, method="GET", headers=self._headers)
        if error:
            return error
        h = resp.headers
        head = Head(int(resp.status), {f: h.get(f) for f in _PROBE_FIELDS})
        if not 200 <= head.status < 300:
            _discard(resp)
            return head, ""
        return head, str(await resp.text())


class Default(WorkerEntrypoint):
    def _config(self) -> GatewayConfig:
        # Vars and secrets are fixed for an isolate's life (a change deploys new isolates),
        # so they are read and validated once, not per request.
        if _ISO.config is None:
            _ISO.config = load_config({k: _env_str(self.env, k) for k in CONFIG_KEYS})
        return _ISO.config

    def _store(self) -> _KvStore | None:
        kv = getattr(self.env, "HEALTH_KV", None)
        return None if kv is None else _KvStore(kv)

    def _background(self, awaitable) -> None:
        self.ctx.waitUntil(create_proxy(asyncio.ensure_future(awaitable)))

    async def fetch(self, request):
        js_req = getattr(request, "js_object", request)
        method = str(js_req.method)
        path, query = split_url(str(js_req.url))
        try:
            headers = js.Object.fromEntries(js_req.headers).to_py()
        except Exception:  # a runtime that cannot list the headers is still answered in JSON
            headers = {}
        ex = Exchange(
            request_id(headers.get("x-request-id")), method, path, headers.get("origin"), _clock
        )
        try:
            response, streaming = await self._handle(js_req, method, path, query, headers, ex)
        except Exception as exc:  # the promise: never a traceback to the client
            ex.error = "".join(traceback.format_exception(exc))[-2000:]
            response, streaming = self._error(ex, 500, "internal error; see the log for this id")
        ex.status = response.status
        if not streaming:
            _log(ex.log_line())
        return response

    def _error(self, ex: Exchange, status: int, message: str, type_=None, headers=None, **extra):
        config = _ISO.config
        cors = cors_headers(ex.origin, config.cors_origins if config else ("*",))
        h = {"x-request-id": ex.rid, **cors, **(headers or {})}
        body = error_body(status, message, ex.rid, type_, **extra)
        return _json_response(body, status, h), False

    async def _handle(self, js_req, method, path, query, headers, ex: Exchange):
        config = self._config()
        if header_bytes(headers) > MAX_HEADER_BYTES:
            return self._error(ex, 431, "request headers are too large")
        if method == "OPTIONS":
            h = {"x-request-id": ex.rid, **preflight_headers(ex.origin, config.cors_origins)}
            return Response(js.Response.new(None, status=204, headers=_js_obj(h))), False
        if path == "/healthz" and method in ("GET", "HEAD"):
            body = json.dumps({"status": "ok", "version": VERSION})
            cors = cors_headers(ex.origin, config.cors_origins)
            return _json_response(body, 200, {"x-request-id": ex.rid, **cors}), False
        if path == "/api/status":
            if method not in ("GET", "HEAD"):
                return self._error(ex, 405, "use GET", headers={"allow": "GET, HEAD, OPTIONS"})
            return self._denied(config, headers, ex) or await self._status(config, ex)
        if path.startswith(HEAVY_PREFIX) or path == HEAVY_PREFIX.rstrip("/"):
            return await self._heavy(js_req, method, path, query, headers, config, ex)
        page = status_page.serve(method, path, headers.get("if-none-match"))
        if page is not None:
            resp = js.Response.new(page.body, status=page.status, headers=_js_obj(page.headers))
            return Response(resp), False
        return self._error(
            ex, 404, "no such endpoint; use /api/heavy/<role>/v1/..., /api/status or /healthz"
        )

    def _denied(self, config: GatewayConfig, headers, ex: Exchange):
        problem = auth_problem(headers, config.api_keys, config.auth_disabled)
        if problem is None:
            return None
        status, type_, message = problem
        challenge = {"www-authenticate": "Bearer"} if status == 401 else None
        return self._error(ex, status, message, type_, headers=challenge)

    # ---- the request path -------------------------------------------------------------

    async def _heavy(self, js_req, method, path, query, headers, config, ex):
        if config.fatal:
            message = "gateway misconfigured: " + "; ".join(config.fatal)
            return self._error(ex, 503, message, "misconfigured")
        denied = self._denied(config, headers, ex)
        if denied:
            return denied
        route = parse_route(method, path, query, config.roles, config.upstream_paths)
        if isinstance(route, RouteError):
            return self._error(ex, route.status, route.message, route.type)
        ex.role = route.role

        body = None
        if method not in _NO_BODY_METHODS:
            body = await _read_body(js_req, headers, config)
            if isinstance(body, bd.BodyError):
                return self._error(ex, body.status, body.message, body.type)
        # A client key sent in the query string is the gateway's, never the node's.
        route = replace(route, query=bd.strip_key_params(route.query, config.api_keys))

        store = self._store()
        sync = _ISO.sync
        await sync.refresh(store, config.health, _clock, self._background, _log)
        plan = make_plan(config.pools[route.role], config, sync.view, _clock(), _ISO.turn)
        _ISO.turn += 1
        if not plan.nodes:
            message = f"no configured node serves role {route.role!r}"
            return self._error(ex, 503, message, "no_nodes", headers={"retry-after": "60"})

        fwd = _js_obj(request_headers_for_node(headers, config.node_token))
        upstream = _Upstream(config, route, method, fwd, body, js_req.signal)
        result = await fw.forward(
            plan,
            upstream,
            sync.view,
            config.health,
            attempt_s=config.timeouts.attempt_for(route.role),
            deadline=ex.started + config.timeouts.deadline_s,
            clock=_clock,
        )
        ex.attempts = result.attempts
        sync.maybe_flush(store, config.health, _clock, self._background, _log)
        if result.node is None:
            return self._error(
                ex,
                503,
                f"no node could serve role {route.role!r}; tried {len(ex.attempts)}",
                "all_nodes_failed",
                headers={"retry-after": str(result.retry_after_s)},
                attempts=[a.public() for a in ex.attempts],
            )
        resp = upstream.responses[result.node]
        return self._relay(resp, result.node, plan.is_fallback(result.node), ex, config), True

    def _relay(self, resp, n: int, fallback: bool, ex: Exchange, config) -> Response:
        upstream = js.Object.fromEntries(resp.headers).to_py()
        for name in response_header_drop(list(upstream), upstream.get("connection")):
            del upstream[name]
        upstream.update(cors_headers(ex.origin, config.cors_origins))
        upstream.update(
            {
                "x-heady-node": str(n),
                "x-heady-role": ex.role or "",
                "x-heady-attempts": str(len(ex.attempts)),
                "x-heady-fallback": "true" if fallback else "false",
                "x-request-id": ex.rid,
            }
        )
        sse = "text/event-stream" in (upstream.get("content-type") or "")
        if not sse and "content-encoding" not in upstream:
            # The edge (and miniflare, which copies its rules) gzips JSON and text answers
            # that carry no Content-Encoding, and its compressor ends a body that broke off
            # as if complete. An explicit encoding turns that off, so a cut answer stays cut
            # (developers.cloudflare.com/speed/optimization/content/compression/).
            upstream["content-encoding"] = "identity"
        status = int(resp.status)
        init = {"status": status, "statusText": resp.statusText, "headers": _js_obj(upstream)}
        if resp.body is None or ex.method == "HEAD" or status in _NO_BODY_STATUSES:
            ex.status = status
            _log(ex.log_line())
            _discard(resp)
            return Response(js.Response.new(None, **init))
        # The body is piped JS-side into a stream we own, so that if the node's body breaks
        # we can end the client's stream loudly (an error event, or an abort) instead of the
        # runtime's silent clean end. Python hears only how the pipe ended. A body of known
        # length goes through a FixedLengthStream: a cut one can then never end cleanly.
        length = upstream.get("content-length")
        relay = js.TransformStream.new()
        piped = resp.body.pipeTo(relay.writable, _PIPE_OPTIONS)
        piped.catch(_IGNORE)  # _finish reads the outcome; a torn-down request must not log it
        body = relay.readable
        if not sse and length is not None and length.isascii() and length.isdigit():
            fixed = js.FixedLengthStream.new(int(length))
            body.pipeTo(fixed.writable).catch(_IGNORE)
            body = fixed.readable
        ex.status = status
        # Logged now: if the client leaves, the request is torn down with no chance to log.
        # A body that later breaks off adds a second line for the same request id.
        _log(ex.log_line())
        # Not in waitUntil: the response's own pump keeps the request alive while the body
        # flows, and when the client leaves the runtime tears the request down at once —
        # which cancels the node's fetch. waitUntil would keep both alive for nobody.
        task = asyncio.ensure_future(self._finish(piped, relay.writable, sse, n, ex, config))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)
        return Response(js.Response.new(body, **init))

    async def _finish(self, piped, writable, sse: bool, n: int, ex: Exchange, config) -> None:
        """Close the client's stream when the node's ended; if the node's broke, mark the node,
        log the cut and end the client's stream loudly."""
        started = _clock()
        try:
            await piped
        except Exception as exc:
            writer = writable.getWriter()
            if writer.desiredSize is None:  # the client's side errored: it went away
                return
            sync = _ISO.sync
            ms = (_clock() - started) * 1000
            ex.attempts = [*ex.attempts, fw.cut(n, sync.view, config.health, _clock(), ms)]
            ex.error = str(exc)[:200]
            _log(ex.log_line())
            sync.maybe_flush(self._store(), config.health, _clock, self._background, _log)
            await _end_loudly(writer, sse, ex.rid)
            return
        with contextlib.suppress(Exception):  # the client left just now: nothing to finish
            await writable.getWriter().close()

    # ---- status and cron --------------------------------------------------------------

    async def _status(self, config: GatewayConfig, ex: Exchange):
        sync = _ISO.sync
        await sync.refresh(self._store(), config.health, _clock, self._background, _log)
        body = status_body(config, sync.view, _clock(), ex.rid, VERSION)
        cors = cors_headers(ex.origin, config.cors_origins)
        return _json_response(json.dumps(body), 200, {"x-request-id": ex.rid, **cors}), False

    async def scheduled(self, controller, env=None, ctx=None):
        """Cron: probe the nodes that need it, all in parallel, and share what changed."""
        config = self._config()
        started = _clock()
        sync, store = _ISO.sync, self._store()
        await sync.read(store, config.health, _clock, _log)
        scheduled_s = float(getattr(controller, "scheduledTime", started * 1000)) / 1000
        results = await cron.probe_all(
            config,
            sync.view,
            _Prober(config),
            scheduled_s,
            str(getattr(controller, "cron", "") or ""),
            _clock,
        )
        wrote = False
        if sync.view.may_write(_clock(), config.health) and not sync.flushing:
            wrote = await sync.flush(store, config.health, _clock, _log)
        _log(
            {
                "msg": "probe",
                "probed": [r.log() for r in results],
                "wrote_kv": wrote,
                "ms": round(max(0.0, _clock() - started) * 1000, 1),
            }
        )


async def _end_loudly(writer, sse: bool, rid: str) -> None:
    """After a node's body broke: an SSE client gets one final error event and a clean end;
    any other client an aborted body, which every HTTP client reports as incomplete."""
    if not sse:
        await writer.abort(js.Error.new("upstream disconnected"))
        return
    try:
        await writer.write(js.TextEncoder.new().encode(sse_error_event(rid)))
        await writer.close()
    except Exception:  # the client left meanwhile: nothing more to tell it
        pass


async def _read_body(js_req, headers, config: GatewayConfig):
    """The whole request body, read once under the upload deadline, before any node is
    contacted: a slow or broken upload is the client's fault and must never cost a node a
    mark or GPU time, and a truncated body must never reach a node as if whole.
    Returns the bytes (a JS buffer, or None) or a BodyError for the client."""
    limit = config.max_body_bytes
    declared = bd.content_length(headers.get("content-length"), limit)
    if isinstance(declared, bd.BodyError):
        return declared
    stream = js_req.body
    if stream is None:
        return None
    # A declared length within the limit is read in one call; a chunked upload by chunks.
    read = js_req.arrayBuffer() if declared is not None else _read_limited(stream, limit)
    try:
        body = await asyncio.wait_for(read, config.timeouts.upload_s)
    except TimeoutError:
        secs = config.timeouts.upload_s
        return bd.BodyError(408, "upload_timeout", f"request body not sent within {secs:g} s")
    except Exception as exc:  # bad chunked framing, a client that dropped mid-upload
        fault = bd.read_fault(str(exc))
        if fault is None:
            raise  # our own misuse of the stream: a logged internal error
        return bd.body_error(fault)
    if body is None:
        return bd.BodyError(413, bd.TOO_LARGE, f"request body exceeds the {limit} byte limit")
    fault = bd.replay_fault(declared, int(body.byteLength))
    return bd.body_error(fault) if fault else body


async def _read_limited(stream, limit: int):
    """Read a body with a running total, so an endless chunked upload is cut off at the limit
    instead of exhausting the isolate's memory. None when over the limit."""
    reader = stream.getReader()
    chunks = []
    total = 0
    while True:
        chunk = await reader.read()
        if chunk.done:
            break
        total += chunk.value.byteLength
        if total > limit:
            reader.cancel()
            return None
        chunks.append(chunk.value)
    if len(chunks) == 1:
        return chunks[0]
    joined = js.Uint8Array.new(total)
    offset = 0
    for c in chunks:
        joined.set(c, offset)
        offset += c.byteLength
    return joined


async def _fetch_head(url: str, timeout_s: float, client=None, **init):
    """fetch() until the response head arrives: (response, None), or (None, "timeout" |
    "refused" | "error"). The time-out covers the head only: the controller is aborted on a
    time-out and never after, so a body that then streams for longer is not cut. With the
    client's signal, the fetch is also aborted when the client leaves."""
    controller = js.AbortController.new()
    signal = controller.signal
    if client is not None:
        signal = js.AbortSignal.any(to_js([signal, client]))
    try:
        resp = await asyncio.wait_for(
            js.fetch(url, signal=signal, redirect="manual", **init), timeout_s
        )
    except TimeoutError:
        controller.abort()
        return None, "timeout"
    except Exception as exc:  # workerd's network errors arrive as JsException
        return None, error_kind(str(exc))
    return resp, None


def _discard(resp) -> None:
    """Free the connection of an answer we will not relay."""
    if resp is not None and resp.body is not None:
        resp.body.cancel()


def _env_str(env, key: str) -> str | None:
    value = getattr(env, key, None)
    if value is None or not isinstance(value, str):
        return None
    return value
