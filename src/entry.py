"""Heady gateway Worker: the imperative shell.

It turns the JS request into plain data, lets the pure modules decide (routing, forward,
sync, cron, status), performs the fetches and KV calls they ask for, and hands the node's
body stream back to the runtime. Bytes never pass through Python: a relayed body is piped
JS-side, and Python only hears how the pipe ended.
"""

import asyncio
import json
import time
import traceback
from dataclasses import replace

import js
from pyodide.ffi import create_proxy
from workers import Response, WorkerEntrypoint

import body as bd
import cron
import forward as fw
import jsio
import status_page
from config import GatewayConfig, load_config
from errors import error_body
from exchange import Exchange
from headers import (
    MAX_HEADER_BYTES,
    auth_problem,
    cors_headers,
    header_bytes,
    is_sse,
    preflight_headers,
    relay_headers,
    request_headers_for_node,
    request_id,
)
from routing import HEAVY_PREFIX, RouteError, make_plan, parse_route, split_url
from settings import CONFIG_KEYS
from status import status_body
from sync import HealthSync
from version import VERSION

_NO_BODY_METHODS = frozenset({"GET", "HEAD"})
_NO_BODY_STATUSES = frozenset({101, 204, 205, 304})


class _Isolate:
    """What survives between requests in one isolate: config, health, balance turn."""

    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.sync = HealthSync()
        self.turn = 0


_ISO = _Isolate()


def reset_isolate() -> None:
    """Forget health and balance state (the test harness's reset route)."""
    config = _ISO.config
    _ISO.__init__()
    _ISO.config = config


def _clock() -> float:
    return time.time()


def _log(line: dict) -> None:
    # console.log itself, not print(): Pyodide's stdout path adds ~35 µs a line (measured,
    # docs/benchmarks.md); the runtime captures both the same way.
    js.console.log(json.dumps(line, separators=(",", ":")))


def _json_response(body: str, status: int, headers: dict[str, str]) -> Response:
    h = {"content-type": "application/json", "cache-control": "no-store", **headers}
    return Response(js.Response.new(body, status=status, headers=jsio.js_obj(h)))


class Default(WorkerEntrypoint):
    def _config(self) -> GatewayConfig:
        # Vars and secrets are fixed for an isolate's life (a change deploys new isolates),
        # so they are read and validated once, not per request.
        if _ISO.config is None:
            _ISO.config = load_config({k: _env_str(self.env, k) for k in CONFIG_KEYS})
        return _ISO.config

    def _store(self) -> jsio.KvStore:
        return jsio.KvStore(self.env)

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
        if not streaming:
            ex.status = response.status
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
            return Response(js.Response.new(None, status=204, headers=jsio.js_obj(h))), False
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
            resp = js.Response.new(page.body, status=page.status, headers=jsio.js_obj(page.headers))
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
            body = await jsio.read_body(js_req, headers, config)
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

        fwd = jsio.js_obj(request_headers_for_node(headers, config.node_token))
        upstream = jsio.Upstream(config, route, method, fwd, body, js_req.signal)
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
        assert result.head is not None  # forward sets it with the node that answered
        resp = upstream.responses[result.node]
        fallback = plan.is_fallback(result.node)
        return self._relay(resp, result.head.status, result.node, fallback, ex, config), True

    def _relay(self, resp, status: int, n: int, fallback: bool, ex: Exchange, config):
        """The node's answer for the client, as a JS Response: the SDK's `Response` wrapper
        adds only type checks and crossings on the hot path, and the runtime hands a fetch
        handler's result to `python_to_rpc`, which passes a JS object through as it is
        (workerd src/pyodide/internal/introspection.py, `wrapper_func`)."""
        heady = {
            "x-heady-node": str(n),
            "x-heady-role": ex.role or "",
            "x-heady-attempts": str(len(ex.attempts)),
            "x-heady-fallback": "true" if fallback else "false",
            "x-request-id": ex.rid,
        }
        model = _ISO.sync.view.get(n).model  # learnt by the cron from the node's metrics
        if model:
            heady["x-heady-model"] = model
        cors = cors_headers(ex.origin, config.cors_origins)
        headers = relay_headers(js.Object.fromEntries(resp.headers).to_py(), cors, heady)
        ex.status = status
        init = {"status": status, "statusText": resp.statusText, "headers": jsio.js_obj(headers)}
        stream = resp.body  # each read of a JS attribute is a crossing: once
        if stream is None or ex.method == "HEAD" or status in _NO_BODY_STATUSES:
            _log(ex.log_line())
            jsio.discard(resp)
            return js.Response.new(None, **init)
        # Logged now: if the client leaves, the request is torn down with no chance to log.
        # A stream that later breaks off adds a second line for the same request id.
        _log(ex.log_line())
        sse = is_sse(headers)
        if not sse and "content-length" in headers:
            # Handed over as it is: the runtime pumps it natively (no JS or Python per chunk).
            # With its Content-Length and no edge compression (relay_headers), a body that
            # breaks off can only end short, which every HTTP client reports.
            return js.Response.new(stream, **init)
        # An event stream, or a chunked body: the runtime would end either cleanly when the
        # node's breaks (a silent truncation), so it goes through a relay the gateway ends.
        relay = jsio.Relay(stream)
        # Not in waitUntil: the response's own pump keeps the request alive while the body
        # flows, and when the client leaves the runtime tears the request down at once —
        # which cancels the node's fetch. waitUntil would keep both alive for nobody.
        # No reference is kept here: the pipe's promise holds the task while the body flows,
        # and a task kept in a module-level set would pin the frame of every request whose
        # client left (the task then never resumes: bench/README.md).
        asyncio.ensure_future(self._finish(relay, n, ex, config, sse))  # noqa: RUF006
        return js.Response.new(relay.readable, **init)

    async def _finish(self, relay, n: int, ex: Exchange, config, sse: bool) -> None:
        """Close the client's stream when the node's ended; if the node's broke, mark the node,
        log the cut and end the client's stream loudly: a final error event for an event
        stream, an aborted body otherwise (which the wire shows as a short body)."""
        started = _clock()
        try:
            await relay.piped
        except Exception as exc:
            writer = relay.writable.getWriter()
            if writer.desiredSize is None:  # the client's side errored: it went away
                return
            sync = _ISO.sync
            ms = (_clock() - started) * 1000
            ex.attempts = [*ex.attempts, fw.cut(n, sync.view, config.health, _clock(), ms)]
            ex.error = str(exc)[:200]
            _log(ex.log_line())
            sync.maybe_flush(self._store(), config.health, _clock, self._background, _log)
            if sse:
                jsio.end_loudly(writer, ex.rid)
            else:
                jsio.end_abruptly(writer)
            return
        # Not awaited: the close settles only once the client has read everything, by when
        # the request may be over and this task would never resume (bench/README.md).
        relay.writable.getWriter().close().catch(jsio.IGNORE)

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
            jsio.Prober(config),
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


def _env_str(env, key: str) -> str | None:
    value = getattr(env, key, None)
    if value is None or not isinstance(value, str):
        return None
    return value
