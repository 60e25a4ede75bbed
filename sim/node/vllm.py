"""The vLLM OpenAI server a healthy node imitates: middleware, routes, answers, metrics.

``VllmApi`` is the request-handling half of ``sim.node.Node``: it reads the node's state
(names, key, mode, counters) and writes vLLM's answers. Each rule cites the vLLM source it
mirrors (vllm-project/vllm, 0.2x-0.3x).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from heady_shared import capabilities as caps
from sim.node import faults
from sim.node.capacity import Scheduler
from sim.node.images import ImageSim
from sim.node.lora import LoraRegistry
from sim.node.modes import ModeConfig
from sim.node.wire import JSON, SSE_TYPE, dumps, error_body
from sim.server import Request, Response

__all__ = ["GUARDED_PREFIX", "MAX_MODEL_LEN", "VLLM_VERSION", "VllmApi"]

VLLM_VERSION = "0.33.0"  # what /version reports: the vLLM release this simulator follows
MAX_MODEL_LEN = 8192
# vLLM's AuthenticationMiddleware guards exactly these prefixes (str.startswith, so "/v1x" too).
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")

# path -> allowed methods. FastAPI answers 405 for a known path with another method (its
# APIRoute adds no implicit HEAD) and 404 for an unknown path.
ROUTES: dict[str, tuple[str, ...]] = {
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
# Served through the node guard when the node runs the image engine (sim.node.images); without
# one the guard hands them to vLLM, which has no such route (404).
IMAGE_ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/images/generations": ("POST",),
    "/v1/images/edits": ("POST",),
}
# Only with VLLM_SERVER_DEV_MODE=1 (vllm/entrypoints/serve/sleep/api_router.py and siblings
# attach their routers only then).
_DEVROUTES: dict[str, tuple[str, ...]] = {
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


def _has_image_part(messages: object) -> bool:
    """An OpenAI `image_url` content part in any message (ChatCompletionContentPartImageParam)."""
    if not isinstance(messages, list):
        return False
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") == "image_url" for p in content
        ):
            return True
    return False


class VllmApi:
    """vLLM's HTTP behaviour for a healthy node; ``sim.node.Node`` supplies the state."""

    number: int
    model: str
    served_names: tuple[str, ...]
    loras: LoraRegistry | None  # None: vLLM without --enable-lora
    api_key: str | None
    dev_mode: bool
    load: int
    paused: bool
    sleeping: bool
    _resumed: asyncio.Event | None
    _mode: ModeConfig
    _total: int
    _scheduler: Scheduler
    _seq: int
    _node_header: tuple[str, str]
    capabilities: tuple[str, ...]  # what vLLM serves (chat, image_input); the guard reports it
    images: ImageSim | None  # the image engine next to vLLM, if any

    def _set_paused(self, paused: bool) -> None:
        raise NotImplementedError  # Node's: it owns the event that holds paused requests

    def _json(self, resp: Response, status: int, obj: Any) -> None:
        resp.send(status, [JSON, self._node_header], dumps(obj).encode())

    def _error(
        self, resp: Response, status: int, message: str, kind: str, param: str | None = None
    ) -> None:
        self._json(resp, status, error_body(message, kind, status, param))

    def _detail(
        self, resp: Response, status: int, detail: str, extra: Sequence[tuple[str, str]] = ()
    ) -> None:
        # Starlette/FastAPI's own answers (unknown route, wrong method): {"detail": ...}
        resp.send(status, [JSON, *extra, self._node_header], dumps({"detail": detail}).encode())

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
        methods = (
            ROUTES.get(path)
            or (_DEVROUTES.get(path) if self.dev_mode else None)
            or (IMAGE_ROUTES.get(path) if self.images is not None else None)
        )
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
            # vLLM's load_aware_call counts every request inside a handler, queued or running.
            sched = self._scheduler
            self._json(resp, 200, {"server_load": sched.running + sched.waiting})
        elif path == "/v1/models":
            self._json(resp, 200, self._models())
        elif path in IMAGE_ROUTES:
            await self._image(req, resp, edit=path == "/v1/images/edits")
        elif path in ("/v1/chat/completions", "/v1/completions"):
            payload = self._payload(req, resp, json_only=True)
            if payload is not None:
                await self._completion(payload, resp, chat=path == "/v1/chat/completions")
        elif path == "/invocations":  # parses the body itself, whatever its content-type
            payload = self._payload(req, resp)
            if payload is not None:
                await self._invocations(payload, resp)
        elif path == "/tokenize":
            await self._tokenize(req, resp)
        elif path == "/detokenize":
            await self._detokenize(req, resp)
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

    async def _image(self, req: Request, resp: Response, *, edit: bool) -> None:
        assert self.images is not None
        job = self.images.job(req.header("content-type"), req.body, self.served_names, edit)
        if not hasattr(job, "prompt"):  # an ApiError
            self._json(resp, job.status, job.body())  # type: ignore[union-attr]
            return
        status, out = await self.images.run(job)  # type: ignore[arg-type]
        if status == 429:
            headers = [JSON, ("retry-after", str(out["retry_after"])), self._node_header]
            resp.send(429, headers, dumps(out["body"]).encode())
            return
        self._json(resp, status, out["body"])

    def _metrics(self) -> str:
        m = f'model_name="{self.served_names[0]}"'
        # `load` stands for requests queued by clients the simulator does not see (set by tests).
        waiting = self.load + self._scheduler.waiting
        return (
            "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{m}}} {float(self._scheduler.running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{m}}} {float(waiting)}\n"
            "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f"vllm:gpu_cache_usage_perc{{{m}}} {min(self.load, 100) / 100}\n"
            "# HELP sim_node_requests_total Requests received by this simulated node.\n"
            "# TYPE sim_node_requests_total counter\n"
            f'sim_node_requests_total{{node="{self.number}"}} {float(self._total)}\n'
            # What the node guard appends on a Heady node (heady_node.guard): its capabilities,
            # then the image engine's queue gauges and its own capability line.
            + caps.exposition(self.capabilities)
            + (self.images.metrics() if self.images is not None else "")
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
        # Loaded adapters after the bases, parent = the first served name; vLLM's ModelCard
        # defaults: no max_model_len (show_available_models).
        for name, root, parent in self.loras.cards(self.served_names[0]) if self.loras else ():
            card = {**cards[0], "id": name, "root": root, "parent": parent, "max_model_len": None}
            cards.append(card)
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

    async def _model_error(self, payload: Mapping[str, Any], resp: Response) -> str | None:
        """The name the answer reports, or None after answering vLLM's refusal: a base name,
        a loaded LoRA adapter or one a resolver finds (sim.node.lora), else 404."""
        model = payload.get("model")
        if not model:  # absent/empty/null: served by the first name (_is_model_supported)
            return self.served_names[0]
        if isinstance(model, str) and model in self.served_names:
            return model
        if isinstance(model, str) and self.loras is not None:
            refusal = await self.loras.check(model)
            if refusal is None:
                return model  # vLLM echoes the adapter's name
            self._error(resp, refusal.status, refusal.message, refusal.kind, refusal.param)
            return None
        self._error(resp, 404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return None

    async def _tokenize(self, req: Request, resp: Response) -> None:
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
        if await self._model_error(payload, resp) is None:
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

    async def _detokenize(self, req: Request, resp: Response) -> None:
        payload = self._payload(req, resp, json_only=True)
        if payload is None:
            return
        tokens = payload.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and 0 <= t < 256 for t in tokens
        ):
            self._missing(resp, "tokens")
            return
        if await self._model_error(payload, resp) is None:
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
        model = await self._model_error(payload, resp)
        if model is None:
            return
        if chat and caps.IMAGE_INPUT not in self.capabilities and _has_image_part(messages):
            # A text-only model given an image: vLLM refuses the request (users quote
            # "<model> is not a multimodal model", 400).
            self._error(resp, 400, f"{self.model} is not a multimodal model", "BadRequestError")
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
        await self._scheduler.admit()  # queued while max_num_seqs are running
        try:
            if payload.get("stream") is True:
                options = payload.get("stream_options")
                with_usage = isinstance(options, dict) and options.get("include_usage") is True
                await self._stream(resp, base, words, finish, usage if with_usage else None, chat)
                return
            token_s = self._scheduler.capacity.token_s
            if token_s:
                await asyncio.sleep(token_s * len(words))  # generated before the answer leaves
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
            body = dumps({**base, "object": obj, "choices": [choice], "usage": usage}).encode()
            if mode.name == "body_cut":
                await faults.cut_body(
                    resp, body, mode.params.get("chunked", False), self._node_header
                )
            elif mode.name == "chunked_json":
                resp.start(200, [JSON, self._node_header])
                await resp.write(body[: len(body) // 2])
                await resp.write(body[len(body) // 2 :])
                await resp.end()
            else:
                resp.send(200, [JSON, self._node_header], body)
        finally:
            self._scheduler.release()

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
            200, [("content-type", SSE_TYPE), ("cache-control", "no-cache"), self._node_header]
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
            return b"data: %b\n\n" % dumps(data).encode()

        events: list[bytes] = [chunk(None, None, role=True)] if chat else []
        events += [chunk(w if i == 0 else " " + w, None) for i, w in enumerate(words)]
        events.append(chunk("" if not chat else None, finish))
        if usage is not None:
            tail = {**base, "object": obj, "choices": [], "usage": usage}
            events.append(b"data: %b\n\n" % dumps(tail).encode())
        mode = self._mode
        cut = mode.params["after"] if mode.name in ("stream_reset", "stream_eof") else None
        interval = mode.params.get("interval", 0.0) if cut is not None else 0.0
        token_s = self._scheduler.capacity.token_s
        first = 1 if chat else 0  # chat opens with the role chunk, sent before any token
        tokens = range(first, first + len(words))
        for i, event in enumerate(events):
            if i == cut:
                break
            if i and interval:
                await asyncio.sleep(interval)
            if token_s and i in tokens:
                await asyncio.sleep(token_s)  # one engine iteration per token
            await resp.write(event)
        else:
            await resp.write(b"data: [DONE]\n\n")
            await resp.end()
            return
        if mode.name == "stream_reset":
            await faults.die(resp)
        else:  # stream_eof: a clean end of the chunked body, no [DONE]
            await resp.end()
