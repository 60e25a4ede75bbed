"""Heady gateway Worker: the imperative shell.

It turns the JS request into plain data, asks the pure modules (routing, attempt, health,
probe) what to do, performs the fetches and KV calls, and hands the node's body stream back
to the runtime untouched. Bytes never pass through Python.
"""

import asyncio
import json
import math
import time
import traceback

import js
from pyodide.ffi import create_proxy, to_js
from workers import Response, WorkerEntrypoint

import attempt as at
import health as hl
import probe as pr
import status_page
from config import CONFIG_KEYS, GatewayConfig, load_config
from errors import error_body
from headers import (
    MAX_HEADER_BYTES,
    cors_headers,
    header_bytes,
    key_matches,
    preflight_headers,
    presented_key,
    request_headers_for_node,
    request_id,
    response_header_drop,
)
from routing import (
    HEAVY_PREFIX,
    RouteError,
    make_plan,
    parse_route,
    route_table,
    split_url,
    upstream_url,
)
from version import VERSION

_NO_BODY_METHODS = frozenset({"GET", "HEAD"})
# An attempt with less time than this left before the deadline is not started: it could
# only end as a time-out.
_MIN_ATTEMPT_S = 0.1


class _Isolate:
    """What survives between requests in one isolate: config, health view, balance turn."""

    config: GatewayConfig | None = None
    view = hl.HealthView()
    turn = 0
    flushing = False
    refreshing = False


_ISO = _Isolate()


def _js_obj(d: dict):
    return to_js(d, dict_converter=js.Object.fromEntries)


def _json_response(body: str, status: int, headers: dict[str, str]) -> Response:
    h = {"content-type": "application/json", "cache-control": "no-store", **headers}
    return Response(js.Response.new(body, status=status, headers=_js_obj(h)))


class _Exchange:
    """One client request's bookkeeping for the log line and the response headers."""

    def __init__(self, rid: str, method: str, path: str, origin: str | None) -> None:
        self.rid = rid
        self.method = method
        self.path = path
        self.origin = origin
        self.started = time.time()
        self.role: str | None = None
        self.attempts: list[at.Attempt] = []
        self.status = 0
        self.error: str | None = None

    def log(self) -> None:
        line = {
            "msg": "request",
            "request_id": self.rid,
            "method": self.method,
            "route": self.path if not self.path.startswith(HEAVY_PREFIX) else HEAVY_PREFIX + "*",
            "role": self.role,
            "status": self.status,
            "ms": round((time.time() - self.started) * 1000, 1),
            "attempts": [
                {
                    "node": a.node,
                    "outcome": a.outcome,
                    "reason": a.reason,
                    "status": a.status,
                    "ms": a.ms,
                }
                for a in self.attempts
            ],
        }
        if self.error:
            line["error"] = self.error
        print(json.dumps(line, separators=(",", ":")))


