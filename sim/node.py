"""One simulated GPU node: a vLLM-like OpenAI server whose failure mode can be switched live.

Healthy, it behaves like ``vllm serve`` wherever the gateway's behaviour depends on it (each
rule cites the vLLM source it mirrors; "vLLM" below is vllm-project/vllm, 0.2x-0.3x):

- served names: ``--served-model-name a b c`` makes the engine answer to each name; a request
  whose ``model`` is none of them gets 404 ``The model `x` does not exist.`` (NotFoundError),
  a request without ``model`` is served by the first name
  (vllm/entrypoints/openai/models/serving.py ``check_model``/``show_available_models``,
  vllm/entrypoints/openai/engine/serving.py ``_check_model``/``_is_model_supported``);
- ``--api-key`` is checked only for paths starting with ``/v1``, ``/v2``, ``/inference`` or
  ``/cohere`` and never for OPTIONS; a miss is 401 ``{"error": "Unauthorized"}``
  (vllm/entrypoints/serve/utils/server_utils.py ``AuthenticationMiddleware``; the limits are
  documented in docs/usage/security.md "API Key Authentication Limitations");
- the endpoints beside ``/v1``: ``/health``, ``/ping``, ``/version``, ``/load``, ``/metrics``,
  ``/tokenize``, ``/detokenize``, ``/invocations`` (inference, unauthenticated), ``/pause``,
  ``/resume``, ``/is_paused``; with ``VLLM_SERVER_DEV_MODE=1`` also ``/sleep``, ``/wake_up``,
  ``/is_sleeping``, ``/reset_prefix_cache``, ``/reset_mm_cache``, ``/collective_rpc`` and
  ``/server_info`` (vllm/entrypoints/serve/*/api_router.py; docs/usage/security.md lists them);
- any other path is FastAPI's 404 ``{"detail":"Not Found"}``, a known path with the wrong
  method its 405 ``{"detail":"Method Not Allowed"}``;
- errors use vLLM's ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``
  (vllm/entrypoints/openai/engine/protocol.py ``ErrorInfo``);
- streams are ``text/event-stream; charset=utf-8`` and end with ``data: [DONE]``.

Run alone as a stand-in for ``vllm serve``::

    python -m sim.node [serve] [MODEL] --port P [--host H] [--node N] [--api-key K]
                       [--served-model-name A [B ...]] [--model M] [...ignored vLLM flags]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sim.server import HTTPConnection, HTTPServer, Request, Response

__all__ = [
    "DEFAULT_MODEL",
    "MODES",
    "VLLM_VERSION",
    "ModeConfig",
    "Node",
    "RecordedRequest",
    "main",
    "parse_mode",
]

DEFAULT_MODEL = "sim-org/Sim-Model-1B-Instruct"
VLLM_VERSION = "0.33.0"  # what /version reports: the vLLM release this simulator follows
MAX_MODEL_LEN = 8192
HISTORY = 1000
MODES = (
    "healthy",
    "refuse",
    "hang",
    "slow_headers",
    "status",
    "ngrok_offline",
    "cf_tunnel_down",
    "sse",
    "stream_reset",
    "stream_eof",
    "body_cut",
    "chunked_json",
)
# vLLM's AuthenticationMiddleware guards exactly these prefixes (str.startswith, so "/v1x" too).
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")
# How long a dying node lingers after its last byte before the RST: long enough for the peer
# to have read what was sent (an RST can make the peer's kernel drop unread data).
_RST_GRACE_S = 0.05
_JSON = ("content-type", "application/json")
_SSE_TYPE = "text/event-stream; charset=utf-8"
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(slots=True)
class RecordedRequest:
    """A request as it reached a node, recorded as soon as its head arrived (so also when the
    node then hangs or fails it, or the body never completes).

    ``closed`` is when the connection that carried it closed (``time.monotonic()``; None while
    open): after a client gives up, it shows how promptly the gateway let go of the node.
    ``declared``/``received``/``complete`` say whether the body arrived whole."""

    node: int
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, value) in arrival order
    body: bytes  # the whole body once complete; b"" before
    arrived: float  # time.monotonic() when the head was parsed
    wall: float  # time.time()
    declared: int | None = 0  # Content-Length; None for a chunked body
    received: int = 0  # body bytes that arrived (set when the body completes or the conn closes)
    complete: bool = False  # the whole body arrived
    closed: float | None = None  # time.monotonic() when the connection closed

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    def json(self) -> Any:
        return json.loads(self.body)

    def to_dict(self, text_limit: int = 4096) -> dict[str, Any]:
        """JSON-friendly summary: body as sha256 + length, plus its text when small."""
        text: str | None = None
        if len(self.body) <= text_limit:
            try:
                text = self.body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        return {
            "node": self.node,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(h) for h in self.headers],
            "body_len": len(self.body),
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "body": text,
            "arrived": self.arrived,
            "wall": self.wall,
            "declared": self.declared,
            "received": self.received,
            "complete": self.complete,
            "closed": self.closed,
        }


@dataclass(frozen=True, slots=True)
class ModeConfig:
    name: str
    params: Mapping[str, Any]


def _number(name: str, value: Any, *, integer: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (integer and value != int(value)):
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _header_text(value: Any, what: str) -> str:
    text = str(value)
    if "\r" in text or "\n" in text or (what == "name" and (not text or ":" in text)):
        raise ValueError(f"invalid header {what}: {text!r}")
    return text


def parse_mode(mode: str, params: Mapping[str, Any] | None = None) -> ModeConfig:
    """Validate a mode and its parameters (raises ValueError with a readable message).

    Streaming failures (what a node that dies mid-answer looks like):

    - ``stream_reset`` (``after`` events, ``interval`` s between them): a streamed completion
      sends ``after`` SSE events, then the connection is reset (TCP RST), as when the engine
      process or the runtime dies;
    - ``stream_eof`` (``after``, ``interval``): ``after`` events, then a clean end of the
      chunked body without ``data: [DONE]``, as ``transformers serve`` ends every stream;
    - ``body_cut`` (``size`` bytes, ``chunked``): a non-streamed JSON answer of ``size``
      bytes is cut half-way (Content-Length promises all of it, then RST); with ``chunked``
      the answer has no Content-Length (chunked framing, as a proxy that re-chunks sends it)
      and the RST comes before the last chunk;
    - ``chunked_json``: healthy, but non-streamed answers come whole with chunked framing and
      no Content-Length (what a proxy that re-chunks passes on).

    Anything else the node serves (health, metrics, ...) stays healthy in these modes, so the
    gateway's probes still pass: only answers in flight fail.
    """
    params = dict(params or {})
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    out: dict[str, Any] = {}
    if mode == "slow_headers":
        out["delay"] = _number("delay", params.pop("delay", 1.0))
    elif mode == "status":
        status = params.pop("status", 503)
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"status must be an integer in 200..599, got {status!r}")
        headers = params.pop("headers", None) or {}
        if not isinstance(headers, Mapping):
            raise ValueError("headers must be an object of name -> value")
        out["status"] = status
        out["headers"] = {
            _header_text(k, "name"): _header_text(v, "value") for k, v in headers.items()
        }
        body = params.pop("body", None)
        if body is not None and not isinstance(body, str | bytes | dict | list):
            raise ValueError("body must be a string, bytes or JSON value")
        out["body"] = body
    elif mode == "sse":
        out["events"] = int(_number("events", params.pop("events", 200), integer=True))
        out["interval"] = _number("interval", params.pop("interval", 0.01))
    elif mode in ("stream_reset", "stream_eof"):
        out["after"] = int(_number("after", params.pop("after", 2), integer=True))
        out["interval"] = _number("interval", params.pop("interval", 0.0))
    elif mode == "body_cut":
        size = int(_number("size", params.pop("size", 256 * 1024), integer=True))
        if size < 1024:
            raise ValueError(f"size must be at least 1024 bytes, got {size}")
        out["size"] = size
        chunked = params.pop("chunked", False)
        if not isinstance(chunked, bool):
            raise ValueError(f"chunked must be true or false, got {chunked!r}")
        out["chunked"] = chunked
    if params:
        raise ValueError(f"mode {mode!r} takes no parameter(s) {', '.join(sorted(params))}")
    return ModeConfig(mode, out)


_HEALTHY = ModeConfig("healthy", {})

_NGROK_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ngrok - Endpoint offline</title></head>
<body><div class="error">
<h1>The endpoint sim-node-{n}.ngrok-free.app is offline.</h1>
<p>ERR_NGROK_3200</p>
<p>The endpoint is offline: the agent serving it is not connected to ngrok.</p>
</div></body></html>
"""

