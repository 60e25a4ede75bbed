"""One simulated GPU node: a vLLM-like OpenAI server whose failure mode can be switched live.

Run alone as a stand-in for ``vllm serve``::

    python -m sim.node [serve] [MODEL] --port P [--host H] [--node N] [--api-key K]
                       [--served-model-name M] [--model M] [...ignored vLLM flags]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sim.server import HTTPConnection, HTTPServer, Request, Response

__all__ = ["MODES", "ModeConfig", "Node", "RecordedRequest", "main", "parse_mode"]

DEFAULT_MODEL = "sim-model"
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
)
_JSON = ("content-type", "application/json")
_SSE = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as it reached a node (kept even when the node then hangs or fails it)."""

    node: int
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, value) in arrival order
    body: bytes
    arrived: float  # time.monotonic()
    wall: float  # time.time()

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
    """Validate a mode and its parameters (raises ValueError with a readable message)."""
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


def _words(text: str) -> int:
    return len(text.split())


class Node:
    """A single simulated node on one port. All methods run on the node's event loop,
    except ``set_load``/``requests``/``clear_requests`` and the read-only properties,
    which are safe from any thread."""

    def __init__(
        self,
        number: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        history: int = HISTORY,
    ) -> None:
        self.number = number
        self.model = model
        self.api_key = api_key
        self.load = 0
        self._server = HTTPServer(self._handle, host, port)
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
        }

    # -- request handling ---------------------------------------------------------------------
    def _record(self, req: Request) -> None:
        rec = RecordedRequest(
            self.number,
            req.method,
            req.path,
            req.query,
            tuple(req.headers),
            req.body,
            req.arrived,
            time.time(),
        )
        with self._log_lock:
            self._log.append(rec)
            self._total += 1

    async def _handle(self, req: Request, resp: Response) -> None:
        self._record(req)
        mode = self._mode
        name = mode.name
        if name == "healthy":
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
            data = _dumps({"error": {"message": message, "type": "sim_error", "code": status}})
            payload = data.encode()
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
            200,
            [
                ("content-type", "text/event-stream"),
                ("cache-control", "no-cache"),
                self._node_header,
            ],
        )
        for k in range(events):
            if k and interval:
                await asyncio.sleep(interval)
            await resp.write(b"data: %b\n\n" % _dumps({"i": k, "t": time.monotonic()}).encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.end()

    def _json(self, resp: Response, status: int, obj: Any) -> None:
        resp.send(status, [_JSON, self._node_header], _dumps(obj).encode())

    async def _serve(self, req: Request, resp: Response) -> None:
        """The healthy, vLLM-like behaviour."""
        path, method = req.path, req.method
        if path == "/health" and method in ("GET", "HEAD"):
            resp.send(200, [self._node_header])
            return
        if path == "/metrics" and method in ("GET", "HEAD"):
            resp.send(
                200,
                [("content-type", "text/plain; version=0.0.4; charset=utf-8"), self._node_header],
                self._metrics().encode(),
            )
            return
        if self.api_key is not None and req.header("authorization") != f"Bearer {self.api_key}":
            self._json(resp, 401, {"error": "Unauthorized"})
            return
        if method == "GET" and path == "/v1/models":
            self._json(resp, 200, self._models())
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._completion(req, resp, chat=path == "/v1/chat/completions")
        else:
            self._json(resp, 200, self._echo(req))

    def _metrics(self) -> str:
        m = f'model_name="{self.model}"'
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
        card = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": 8192,
            "permission": [],
        }
        return {"object": "list", "data": [card]}

    def _echo(self, req: Request) -> dict[str, Any]:
        body = req.body
        out: dict[str, Any] = {
            "node": self.number,
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "headers": [list(h) for h in req.headers],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        try:
            out["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_b64"] = base64.b64encode(body).decode("ascii")
        return out

    def _error(self, resp: Response, status: int, message: str, kind: str) -> None:
        # vLLM's ErrorResponse shape.
        err = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
        self._json(resp, status, err)

    async def _completion(self, req: Request, resp: Response, *, chat: bool) -> None:
        try:
            payload = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            self._error(resp, 400, "request body is not valid JSON", "BadRequestError")
            return
        if not isinstance(payload, dict):
            self._error(resp, 400, "request body must be a JSON object", "BadRequestError")
            return
        if chat:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                self._error(resp, 400, "'messages' must be a non-empty list", "BadRequestError")
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
                self._error(resp, 400, "'prompt' is required", "BadRequestError")
                return
        model = payload.get("model") or self.model
        words = f"Hello from sim node {self.number}.".split(" ")
        max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens"))
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
        self._seq += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-sim{self.number}-{self._seq}"
        created = int(time.time())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        base = {"id": rid, "created": created, "model": model, "node": self.number}
        self._running += 1
        try:
            if payload.get("stream") is True:
                options = payload.get("stream_options")
                with_usage = isinstance(options, dict) and options.get("include_usage") is True
                await self._stream(resp, base, words, finish, usage if with_usage else None, chat)
                return
            text = " ".join(words)
            if chat:
                message = {"role": "assistant", "content": text}
                choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            self._json(resp, 200, {**base, "object": obj, "choices": [choice], "usage": usage})
        finally:
            self._running -= 1

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
            200,
            [
                ("content-type", "text/event-stream"),
                ("cache-control", "no-cache"),
                self._node_header,
            ],
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

        if chat:
            await resp.write(chunk(None, None, role=True))
        for i, word in enumerate(words):
            await resp.write(chunk(word if i == 0 else " " + word, None))
        await resp.write(chunk("" if not chat else None, finish))
        if usage is not None:
            tail = {**base, "object": obj, "choices": [], "usage": usage}
            await resp.write(b"data: %b\n\n" % _dumps(tail).encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.end()


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
    model = (
        (args.served_model_name or [None])[0]
        or args.model
        or (positional[0] if positional else None)
        or DEFAULT_MODEL
    )

    async def run() -> None:
        node = Node(args.node, args.host, args.port, api_key=args.api_key, model=model)
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
