"""A FastAPI app shaped like vLLM 0.33's API server, for testing the node guard in place.

Not vLLM (no model, no GPU): the same kinds of routes at the same paths, /metrics mounted the
way vLLM mounts it (a Starlette Mount whose regex also matches /metrics<anything>, from
vllm/entrypoints/serve/instrumentator/metrics.py), an API-key check that, like vLLM's, guards only
/v1, and `--middleware` applied exactly as vLLM's init_entrypoints_middleware does (class ->
app.add_middleware, coroutine function -> app.middleware("http")). Run as an engine command:

    python -m tests.node.vllm_shape serve MODEL --port P --api-key K --served-model-name A B
                                    --middleware heady_node.guard.NodeGuard
"""

import argparse
import asyncio
import importlib
import inspect
import json
import os
import re
import threading
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount


def _metrics_app():
    async def app(scope, receive, send) -> None:
        body = b'vllm:num_requests_running{model_name="m"} 0.0\nvllm:num_requests_waiting 0.0\n'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def build_app(
    served: list[str],
    api_key: str | None,
    middleware: list[str],
    gate: threading.Event | None = None,
) -> FastAPI:
    """`gate`: when given, a stream sends its first event, then waits for the gate before the
    rest; a client can only see the first event in time if nothing in between buffers."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": "0.33.0-shape"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in served]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") not in served:
            return JSONResponse(
                {"error": {"message": f"The model `{body.get('model')}` does not exist."}},
                status_code=404,
            )
        if not body.get("stream"):
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "OK."}}]}

        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"choices":[{"delta":{"content":"first"}}]}\n\n'
            if gate is not None:
                await asyncio.to_thread(gate.wait, 10.0)
            yield b'data: {"choices":[{"delta":{"content":"second"}}]}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # Inference and control endpoints vLLM serves outside /v1.
    @app.post("/invocations")
    async def invocations() -> dict:
        return {"choices": [{"message": {"content": "inference outside /v1"}}]}

    @app.post("/pause")
    async def pause() -> dict:
        return {"paused": True}

    @app.post("/tokenize")
    async def tokenize() -> dict:
        return {"tokens": [1, 2, 3]}

    @app.get("/load")
    async def load() -> dict:
        return {"server_load": 0}

    metrics = Mount("/metrics", _metrics_app())
    metrics.path_regex = re.compile("^/metrics(?P<path>.*)$")
    app.routes.append(metrics)

    if api_key:

        @app.middleware("http")
        async def v1_key(request: Request, call_next):
            # vLLM's own check: only paths under /v1 need the key.
            if (
                request.url.path.startswith("/v1")
                and request.headers.get("authorization") != f"Bearer {api_key}"
            ):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

    for path in middleware:
        module_path, name = path.rsplit(".", 1)
        imported = getattr(importlib.import_module(module_path), name)
        if inspect.isclass(imported):
            app.add_middleware(imported)
        elif inspect.iscoroutinefunction(imported):
            app.middleware("http")(imported)
        else:
            raise ValueError(f"Invalid middleware {path}. Must be a function or a class.")
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.node.vllm_shape")
    parser.add_argument("positional", nargs="*")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--middleware", action="append", default=[])
    args, _ = parser.parse_known_args(argv)
    positional = [p for p in args.positional if p != "serve"]
    served = args.served_model_name or positional[:1] or ["model"]
    api_key = args.api_key or os.environ.get("VLLM_API_KEY")  # as vLLM: the flag, else the env
    app = build_app(served, api_key, args.middleware)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    print(json.dumps({"stopped": True}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