_CF_HTML = """<!DOCTYPE html>
<html><head><title>Cloudflare Tunnel error | sim-node-{n}.example.com | Cloudflare</title></head>
<body><h1>Error 1033</h1><p>Cloudflare Tunnel error</p>
<p>error code: 1033</p><p>Cloudflare Ray ID: {ray}</p></body></html>
"""

# path -> allowed methods. FastAPI answers 405 for a known path with another method (its
# APIRoute adds no implicit HEAD) and 404 for an unknown path.
_ROUTES: dict[str, tuple[str, ...]] = {
    "/health": ("GET",),
    "/ping": ("GET", "POST"),  # SageMaker's health check
    "/version": ("GET",),
    "/load": ("GET",),
    "/tokenize": ("POST",),
    "/detokenize": ("POST",),
    "/invocations": ("POST",),  # SageMaker: the same inference as /v1, without the API key
    "/pause": ("POST",),
    "/resume": ("POST",),
    "/is_paused": ("GET",),
    "/v1/models": ("GET",),
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
}
# Only with VLLM_SERVER_DEV_MODE=1 (vllm/entrypoints/serve/sleep/api_router.py and siblings
# attach their routers only then).
_DEV_ROUTES: dict[str, tuple[str, ...]] = {
    "/sleep": ("POST",),
    "/wake_up": ("POST",),
    "/is_sleeping": ("GET",),
    "/reset_prefix_cache": ("POST",),
    "/reset_mm_cache": ("POST",),
    "/collective_rpc": ("POST",),
    "/server_info": ("GET",),
}