class Default(WorkerEntrypoint):
    def _config(self) -> GatewayConfig:
        # Vars and secrets are fixed for an isolate's life (a change deploys new isolates),
        # so they are read and validated once, not per request.
        if _ISO.config is None:
            _ISO.config = load_config({k: _env_str(self.env, k) for k in CONFIG_KEYS})
        return _ISO.config

    def _kv(self):
        return getattr(self.env, "HEALTH_KV", None)

    async def fetch(self, request):
        js_req = getattr(request, "js_object", request)
        method = str(js_req.method)
        path, query = split_url(str(js_req.url))
        try:
            headers = js.Object.fromEntries(js_req.headers).to_py()
        except Exception:  # a runtime that cannot list the headers is still answered in JSON
            headers = {}
        ex = _Exchange(request_id(headers.get("x-request-id")), method, path, headers.get("origin"))
        try:
            response = await self._handle(js_req, method, path, query, headers, ex)
        except Exception as exc:  # the promise: never a traceback to the client
            ex.error = "".join(traceback.format_exception(exc))[-2000:]
            response = self._error(ex, 500, "internal error; see the gateway log for this id")
        ex.status = response.status
        ex.log()
        return response

    def _error(
        self,
        ex: _Exchange,
        status: int,
        message: str,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        **extra,
    ) -> Response:
        config = _ISO.config
        cors = cors_headers(ex.origin, config.cors_origins if config else ("*",))
        h = {"x-request-id": ex.rid, **cors, **(headers or {})}
        return _json_response(error_body(status, message, ex.rid, type_, **extra), status, h)

    async def _handle(self, js_req, method, path, query, headers, ex: _Exchange) -> Response:
        config = self._config()
        if header_bytes(headers) > MAX_HEADER_BYTES:
            return self._error(ex, 431, "request headers are too large")
        if method == "OPTIONS":
            h = {"x-request-id": ex.rid, **preflight_headers(ex.origin, config.cors_origins)}
            return Response(js.Response.new(None, status=204, headers=_js_obj(h)))
        if path == "/healthz" and method in ("GET", "HEAD"):
            body = json.dumps({"status": "ok", "version": VERSION})
            cors = cors_headers(ex.origin, config.cors_origins)
            return _json_response(body, 200, {"x-request-id": ex.rid, **cors})
        if path == "/api/status":
            if method not in ("GET", "HEAD"):
                return self._error(ex, 405, "use GET", headers={"allow": "GET, HEAD, OPTIONS"})
            denied = self._check_auth(config, headers, ex)
            return denied or await self._status(config, ex)
        if path.startswith(HEAVY_PREFIX) or path == HEAVY_PREFIX.rstrip("/"):
            return await self._heavy(js_req, method, path, query, headers, config, ex)
        page = status_page.serve(method, path, headers.get("if-none-match"))
        if page is not None:
            return Response(
                js.Response.new(page.body, status=page.status, headers=_js_obj(page.headers))
            )
        return self._error(
            ex, 404, "no such endpoint; use /api/heavy/<role>/..., /api/status or /healthz"
        )

    def _check_auth(self, config: GatewayConfig, headers, ex: _Exchange) -> Response | None:
        if config.auth_disabled:
            return None
        if not config.api_keys:
            return self._error(
                ex,
                503,
                "gateway not configured: set the GATEWAY_API_KEYS "
                "secret (or AUTH_DISABLED=true for local use only)",
                "not_configured",
            )
        if not key_matches(presented_key(headers), config.api_keys):
            return self._error(
                ex,
                401,
                "missing or invalid API key",
                headers={"www-authenticate": 'Bearer realm="heady"'},
            )
        return None

    # ---- the request path -------------------------------------------------------------

    async def _heavy(self, js_req, method, path, query, headers, config, ex) -> Response:
        if config.fatal:
            return self._error(
                ex, 503, "gateway misconfigured: " + "; ".join(config.fatal), "misconfigured"
            )
        denied = self._check_auth(config, headers, ex)
        if denied:
            return denied
        route = parse_route(method, path, query, config.roles)
        if isinstance(route, RouteError):
            return self._error(ex, route.status, route.message, route.type)
        ex.role = route.role

        body = None
        replay = None
        if method not in _NO_BODY_METHODS:
            declared = headers.get("content-length")
            if declared and declared.isdigit() and 0 < int(declared) <= config.max_body_bytes:
                # Stream the body to the first node as it arrives (no wait for the whole
                # upload); the runtime's tee keeps a copy in JS memory for a replay.
                replay = js_req.clone()
                body = js_req.body
            else:
                body = await self._read_body(js_req, headers, config.max_body_bytes)
                if isinstance(body, str):
                    return self._error(ex, 413, body)

        await self._refresh_health(config)
        view = _ISO.view
        now = time.time()
        plan = make_plan(config.pools[route.role], config, view, now, _ISO.turn)
        _ISO.turn += 1
        if not plan.nodes:
            return self._error(
                ex,
                503,
                f"no configured node serves role {route.role!r}",
                "no_nodes",
                headers={"retry-after": "60"},
            )

        fwd = _js_obj(request_headers_for_node(headers, config.node_token))
        role_timeout = config.timeouts.attempt_for(route.role)
        deadline = ex.started + config.timeouts.deadline_s
        for n in plan.nodes:
            remaining = deadline - time.time()
            if remaining <= _MIN_ATTEMPT_S:
                break
            if replay is not None and ex.attempts:
                # The stream went to the node that failed: replay the buffered copy from now on.
                body = await replay.arrayBuffer()
                replay = None
            url = upstream_url(config.node(n).base_url, route)
            result = await self._attempt(n, url, method, fwd, body, min(role_timeout, remaining))
            if isinstance(result, at.Attempt):
                ex.attempts.append(result)
                self._note_failure(config, n, result)
                continue
            resp, ms = result
            ex.attempts.append(at.Attempt(n, "pass", "ok", int(resp.status), ms))
            if view.get(n).state != "up":
                view.apply(n, hl.on_success(view.get(n), time.time(), ms))
            self._maybe_flush(config)
            return self._relay(resp, n, plan.is_fallback(n), ex, config)

        self._maybe_flush(config)
        now = time.time()
        ends = [view.get(n).until for n in plan.nodes if view.is_down(n, now)]
        # Rounded first: (t + 120) - t is 120.00000000000001 in floats, which ceil makes 121.
        retry = (
            max(1, math.ceil(round(min(ends) - now, 3)))
            if ends
            else int(config.health.cooldown_base_s)
        )
        return self._error(
            ex,
            503,
            f"no node could serve role {route.role!r}; tried {len(ex.attempts)}",
            "all_nodes_failed",
            headers={"retry-after": str(retry)},
            attempts=[a.public() for a in ex.attempts],
        )

    async def _read_body(self, js_req, headers, limit: int):
        """Buffer a body that is not streamed to the first node (no usable Content-Length):
        read it once into JS memory, enforcing the limit, so every attempt can send it."""
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return "invalid Content-Length"
            if int(declared) > limit:
                return f"request body exceeds the {limit} byte limit"
            return await js_req.arrayBuffer()
        stream = js_req.body
        if stream is None:
            return None
        # No length given (chunked upload): read with a running total so an endless body is
        # cut off at the limit instead of exhausting the isolate's memory.
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
                return f"request body exceeds the {limit} byte limit"
            chunks.append(chunk.value)
        joined = js.Uint8Array.new(total)
        offset = 0
        for c in chunks:
            joined.set(c, offset)
            offset += c.byteLength
        return joined.buffer

    async def _attempt(self, n, url, method, fwd, body, timeout_s):
        """One try: returns (response, ms) to relay, or the failed Attempt."""
        started = time.time()
        resp, error = await _fetch_head(
            url, timeout_s, method=method, headers=fwd, body=body, redirect="manual"
        )
        if error:
            return self._failed(n, at.classify_error(error), started, None)
        h = resp.headers
        verdict = at.classify_response(
            int(resp.status), h.get("ngrok-error-code"), h.get("retry-after"), time.time()
        )
        ms = round((time.time() - started) * 1000, 1)
        if verdict.node_failed:
            _discard(resp)  # nothing of a failed answer goes to the client
            return self._failed(n, verdict, started, int(resp.status))
        return resp, ms

    @staticmethod
    def _failed(n, verdict: at.Verdict, started: float, status: int | None) -> at.Attempt:
        ms = round((time.time() - started) * 1000, 1)
        return at.Attempt(n, "failover", verdict.reason, status, ms, verdict.retry_after_s)

    def _note_failure(self, config: GatewayConfig, n: int, a: at.Attempt) -> None:
        view = _ISO.view
        view.apply(
            n, hl.on_failure(view.get(n), time.time(), a.reason, config.health, a.retry_after_s)
        )

    def _relay(self, resp, n: int, fallback: bool, ex: _Exchange, config) -> Response:
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
        # The node's body stream is handed over as it is: SSE events flow through unbuffered.
        return Response(
            js.Response.new(
                resp.body, status=resp.status, statusText=resp.statusText, headers=_js_obj(upstream)
            )
        )

    # ---- health: isolate memory <-> KV ------------------------------------------------

    async def _refresh_health(self, config: GatewayConfig) -> None:
        view = _ISO.view
        if not view.needs_refresh(time.time(), config.health):
            return
        if view.loaded_at is None:
            await self._read_kv()  # a cold isolate routes on shared knowledge from the start
        elif not _ISO.refreshing:
            _ISO.refreshing = True
            self._background(self._read_kv())

    async def _read_kv(self) -> None:
        kv = self._kv()
        now = time.time()
        try:
            records, written_at = await _kv_snapshot(kv, now) if kv is not None else ({}, 0.0)
        except Exception as exc:  # KV trouble must not take routing down
            print(json.dumps({"msg": "kv_read_failed", "error": str(exc)[:200]}))
            records, written_at = {}, 0.0
        _ISO.view.merge(records, written_at, now)
        _ISO.refreshing = False

    def _maybe_flush(self, config: GatewayConfig) -> None:
        if _ISO.view.may_write(time.time(), config.health) and not _ISO.flushing:
            _ISO.flushing = True
            self._background(self._flush(config))

    async def _flush(self, config: GatewayConfig) -> None:
        """Read-merge-write the fleet record, skipping the write if KV already knows."""
        view = _ISO.view
        kv = self._kv()
        try:
            if kv is None:
                view.dirty = False
                return
            now = time.time()
            records, written_at = await _kv_snapshot(kv, now)
            view.dirty = any(
                not hl.covers(records.get(n), mine, config.health) for n, mine in view.nodes.items()
            )
            view.merge(records, written_at, now)
            if not view.may_write(now, config.health):
                return
            body, ttl = hl.encode(view, now)
            await kv.put(hl.KV_KEY, body, expirationTtl=ttl)
            view.written_at = now
            view.dirty = False
        except Exception as exc:  # e.g. KV's 1 write/s per key limit: stay dirty, retry later
            print(json.dumps({"msg": "kv_write_failed", "error": str(exc)[:200]}))
        finally:
            _ISO.flushing = False

    def _background(self, coro) -> None:
        self.ctx.waitUntil(create_proxy(asyncio.ensure_future(coro)))

    # ---- status and cron --------------------------------------------------------------

    async def _status(self, config: GatewayConfig, ex: _Exchange) -> Response:
        await self._refresh_health(config)
        now = time.time()
        view = _ISO.view
        nodes = []
        for node in config.nodes:
            h = view.get(node.number)
            roles = [p.role for p in config.pools.values() if node.number in p.pair]
            nodes.append(
                {
                    "node": node.number,
                    "roles": roles,
                    "config": node.config,
                    "config_reason": node.reason,
                    "state": view.effective_state(node.number, now) if node.usable else "unknown",
                    "since": _iso(h.since),
                    "until": _iso(h.until) if view.is_down(node.number, now) else None,
                    "reason": h.reason,
                    "failures": h.failures,
                    "latency_ms": h.latency_ms,
                    "load": view.load(node.number, now),
                    "checked_at": _iso(h.checked_at),
                }
            )
        body = {
            "gateway": {
                "version": VERSION,
                "request_id": ex.rid,
                "auth": "disabled" if config.auth_disabled else "on",
            },
            "nodes": nodes,
            "routes": route_table(config.pools),
            "problems": list(config.problems) + list(config.fatal),
        }
        cors = cors_headers(ex.origin, config.cors_origins)
        return _json_response(json.dumps(body), 200, {"x-request-id": ex.rid, **cors})

    async def scheduled(self, controller, env=None, ctx=None):
        """Cron: probe the nodes that need it, all in parallel, and share what changed."""
        config = self._config()
        started = time.time()
        await self._read_kv()
        view = _ISO.view
        scheduled_s = float(getattr(controller, "scheduledTime", started * 1000)) / 1000
        period = pr.cron_period_s(str(getattr(controller, "cron", "") or ""))
        targets = pr.nodes_to_probe(config, view, scheduled_s, period)
        results = await asyncio.gather(*(self._probe(config, n) for n in targets))
        now = time.time()
        report = []
        for n, (ok, reason, ms, load) in zip(targets, results, strict=True):
            old = view.get(n)
            new = (
                hl.on_success(old, now, ms)
                if ok
                else hl.on_failure(old, now, reason, config.health)
            )
            new = hl.with_probe(new, now, load, ms)
            if not view.apply(n, new) and load is not None and load != old.load:
                view.dirty = True  # a changed load steers balancing elsewhere: worth sharing
            report.append({"node": n, "ok": ok, "reason": reason, "ms": ms, "load": load})
        wrote = False
        if view.may_write(now, config.health) and not _ISO.flushing:
            _ISO.flushing = True
            await self._flush(config)
            wrote = not view.dirty
        print(
            json.dumps(
                {
                    "msg": "probe",
                    "probed": report,
                    "wrote_kv": wrote,
                    "ms": round((time.time() - started) * 1000, 1),
                }
            )
        )

    async def _probe(self, config: GatewayConfig, n: int):
        base = config.node(n).base_url
        h = {"ngrok-skip-browser-warning": "1", "accept": "application/json, text/plain"}
        if config.node_token:
            h["authorization"] = f"Bearer {config.node_token}"
        started = time.time()
        resp, failure = await self._probe_get(base + config.health.probe_path, h, config)
        if failure:
            return False, failure, None, None
        ms = round((time.time() - started) * 1000, 1)
        load = pr.parse_load(await resp.text(), resp.headers.get("content-type"))
        if load is None and config.health.metrics_path:
            mresp, mfail = await self._probe_get(base + config.health.metrics_path, h, config)
            if not mfail:
                load = pr.parse_load(await mresp.text(), mresp.headers.get("content-type"))
        return True, "ok", ms, load

    async def _probe_get(self, url, h, config):
        resp, error = await _fetch_head(
            url,
            config.health.probe_timeout_s,
            method="GET",
            headers=_js_obj(h),
            redirect="manual",
        )
        if error:
            return None, error
        verdict = at.classify_response(
            int(resp.status), resp.headers.get("ngrok-error-code"), None, time.time()
        )
        if verdict.node_failed or not 200 <= int(resp.status) < 300:
            _discard(resp)
            return None, verdict.reason if verdict.node_failed else f"http_{resp.status}"
        return resp, None


async def _kv_snapshot(kv, now: float):
    """The fleet's health record as KV has it (60 s is the shortest edge cache allowed)."""
    raw = await kv.get(hl.KV_KEY, cacheTtl=60)
    return hl.decode(None if raw is None else str(raw), now)


async def _fetch_head(url: str, timeout_s: float, **init):
    """fetch() until the response head arrives: (response, None), or (None, "timeout" |
    "refused" | "error"). The time-out covers the head only: the controller is aborted on a
    time-out and never after, so a body that then streams for longer is not cut."""
    controller = js.AbortController.new()
    try:
        resp = await asyncio.wait_for(js.fetch(url, signal=controller.signal, **init), timeout_s)
    except TimeoutError:
        controller.abort()
        return None, "timeout"
    except Exception as exc:  # workerd's network errors arrive as JsException
        return None, at.error_kind(str(exc))
    return resp, None


def _discard(resp) -> None:
    """Free the connection of an answer we will not relay."""
    if resp.body is not None:
        resp.body.cancel()


def _env_str(env, key: str) -> str | None:
    value = getattr(env, key, None)
    if value is None or not isinstance(value, str):
        return None
    return value


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
