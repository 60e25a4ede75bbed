"""Heady gateway Worker: the dispatcher, and the imperative shell around the pure core.

`Default.fetch` turns the JS request into plain data, finds its row in the route table
(dispatch.ROUTES), applies the row's checks (node configuration, who may call) and runs its
handler; every request is logged once, here, when its response head goes out. The pure
modules decide (routing, forward, sync, cron, status); jsio.py performs the fetches, KV calls
and body reads they ask for, and hands the node's body stream back to the runtime. Bytes
never pass through Python: a relayed body is piped JS-side, and Python only hears how the
pipe ended.
"""

import asyncio
import json
import time
import traceback

import js
from pyodide.ffi import create_proxy
from workers import Response, WorkerEntrypoint

import api_shell
import capability
import cron
import ft_shell
import ftroute
import jobs_shell
import jsio
import status_page
from body import BodyError
from config import GatewayConfig, load_config
from dispatch import ROUTES, Match, Row, resolve
from errors import error_body, sse_error_event
from exchange import Exchange
from forward import Budget, ForwardResult, cut, forward, retry_after
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
from heady_shared.capabilities import LORA
from jobdb import ApiResult
from routing import Plan, RouteError, make_plan, parse_route, split_url
from services import Services
from settings import CONFIG_KEYS
from status import status_body
from sync import HealthSync
from version import VERSION

_NO_BODY_METHODS = frozenset({"GET", "HEAD"})
_NO_BODY_STATUSES = frozenset({101, 204, 205, 304})


class _Isolate:
    """What survives between requests in one isolate: config, node health, balance turn."""

    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.sync: HealthSync | None = None  # made with the config (its health policy)
        self.turn = 0


_ISO = _Isolate()


def reset_isolate() -> None:
    """Forget health and balance state (the test harness's reset route)."""
    config = _ISO.config
    _ISO.__init__()
    if config is not None:
        _ISO.config, _ISO.sync = config, HealthSync(config.health)


def _clock() -> float:
    return time.time()


def _log(line: dict) -> None:
    # console.log itself, not print(): Pyodide's stdout path adds ~35 µs a line (measured,
    # docs/benchmarks.md); the runtime captures both the same way.
    js.console.log(json.dumps(line, separators=(",", ":")))


class _Call:
    """One incoming request as plain data (plus the JS request, for its body and signal)."""

    __slots__ = ("ex", "headers", "js", "method", "path", "query")

    def __init__(self, js_req, method: str, path: str, query: str, headers: dict, ex: Exchange):
        self.js = js_req
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.ex = ex


_NOT_FOUND = "no such endpoint; use /api/heavy/<role>/v1/..., /api/status or /healthz"