def _words(text: str) -> int:
    return len(text.split())


def _bearer_ok(header: str | None, key: str) -> bool:
    # vLLM: scheme, _, param = value.partition(" "); scheme.lower() == "bearer"; param == key
    if not header:
        return False
    scheme, _, param = header.partition(" ")
    return scheme.lower() == "bearer" and param == key


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    """vLLM's ErrorResponse (vllm/entrypoints/openai/engine/protocol.py ErrorInfo)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Node:
    """A single simulated node on one port. All methods run on the node's event loop,
    except ``set_load``/``set_served_names``/``requests``/``clear_requests`` and the read-only
    properties, which are safe from any thread.

    ``model`` is the checkpoint path (the ``root`` of every model card); ``served_names`` the
    names the engine answers to (vLLM's ``--served-model-name``; default: ``model``)."""

    def __init__(
        self,
        number: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        served_names: Sequence[str] | None = None,
        dev_mode: bool = False,
        history: int = HISTORY,
    ) -> None:
        self.number = number
        self.model = model
        self.served_names = _names(served_names or (model,))
        self.api_key = api_key
        self.dev_mode = dev_mode
        self.load = 0
        self.paused = False
        self.sleeping = False
        self._resumed: asyncio.Event | None = None
        self._server = HTTPServer(
            self._handle, host, port, on_head=self._record, on_close=self._closed
        )
        self._mode = _HEALTHY
        self._log: deque[RecordedRequest] = deque(maxlen=history)
        self._log_lock = threading.Lock()
        self._total = 0
        self._running = 0  # in-flight completions, reported as vllm:num_requests_running
        self._seq = 0
        self._hung: set[HTTPConnection] = set()
        self._node_header = ("x-sim-node", str(number))
        self._started = False

    # -- properties ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode.name

    @property
    def mode_params(self) -> dict[str, Any]:
        return dict(self._mode.params)

    @property
    def request_count(self) -> int:
        """Requests received since the last clear (not bounded by the history size)."""
        return self._total

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        self._resumed = asyncio.Event()
        self._resumed.set()
        if self._mode.name != "refuse":
            await self._server.start()

    async def stop(self) -> None:
        self._started = False
        await self._server.stop()
        self._hung.clear()

    async def set_mode(self, mode: str, /, **params: Any) -> None:
        """Switch behaviour; returns once the change is in effect (port closed/re-bound)."""
        config = parse_mode(mode, params)
        old = self._mode
        if config.name == "refuse":
            self._mode = config
            # A dead node also kills its keep-alive connections, else pooled clients never notice.
            self._server.close_listener()
            self._server.abort_connections()
        else:
            if self._started and not self._server.listening:
                await self._server.start()  # same port again (SO_REUSEADDR)
            self._mode = config
        if old.name == "hang" and config.name != "hang":
            hung, self._hung = self._hung, set()
            for conn in hung:
                conn.abort()

    def set_load(self, load: int) -> None:
        self.load = int(_number("load", load, integer=True))

    def set_served_names(self, names: Sequence[str] | None) -> None:
        """Answer to these model names from now on (None: the checkpoint path only)."""
        self.served_names = _names(names or (self.model,))

    def requests(self) -> list[RecordedRequest]:
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()
            self._total = 0

    async def reset(self) -> None:
        await self.set_mode("healthy")
        self.load = 0
        self._set_paused(False)
        self.sleeping = False
        self.clear_requests()

    def state(self) -> dict[str, Any]:
        return {
            "node": self.number,
            "url": self.url,
            "mode": self.mode,
            "params": self.mode_params,
            "load": self.load,
            "requests": self.request_count,
            "api_key": self.api_key is not None,
            "model": self.model,
            "served_names": list(self.served_names),
            "dev_mode": self.dev_mode,
            "paused": self.paused,
        }

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self._resumed is not None:
            if paused:
                self._resumed.clear()
            else:
                self._resumed.set()

    # -- bookkeeping (server hooks, loop thread) ----------------------------------------------
    def _record(self, req: Request) -> None:
        rec = RecordedRequest(
            self.number,
            req.method,
            req.path,
            req.query,
            tuple(req.headers),
            b"",
            req.arrived,
            time.time(),
            req.declared,
        )
        req.meta = rec
        with self._log_lock:
            self._log.append(rec)
            self._total += 1

    def _closed(self, reqs: list[Request]) -> None:
        now = time.monotonic()
        for req in reqs:
            rec = req.meta
            if isinstance(rec, RecordedRequest):
                rec.received = req.received
                rec.closed = now

    # -- request handling ---------------------------------------------------------------------
    async def _handle(self, req: Request, resp: Response) -> None:
        rec = req.meta
        if isinstance(rec, RecordedRequest):
            rec.body, rec.received, rec.complete = req.body, req.received, True
        mode = self._mode
        name = mode.name
        if name in ("healthy", "stream_reset", "stream_eof", "body_cut", "chunked_json"):
            await self._serve(req, resp)
        elif name == "slow_headers":
            await asyncio.sleep(mode.params["delay"])
            await self._serve(req, resp)
        elif name == "hang":
            conn = resp.connection
            self._hung.add(conn)
            try:
                await asyncio.get_running_loop().create_future()  # until aborted/cancelled
            finally:
                self._hung.discard(conn)
        elif name == "status":
            self._send_status(resp, mode.params)
        elif name == "ngrok_offline":
            trace = os.urandom(16).hex()
            resp.send(
                404,
                [
                    ("content-type", "text/html"),
                    ("ngrok-error-code", "ERR_NGROK_3200"),
                    ("ngrok-trace-id", trace),
                    self._node_header,
                ],
                _NGROK_HTML.format(n=self.number).encode(),
            )
        elif name == "cf_tunnel_down":
            ray = os.urandom(8).hex() + "-SJC"
            resp.send(
                530,
                [
                    ("content-type", "text/html"),
                    ("server", "cloudflare"),
                    ("cf-ray", ray),
                    self._node_header,
                ],
                _CF_HTML.format(n=self.number, ray=ray).encode(),
            )
        elif name == "sse":
            await self._sse(resp, mode.params["events"], mode.params["interval"])
        else:  # "refuse": a request raced the listener closing; behave like a dead origin
            resp.connection.abort()

    def _send_status(self, resp: Response, params: Mapping[str, Any]) -> None:
        status: int = params["status"]
        extra: dict[str, str] = params["headers"]
        body = params["body"]
        ctype = "application/json"
        if body is None:
            message = f"simulated HTTP {status} from sim node {self.number}"
            payload = _dumps(error_body(message, "sim_error", status)).encode()
        elif isinstance(body, bytes):
            payload, ctype = body, "application/octet-stream"
        elif isinstance(body, str):
            payload, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            payload = _dumps(body).encode()
        headers = [(k, v) for k, v in extra.items()]
        if not any(k.lower() == "content-type" for k in extra):
            headers.append(("content-type", ctype))
        headers.append(self._node_header)
        resp.send(status, headers, payload)

    async def _sse(self, resp: Response, events: int, interval: float) -> None:
        resp.start(
            200, [("content-type", _SSE_TYPE), ("cache-control", "no-cache"), self._node_header]
        )
        for k in range(events):
            if k and interval:
                await asyncio.sleep(interval)
            await resp.write(b"data: %b\n\n" % _dumps({"i": k, "t": time.monotonic()}).encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.end()

    def _json(self, resp: Response, status: int, obj: Any) -> None:
        resp.send(status, [_JSON, self._node_header], _dumps(obj).encode())

    def _error(
        self, resp: Response, status: int, message: str, kind: str, param: str | None = None
    ) -> None:
        self._json(resp, status, error_body(message, kind, status, param))

    def _detail(
        self, resp: Response, status: int, detail: str, extra: Sequence[tuple[str, str]] = ()
    ) -> None:
        # Starlette/FastAPI's own answers (unknown route, wrong method): {"detail": ...}
        resp.send(status, [_JSON, *extra, self._node_header], _dumps({"detail": detail}).encode())

    def _empty(self, resp: Response) -> None:
        resp.send(200, [self._node_header])

    async def _serve(self, req: Request, resp: Response) -> None:
        """The healthy, vLLM-like behaviour (middleware, then routing)."""
        path, method = req.path, req.method
        if (
            method == "OPTIONS"
            and req.header("origin")
            and req.header("access-control-request-method")
        ):
            # vLLM installs CORSMiddleware (allow_origins ["*"] by default): it answers a
            # preflight itself, before authentication (which skips OPTIONS anyway).
            headers = [
                ("access-control-allow-origin", "*"),
                ("access-control-allow-methods", "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
                ("access-control-max-age", "600"),
                ("vary", "Origin"),
                ("content-type", "text/plain; charset=utf-8"),
                self._node_header,
            ]
            resp.send(200, headers, b"OK")
            return
        if (
            self.api_key is not None
            and method != "OPTIONS"
            and path.startswith(GUARDED_PREFIX)
            and not _bearer_ok(req.header("authorization"), self.api_key)
        ):
            self._json(resp, 401, {"error": "Unauthorized"})
            return
        if path == "/metrics" or path.startswith("/metrics/"):
            # A mounted prometheus ASGI app: it answers any method.
            resp.send(
                200,
                [("content-type", "text/plain; version=0.0.4; charset=utf-8"), self._node_header],
                self._metrics().encode(),
            )
            return
        methods = _ROUTES.get(path) or (_DEV_ROUTES.get(path) if self.dev_mode else None)
        if methods is None:
            self._detail(resp, 404, "Not Found")
            return
        if method not in methods:
            self._detail(resp, 405, "Method Not Allowed", [("allow", ", ".join(methods))])
            return
        await self._route(req, resp, path)

    async def _route(self, req: Request, resp: Response, path: str) -> None:
        if path in ("/health", "/ping"):
            self._empty(resp)
        elif path == "/version":
            self._json(resp, 200, {"version": VLLM_VERSION})
        elif path == "/load":
            self._json(resp, 200, {"server_load": self._running})
        elif path == "/v1/models":
            self._json(resp, 200, self._models())
        elif path in ("/v1/chat/completions", "/v1/completions"):
            payload = self._payload(req, resp, json_only=True)
            if payload is not None:
                await self._completion(payload, resp, chat=path == "/v1/chat/completions")
        elif path == "/invocations":  # parses the body itself, whatever its content-type
            payload = self._payload(req, resp)
            if payload is not None:
                await self._invocations(payload, resp)
        elif path == "/tokenize":
            self._tokenize(req, resp)
        elif path == "/detokenize":
            self._detokenize(req, resp)
        elif path == "/pause":
            self._set_paused(True)
            self._json(resp, 200, {"status": "paused"})
        elif path == "/resume":
            self._set_paused(False)
            self._json(resp, 200, {"status": "resumed"})
        elif path == "/is_paused":
            self._json(resp, 200, {"is_paused": self.paused})
        elif path == "/sleep":
            self.sleeping = True
            self._empty(resp)
        elif path == "/wake_up":
            self.sleeping = False
            self._empty(resp)
        elif path == "/is_sleeping":
            self._json(resp, 200, {"is_sleeping": self.sleeping})
        elif path in ("/reset_prefix_cache", "/reset_mm_cache"):
            self._empty(resp)
        elif path == "/collective_rpc":
            self._json(resp, 200, {"results": [None]})
        else:  # /server_info
            self._json(
                resp, 200, {"vllm_config": f"model={self.model!r}, served={self.served_names}"}
            )

    def _metrics(self) -> str:
        m = f'model_name="{self.served_names[0]}"'
        return (
            "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{m}}} {float(self._running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{m}}} {float(self.load)}\n"
            "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f"vllm:gpu_cache_usage_perc{{{m}}} {min(self.load, 100) / 100}\n"
            "# HELP sim_node_requests_total Requests received by this simulated node.\n"
            "# TYPE sim_node_requests_total counter\n"
            f'sim_node_requests_total{{node="{self.number}"}} {float(self._total)}\n'
        )

    def _models(self) -> dict[str, Any]:
        # One card per served name, root = the checkpoint
        # (OpenAIModelRegistry.show_available_models).
        created = int(time.time())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": self.model,
                "parent": None,
                "max_model_len": MAX_MODEL_LEN,
                "permission": [
                    {
                        "id": f"modelperm-sim{self.number}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.served_names
        ]
        return {"object": "list", "data": cards}

    def _invalid(self, resp: Response, error: object, param: str | None = None) -> None:
        """FastAPI's RequestValidationError as vLLM answers it: 400, type "Bad Request", the
        errors listed in the message (server_utils.validation_exception_handler)."""
        self._error(resp, 400, f"1 validation error:\n  {error}", "Bad Request", param)

    def _missing(self, resp: Response, field: str) -> None:
        loc = ("body", field)
        error = {"type": "missing", "loc": loc, "msg": "Field required"}
        self._invalid(resp, error, ".".join(loc))

    def _payload(
        self, req: Request, resp: Response, *, json_only: bool = False
    ) -> dict[str, Any] | None:
        if json_only:
            # vLLM's validate_json_request dependency (vllm/entrypoints/utils.py): the media
            # type must be application/json, e.g. `curl -d` without -H is refused.
            media = (req.header("content-type") or "").lower().split(";", 1)[0].strip()
            if media != "application/json":
                self._invalid(resp, "Unsupported Media Type: Only 'application/json' is allowed")
                return None
        try:
            payload = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            loc = ("body", 0)
            self._invalid(
                resp, {"type": "json_invalid", "loc": loc, "msg": "JSON decode error"}, "body.0"
            )
            return None
        if not isinstance(payload, dict):
            error = {
                "type": "model_attributes_type",
                "loc": ("body",),
                "msg": "Input should be a valid dictionary",
            }
            self._invalid(resp, error, "body")
            return None
        return payload

    def _model_error(self, payload: Mapping[str, Any], resp: Response) -> str | None:
        """The name the answer reports, or None after answering vLLM's 404 for an unknown one."""
        model = payload.get("model")
        if not model:  # absent/empty/null: served by the first name (_is_model_supported)
            return self.served_names[0]
        if not isinstance(model, str) or model not in self.served_names:
            self._error(resp, 404, f"The model `{model}` does not exist.", "NotFoundError", "model")
            return None
        return model

    def _tokenize(self, req: Request, resp: Response) -> None:
        payload = self._payload(req, resp, json_only=True)
        if payload is None:
            return
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            messages = payload.get("messages")
            if not isinstance(messages, list):
                self._missing(resp, "prompt")
                return
            prompt = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        if self._model_error(payload, resp) is None:
            return
        tokens = list(prompt.encode("utf-8"))  # one token per byte: invertible, like a tokenizer
        self._json(
            resp,
            200,
            {
                "count": len(tokens),
                "max_model_len": MAX_MODEL_LEN,
                "tokens": tokens,
                "token_strs": None,
            },
        )

    def _detokenize(self, req: Request, resp: Response) -> None:
        payload = self._payload(req, resp, json_only=True)
        if payload is None:
            return
        tokens = payload.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and 0 <= t < 256 for t in tokens
        ):
            self._missing(resp, "tokens")
            return
        if self._model_error(payload, resp) is None:
            return
        self._json(resp, 200, {"prompt": bytes(tokens).decode("utf-8", "replace")})

    async def _invocations(self, payload: dict[str, Any], resp: Response) -> None:
        # vLLM picks the handler by the body's shape (api_server.py `invocations`).
        if "messages" in payload:
            await self._completion(payload, resp, chat=True)
        elif "prompt" in payload:
            await self._completion(payload, resp, chat=False)
        else:
            self._error(
                resp,
                400,
                "Cannot find suitable handler for request. Expected one of: "
                "ChatCompletionRequest, CompletionRequest",
                "BadRequestError",
            )

    async def _completion(self, payload: dict[str, Any], resp: Response, *, chat: bool) -> None:
        # The body is validated (pydantic, before the handler) ahead of the model check.
        if chat:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                self._missing(resp, "messages")
                return
            prompt_tokens = sum(
                _words(m.get("content")) if isinstance(m.get("content"), str) else 1
                for m in messages
                if isinstance(m, dict)
            )
        else:
            prompt = payload.get("prompt")
            if isinstance(prompt, str):
                prompt_tokens = _words(prompt)
            elif isinstance(prompt, list) and prompt:
                prompt_tokens = sum(_words(p) if isinstance(p, str) else 1 for p in prompt)
            else:
                self._missing(resp, "prompt")
                return
        model = self._model_error(payload, resp)
        if model is None:
            return
        if self._resumed is not None and not self._resumed.is_set():
            await self._resumed.wait()  # a paused engine holds new requests until /resume
        mode = self._mode
        words = f"Hello from sim node {self.number}.".split(" ")
        if mode.name in ("stream_reset", "stream_eof"):
            # A long answer, so the cut comes before its natural end.
            words += [f"w{i}" for i in range(mode.params["after"] + 4)]
        max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens"))
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
        self._seq += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-sim{self.number}-{self._seq}"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        base = {"id": rid, "created": int(time.time()), "model": model, "node": self.number}
        self._running += 1
        try:
            if payload.get("stream") is True:
                options = payload.get("stream_options")
                with_usage = isinstance(options, dict) and options.get("include_usage") is True
                await self._stream(resp, base, words, finish, usage if with_usage else None, chat)
                return
            text = " ".join(words)
            if mode.name == "body_cut":
                text += " " + "x" * mode.params["size"]  # a large answer, to be cut half-way
            if chat:
                message = {"role": "assistant", "content": text}
                choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            body = _dumps({**base, "object": obj, "choices": [choice], "usage": usage}).encode()
            if mode.name == "body_cut":
                await self._cut_body(resp, body, mode.params.get("chunked", False))
            elif mode.name == "chunked_json":
                resp.start(200, [_JSON, self._node_header])
                await resp.write(body[: len(body) // 2])
                await resp.write(body[len(body) // 2 :])
                await resp.end()
            else:
                resp.send(200, [_JSON, self._node_header], body)
        finally:
            self._running -= 1

    async def _die(self, resp: Response) -> None:
        """Let what was written reach the peer, then reset the connection (a dead node)."""
        conn = resp.connection
        while conn.write_buffer_size and not conn.closed:
            await asyncio.sleep(0.005)
        await asyncio.sleep(_RST_GRACE_S)
        conn.reset()

    async def _cut_body(self, resp: Response, body: bytes, chunked: bool) -> None:
        # Content-Length (or, chunked, the framing) promises the whole body; half of it
        # arrives, then the node dies.
        if chunked:
            resp.start(200, [_JSON, self._node_header])
        else:
            resp.start_fixed(200, [_JSON, self._node_header], len(body))
        await resp.write(body[: len(body) // 2])
        await self._die(resp)

    async def _stream(
        self,
        resp: Response,
        base: dict[str, Any],
        words: list[str],
        finish: str,
        usage: dict[str, int] | None,
        chat: bool,
    ) -> None:
        resp.start(
            200, [("content-type", _SSE_TYPE), ("cache-control", "no-cache"), self._node_header]
        )
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, reason: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if piece is not None:
                    delta["content"] = piece
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece or ""}
            choice["logprobs"] = None
            choice["finish_reason"] = reason
            data = {**base, "object": obj, "choices": [choice]}
            return b"data: %b\n\n" % _dumps(data).encode()

        events: list[bytes] = [chunk(None, None, role=True)] if chat else []
        events += [chunk(w if i == 0 else " " + w, None) for i, w in enumerate(words)]
        events.append(chunk("" if not chat else None, finish))
        if usage is not None:
            tail = {**base, "object": obj, "choices": [], "usage": usage}
            events.append(b"data: %b\n\n" % _dumps(tail).encode())
        mode = self._mode
        cut = mode.params["after"] if mode.name in ("stream_reset", "stream_eof") else None
        interval = mode.params.get("interval", 0.0) if cut is not None else 0.0
        for i, event in enumerate(events):
            if i == cut:
                break
            if i and interval:
                await asyncio.sleep(interval)
            await resp.write(event)
        else:
            await resp.write(b"data: [DONE]\n\n")
            await resp.end()
            return
        if mode.name == "stream_reset":
            await self._die(resp)
        else:  # stream_eof: a clean end of the chunked body, no [DONE]
            await resp.end()


def _names(names: Sequence[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(names))
    if not out or not all(isinstance(n, str) and n for n in out):
        raise ValueError(f"served names must be non-empty strings, got {names!r}")
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sim.node",
        description="One simulated vLLM node; unknown vLLM flags are accepted and ignored.",
    )
    parser.add_argument("positional", nargs="*", help="[serve] [MODEL], as with `vllm serve`")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--node", type=int, default=1, help="node number reported in answers")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--model", default=None)
    args, _unknown = parser.parse_known_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    positional = list(args.positional)
    if positional and positional[0] == "serve":
        positional.pop(0)
    model = args.model or (positional[0] if positional else None) or DEFAULT_MODEL
    # vLLM reads VLLM_API_KEY when --api-key is absent, and VLLM_SERVER_DEV_MODE=1 adds routes.
    api_key = args.api_key or os.environ.get("VLLM_API_KEY") or None
    dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE", "0") not in ("", "0")

    async def run() -> None:
        node = Node(
            args.node,
            args.host,
            args.port,
            api_key=api_key,
            model=model,
            served_names=args.served_model_name,
            dev_mode=dev_mode,
        )
        await node.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Same wording as vLLM/uvicorn so launchers waiting for this line work unchanged.
        print(
            f"INFO:     Uvicorn running on http://{args.host}:{node.port} (Press CTRL+C to quit)",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        await node.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