class Default(WorkerEntrypoint):
    _services: Services | None = None  # this request's, once built (_io)

    # ---- per isolate and per request state ---------------------------------------------

    def _config(self) -> GatewayConfig:
        # Vars and secrets are fixed for an isolate's life (a change deploys new isolates),
        # so they are read and validated once, not per request.
        if _ISO.config is None:
            config = load_config({k: _env_str(self.env, k) for k in CONFIG_KEYS})
            _ISO.config, _ISO.sync = config, HealthSync(config.health)
        return _ISO.config

    def _io(self) -> Services:
        """This request's I/O for the core: built once (the runtime makes a Default per
        request, so `ctx` — and waitUntil — is this request's)."""
        io = self._services
        if io is None:
            io = Services(jsio.KvStore(self.env), _clock, self._background, _log)
            self._services = io
        return io

    def _background(self, awaitable) -> None:
        self.ctx.waitUntil(create_proxy(asyncio.ensure_future(awaitable)))

    # ---- dispatch: the one place a request is routed and logged ------------------------

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
            response = await self._dispatch(_Call(js_req, method, path, query, headers, ex))
        except Exception as exc:  # the promise: never a traceback to the client
            ex.error = "".join(traceback.format_exception(exc))[-2000:]
            response = self._error(ex, 500, "internal error; see the log for this id")
        # Logged as the head goes out: if the client leaves mid-body, the request is torn
        # down with no chance to log later. A relayed stream that breaks off adds a second
        # line for the same request id (_finish).
        _log(ex.log_line())
        return response

    async def _dispatch(self, call: _Call):
        config = self._config()
        ex = call.ex
        if header_bytes(call.headers) > MAX_HEADER_BYTES:
            return self._error(ex, 431, "request headers are too large")
        found = resolve(ROUTES, call.method, call.path)
        if found is None:
            return self._error(ex, 404, _NOT_FOUND)
        if not isinstance(found, Match):
            row = found.row
            use = " or ".join(m for m in sorted(row.methods or ()) if m != "HEAD")
            return self._error(ex, 405, f"use {use}", headers={"allow": row.allow})
        row = found.row
        if row.needs_fleet and config.fatal:
            message = "gateway misconfigured: " + "; ".join(config.fatal)
            return self._error(ex, 503, message, "misconfigured")
        denied = self._denied(row, config, call.headers, ex)
        if denied is not None:
            return denied
        return await _HANDLERS[row.handler](self, call, config, found.params)

    def _denied(self, row: Row, config: GatewayConfig, headers, ex: Exchange):
        if row.auth == "none":
            return None
        if row.auth == "node":  # a node's own calls carry its node credential, not a client key
            ok = api_shell.node_of(config, headers) is not None
            problem = None if ok else (401, "unauthorized", "missing or invalid node credential")
        else:
            problem = auth_problem(headers, config.api_keys, config.auth_disabled)
        if problem is None:
            return None
        status, type_, message = problem
        challenge = {"www-authenticate": "Bearer"} if status == 401 else None
        return self._error(ex, status, message, type_, headers=challenge)

    # ---- answers the gateway gives itself ----------------------------------------------

    def _json(self, ex: Exchange, body: str, status: int, headers: dict[str, str]) -> Response:
        ex.status = status
        h = {"content-type": "application/json", "cache-control": "no-store", **headers}
        return Response(js.Response.new(body, status=status, headers=jsio.js_obj(h)))

    def _error(self, ex: Exchange, status: int, message: str, type_=None, headers=None, **extra):
        config = _ISO.config
        cors = cors_headers(ex.origin, config.cors_origins if config else ("*",))
        h = {"x-request-id": ex.rid, **cors, **(headers or {})}
        return self._json(ex, error_body(status, message, ex.rid, type_, **extra), status, h)

    async def _preflight(self, call: _Call, config: GatewayConfig, _params):
        ex = call.ex
        ex.status = 204
        h = {"x-request-id": ex.rid, **preflight_headers(ex.origin, config.cors_origins)}
        return Response(js.Response.new(None, status=204, headers=jsio.js_obj(h)))

    async def _healthz(self, call: _Call, config: GatewayConfig, _params):
        ex = call.ex
        body = json.dumps({"status": "ok", "version": VERSION})
        cors = cors_headers(ex.origin, config.cors_origins)
        return self._json(ex, body, 200, {"x-request-id": ex.rid, **cors})

    async def _page(self, call: _Call, config: GatewayConfig, _params):
        page = status_page.serve(call.method, call.path, call.headers.get("if-none-match"))
        if page is None:  # not the page's method or path after all: the shell's 404
            return self._error(call.ex, 404, _NOT_FOUND)
        call.ex.status = page.status
        resp = js.Response.new(page.body, status=page.status, headers=jsio.js_obj(page.headers))
        return Response(resp)

    async def _status(self, call: _Call, config: GatewayConfig, _params):
        ex, sync = call.ex, _ISO.sync
        await sync.refresh(self._io())
        jobs = await jobs_shell.status_batches(self, call, config)
        ft = await ft_shell.status_fine_tuning(self, call)
        body = status_body(config, sync.view, _clock(), ex.rid, VERSION, jobs, ft)
        cors = cors_headers(ex.origin, config.cors_origins)
        return self._json(ex, json.dumps(body), 200, {"x-request-id": ex.rid, **cors})

    # ---- the request path: forward to a node -------------------------------------------

    async def _forward(self, call: _Call, config: GatewayConfig, _params):
        ex = call.ex
        route = parse_route(
            call.method, call.path, call.query, config.roles, config.upstream_paths, config.api_keys
        )
        if isinstance(route, RouteError):
            return self._error(ex, route.status, route.message, route.type)
        ex.role = route.role

        body = None
        if call.method not in _NO_BODY_METHODS:
            body = await jsio.read_body(call.js, call.headers, config)
            if isinstance(body, BodyError):
                return self._error(ex, body.status, body.message, body.type)

        base = None  # a fine-tuned model's base: the model, not the role, picks the nodes
        if jsio.body_contains(body, ftroute.NEEDLE):  # a byte search: no I/O for other models
            ft = await ft_shell.ft_request(self, call, bytes(body.to_bytes()))
            if isinstance(ft, ApiResult):  # not the caller's model: never forwarded
                return api_shell.answer(self, call, config, ft)
            if ft is not None:
                base, body = ft[0].base, ft[1]
        if base is not None:
            need = LORA
        else:
            need = capability.needs(
                call.method, route.rest, lambda: jsio.body_contains(body, capability.IMAGE_PART)
            )
        io, sync = self._io(), _ISO.sync
        await sync.refresh(io)
        now = _clock()
        plan = make_plan(config.pools[route.role], config, sync.view, now, _ISO.turn, need, base)
        _ISO.turn += 1
        if not plan.nodes and need is not None:
            wait = retry_after(sync.view, plan.capable, now, config.health)
            why = f"none of them is up (retry in {wait} s)"
            if base is not None:
                why = f"none that is up serves its base model {base[:120]!r} (retry in {wait} s)"
            return self._no_capable(ex, plan, why, wait)
        if not plan.nodes:
            message = f"no configured node serves role {route.role!r}"
            return self._error(ex, 503, message, "no_nodes", headers={"retry-after": "60"})

        fwd = jsio.js_obj(request_headers_for_node(call.headers, config.node_token))
        client = call.js.signal  # the client's AbortSignal (docs/client-faults.md)
        upstream = jsio.Upstream(config, route, call.method, fwd, body, client)
        budget = Budget(
            _clock, ex.started + config.timeouts.deadline_s, config.timeouts.attempt_for(route.role)
        )
        result = await forward(plan, upstream, sync, budget)
        ex.attempts = result.attempts
        sync.maybe_flush(io)
        if result.node is None and need is not None:
            tried = ", ".join(str(a.node) for a in ex.attempts)
            return self._no_capable(
                ex, plan, f"none of those tried ({tried}) answered", result.retry_after_s or 1
            )
        if result.node is None:
            return self._error(
                ex,
                503,
                f"no node could serve role {route.role!r}; tried {len(ex.attempts)}",
                "all_nodes_failed",
                headers={"retry-after": str(result.retry_after_s)},
                attempts=[a.public() for a in ex.attempts],
            )
        return self._relay(result, plan, ex, config, client)

    async def _models(self, call: _Call, config: GatewayConfig, params):
        """`GET /v1/models`: the node's list (forwarded as any request) with the caller's
        fine-tuned models appended (ft_shell.models_merged). Only a 200 JSON answer of a known,
        bounded length is read and merged; anything else (an error, a stream) is relayed as
        it is, so this row never holds a body the plain relay would have streamed."""
        response = await self._forward(call, config, params)
        resp = getattr(response, "js_object", response)
        if int(resp.status) != 200:
            return response
        headers = js.Object.fromEntries(resp.headers).to_py()
        length = headers.get("content-length", "")
        small = length.isdigit() and int(length) <= ftroute.MODELS_MAX_BYTES
        if not small or "json" not in headers.get("content-type", "") or is_sse(headers):
            return response
        text = str(await resp.text())
        merged = await ft_shell.models_merged(self, call, text)
        if merged is None:
            return js.Response.new(text, status=200, headers=jsio.js_obj(headers))
        for drop in ("content-length", "content-encoding", "etag"):
            headers.pop(drop, None)
        return js.Response.new(merged, status=200, headers=jsio.js_obj(headers))

    def _no_capable(self, ex: Exchange, plan: Plan, why: str, retry_after_s: int):
        """503 for a request no node that has its capability can serve now."""
        need = plan.need or ""
        have = ", ".join(map(str, plan.capable)) or "none reports it yet"
        message = (
            f"no node that serves {capability.label(need)} can take this {plan.role!r} "
            f"request: {why}; nodes with {capability.label(need)}: {have}"
        )
        return self._error(
            ex,
            503,
            message,
            "no_capable_node",
            headers={"retry-after": str(retry_after_s)},
            capability=need,
            nodes=list(plan.capable),
            attempts=[a.public() for a in ex.attempts],
        )

    def _relay(
        self,
        result: ForwardResult,
        plan: Plan,
        ex: Exchange,
        config: GatewayConfig,
        client,
    ):
        """The node's answer for the client, as a JS Response: the SDK's `Response` wrapper
        adds only type checks and crossings on the hot path, and the runtime hands a fetch
        handler's result to `python_to_rpc`, which passes a JS object through as it is
        (workerd src/pyodide/internal/introspection.py, `wrapper_func`)."""
        n, resp = result.node, result.response
        assert n is not None and result.head is not None  # forward sets all three together
        status = result.head.status
        heady = {
            "x-heady-node": str(n),
            "x-heady-role": ex.role or "",
            "x-heady-attempts": str(len(ex.attempts)),
            "x-heady-fallback": "true" if plan.is_fallback(n) else "false",
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
            jsio.discard(resp)
            return js.Response.new(None, **init)
        sse = is_sse(headers)
        if not sse and "content-length" in headers:
            # Handed over as it is: the runtime pumps it natively (no JS or Python per chunk).
            # With its Content-Length and no edge compression (relay_headers), a body that
            # breaks off can only end short, which every HTTP client reports.
            return js.Response.new(stream, **init)
        # An event stream, or a chunked body: the runtime would end either cleanly when the
        # node's breaks (a silent truncation), so it goes through a relay the gateway ends.
        # Event streams also get the idle limit (a token stream is never silent for long).
        idle_s = config.timeouts.stream_idle_s if sse else 0.0
        abort = result.head.abort  # the node fetch's AbortController (jsio.Upstream.head)
        relay = jsio.Relay(stream, config.stream_relay, idle_s, abort.abort.bind(abort))
        if idle_s > 0 and not relay.native:
            began = _clock()
            relay.on_stall = lambda: self._stall_ended(relay, n, ex, began)
        # Not in waitUntil: the response's own pump keeps the request alive while the body
        # flows, and when the client leaves the runtime tears the request down at once —
        # which cancels the node's fetch. waitUntil would keep both alive for nobody.
        # No reference is kept here: the pipe's promise holds the task while the body flows,
        # and a task kept in a module-level set would pin the frame of every request whose
        # client left (the task then never resumes: bench/README.md).
        asyncio.ensure_future(self._finish(relay, n, ex, sse, client))  # noqa: RUF006
        return js.Response.new(relay.readable, **init)

    async def _finish(self, relay, n: int, ex: Exchange, sse: bool, client) -> None:
        """Close the client's stream when the node's ended; if the node's broke (or went
        silent for STREAM_IDLE_S), mark the node, log the cut and end the client's stream
        loudly: a final error event for an event stream, an aborted body otherwise (which the
        wire shows as a short body). A native relay on a runtime older than workerd
        v1.20260619 has no writable side left by then (jsio.Relay): the node is still marked
        and the cut logged, and the client sees the runtime's clean end."""
        started = _clock()
        try:
            await relay.piped
        except Exception as exc:
            relay.stop()
            if relay.on_stall is not None and relay.idle:
                return  # ended at the stall itself (_stall_ended)
            writer = relay.writable.getWriter()
            writable = writer.desiredSize is not None
            # The client went away: its signal (production) or, for a guarded relay, its
            # side of the stream errored. (A native one's is errored by the node's break too.)
            if client.aborted or (not writable and not relay.native):
                return
            reason = "upstream_idle" if relay.idle else "upstream_disconnected"
            self._cut(n, ex, started, reason, str(exc)[:200])
            if not writable:
                return
            if sse:
                jsio.end_loudly(writer, ex.rid, reason)
            else:
                jsio.end_abruptly(writer)
            return
        relay.stop()
        # Not awaited: the close settles only once the client has read everything, by when
        # the request may be over and this task would never resume (bench/README.md).
        relay.writable.getWriter().close().catch(jsio.IGNORE)

    def _stall_ended(self, relay, n: int, ex: Exchange, started: float) -> None:
        """A guarded event stream whose node went silent: the final `upstream_idle` event and
        the end go out through the relay's own controller at once (jsio.Relay.on_stall); the
        cut is logged and the node marked unless the client had already left."""
        relay.stop()
        if relay.end_stalled(sse_error_event(ex.rid, "upstream_idle")):
            error = "the node sent nothing for STREAM_IDLE_S"
            if relay.abort_errors:  # the stream still ended: say what the runtime threw
                error += "; aborting it failed: " + "; ".join(relay.abort_errors)
            self._cut(n, ex, started, "upstream_idle", error)

    def _cut(self, n: int, ex: Exchange, started: float, reason: str, error: str) -> None:
        """Node `n`'s body broke (or went silent) after its head: the attempt becomes a cut
        that counts against the node, and the request's second log line says how it ended."""
        io, sync = self._io(), _ISO.sync
        ms = (_clock() - started) * 1000
        ex.attempts = [*ex.attempts, cut(n, sync, _clock(), ms, reason)]
        ex.error = error
        _log(ex.log_line())  # the request's second line: how its body ended
        sync.maybe_flush(io)

    # ---- cron ---------------------------------------------------------------------------

    async def scheduled(self, controller, env=None, ctx=None):
        """Cron: probe the nodes that need it, all in parallel, and share what changed."""
        config = self._config()
        started = _clock()
        io, sync = self._io(), _ISO.sync
        await sync.read(io)
        scheduled_s = float(getattr(controller, "scheduledTime", started * 1000)) / 1000
        results = await cron.probe_all(
            config,
            sync.view,
            jsio.Prober(config),
            scheduled_s,
            str(getattr(controller, "cron", "") or ""),
            _clock,
        )
        wrote = await sync.flush(io) if sync.flush_due(_clock()) else False
        jobs = {**await jobs_shell.cron(self), **await ft_shell.cron(self)}
        _log(
            {
                "msg": "probe",
                "probed": [r.log() for r in results],
                "wrote_kv": wrote,
                **jobs,
                "ms": round(max(0.0, _clock() - started) * 1000, 1),
            }
        )


# dispatch.ROUTES names its handlers; each takes (call, config, the row's captured params).
_HANDLERS = {
    "preflight": Default._preflight,
    "healthz": Default._healthz,
    "status": Default._status,
    "forward": Default._forward,
    "models": Default._models,
    "page": Default._page,
    # Files + Batch API and the node API (jobs_shell.py)
    "files": jobs_shell.files_root,
    "file": jobs_shell.file_one,
    "file_content": jobs_shell.file_content,
    "batches": jobs_shell.batches_root,
    "batch": jobs_shell.batch_one,
    "batch_cancel": jobs_shell.batch_cancel,
    "jobs_unknown": jobs_shell.unknown,
    "node_lease": jobs_shell.node_lease,
    "node_input": jobs_shell.node_input,
    "node_heartbeat": jobs_shell.node_heartbeat,
    "node_results": jobs_shell.node_results,
    "node_commit": jobs_shell.node_commit,
    "node_release": jobs_shell.node_release,
    # Fine-tuning jobs and the training nodes' calls (ft_shell.py)
    "ft_jobs": ft_shell.jobs_root,
    "ft_job": ft_shell.job_one,
    "ft_cancel": ft_shell.job_cancel,
    "ft_events": ft_shell.job_events,
    "ft_checkpoints": ft_shell.job_checkpoints,
    "node_validation": ft_shell.node_file,
    "node_checkpoint": ft_shell.node_checkpoint,
    "node_events": ft_shell.node_events,
    "node_checkpoint_put": ft_shell.node_checkpoint_put,
    "node_adapter_put": ft_shell.node_adapter_put,
    "node_adapter": ft_shell.node_adapter_get,
}


def _env_str(env, key: str) -> str | None:
    value = getattr(env, key, None)
    if value is None or not isinstance(value, str):
        return None
    return value
