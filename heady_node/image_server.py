"""The image engine's HTTP side: OpenAI's Images API on a loopback port, behind the node guard.

    python -m heady_node.image_server --gpu t4 --port 8001 --served-model-name REPO vision
    python -m heady_node.image_server --tiny --port 8001   # random tiny pipeline on the CPU

Routes: POST /v1/images/generations, POST /v1/images/edits (bearer token), GET /metrics (token),
GET /health (200 once the pipeline is loaded and has drawn a warm-up image, 503 before).
It listens on 127.0.0.1 only: the public side is the node guard inside vLLM, which sends
/v1/images/* here (heady_node.relay) and adds this engine's /metrics to vLLM's. The token is
checked here too, so another user of the host cannot skip the guard through the loopback port.

Loading happens after the port is open, so `/health` can say "loading" while weights download.
One job runs at a time (image_queue.JobQueue); a client that goes away while its job waits
gives its place up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from heady_node import guard
from heady_node.image_api import (
    ApiError,
    ImageJob,
    ImageLimits,
    fit_size,
    images_response,
    parse_job,
)
from heady_node.image_queue import JobQueue, QueueFull

MAX_JSON_BYTES = 1 << 20  # a generation request is a prompt and a few fields
MAX_EDIT_BYTES = 50 << 20  # OpenAI's limit for an edit's image upload


class Engine(Protocol):
    def generate(self, job: ImageJob) -> list[bytes]: ...


@dataclass
class ImageService:
    """Shared state of one image server: the engine once loaded, its queue, its settings."""

    limits: ImageLimits
    served: Sequence[str]  # model names answered to; the first is reported in metrics
    token: str
    queue: JobQueue
    engine: Engine | None = None
    load_error: str | None = None
    _digest: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        if not self.token.strip():
            raise RuntimeError(f"{guard.TOKEN_ENV} is not set: the image engine needs the token")
        self._digest = guard.token_digest(self.token.strip())

    def authorised(self, request: Request) -> bool:
        return guard.bearer_matches(request.headers.get("authorization"), self._digest)

    def load_in_background(self, loader: Callable[[], Engine]) -> threading.Thread:
        def work() -> None:
            try:
                self.engine = loader()
            except Exception as exc:  # shown by /health; the process stays up to say so
                self.load_error = f"{type(exc).__name__}: {exc}"[:500]
                print(f"image engine: loading failed: {self.load_error}", file=sys.stderr)

        thread = threading.Thread(target=work, name="image-engine-load", daemon=True)
        thread.start()
        return thread


def _error(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


UNAUTHORISED = ApiError(401, "missing or invalid node token", None, None, "unauthorized")
NOT_READY = ApiError(503, "the image model is still loading", None, "model_loading", "server_error")


def build_app(service: ImageService) -> Starlette:
    async def health(request: Request) -> Response:
        if service.engine is not None:
            return JSONResponse({"status": "ok"})
        state = "failed" if service.load_error else "loading"
        return JSONResponse({"status": state, "error": service.load_error}, status_code=503)

    async def metrics(request: Request) -> Response:
        if not service.authorised(request):
            return _error(UNAUTHORISED)
        text = service.queue.metrics(service.served[0], service.engine is not None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def generations(request: Request) -> Response:
        if not service.authorised(request):
            return _error(UNAUTHORISED)
        body = await _read_limited(request, MAX_JSON_BYTES)
        if isinstance(body, ApiError):
            return _error(body)
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):
            return _error(ApiError(400, "the body is not valid JSON"))
        if not isinstance(fields, dict):
            return _error(ApiError(400, "the body must be a JSON object"))
        job = parse_job(fields, service.limits, service.served)
        return await _run(request, job)

    async def edits(request: Request) -> Response:
        if not service.authorised(request):
            return _error(UNAUTHORISED)
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            return _error(ApiError(400, "edits take multipart/form-data (image, prompt, ...)"))
        too_big = _declared_too_big(request, MAX_EDIT_BYTES)
        if too_big:
            return _error(too_big)
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception:  # python-multipart's parse errors have no common public base
            return _error(ApiError(400, "the multipart body cannot be parsed"))
        try:
            image = form.get("image") or form.get("image[]")
            mask = form.get("mask")
            if image is None or isinstance(image, str):
                return _error(ApiError(400, "image (a file) is required", "image"))
            image_bytes = await image.read()
            mask_bytes = None if mask is None or isinstance(mask, str) else await mask.read()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        finally:
            await form.close()
        from heady_node.image_engine import ImageInputError, image_size

        try:
            w, h = image_size(image_bytes)
        except ImageInputError as exc:
            return _error(ApiError(400, str(exc), "image"))
        job = parse_job(
            fields,
            service.limits,
            service.served,
            image=image_bytes,
            mask=mask_bytes,
            default_size=fit_size(w, h, service.limits),
        )
        return await _run(request, job)

    async def _run(request: Request, job: ImageJob | ApiError) -> Response:
        if isinstance(job, ApiError):
            return _error(job)
        engine = service.engine
        if engine is None:
            return _error(NOT_READY, {"Retry-After": "30"})

        def work() -> list[str]:
            return [base64.b64encode(f).decode("ascii") for f in engine.generate(job)]

        task = asyncio.ensure_future(service.queue.run(work, cost=job.n))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()  # frees its place if still waiting; a running job finishes anyway
            return Response(status_code=499)  # nobody reads it: the client is gone
        try:
            files = task.result()
        except QueueFull as full:
            err = ApiError(
                429,
                f"the image engine is busy ({service.queue.waiting} waiting); retry after "
                f"{full.retry_after}s",
                None,
                "rate_limit_exceeded",
                "rate_limit_error",
            )
            return _error(err, {"Retry-After": str(full.retry_after)})
        except Exception as exc:
            from heady_node.image_engine import ImageInputError

            if isinstance(exc, ImageInputError):
                return _error(ApiError(400, str(exc), "image"))
            msg = f"image generation failed: {type(exc).__name__}"
            print(f"image engine: {msg}: {exc}", file=sys.stderr)
            return _error(ApiError(500, msg, None, None, "server_error"))
        return JSONResponse(images_response(job, files, int(time.time())))

    async def unexpected(request: Request, exc: Exception) -> Response:
        # A bug must still answer in the API's shape, without a traceback.
        print(f"image engine: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return _error(ApiError(500, "internal error in the image engine", kind="server_error"))

    return Starlette(
        exception_handlers={Exception: unexpected},
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/images/edits", edits, methods=["POST"]),
        ],
    )


def _declared_too_big(request: Request, limit: int) -> ApiError | None:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return ApiError(413, f"the body is larger than {limit} bytes", None, "body_too_large")
    return None


async def _read_limited(request: Request, limit: int) -> bytes | ApiError:
    if too_big := _declared_too_big(request, limit):
        return too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return ApiError(413, f"the body is larger than {limit} bytes", None, "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next ASGI message is
    the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heady_node.image_server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--gpu", default=None, help="GPU class key (t4, l4, a100-40, ...)")
    p.add_argument("--model", default=None, help="image checkpoint (default: the GPU's preset)")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="random tiny pipeline on the CPU (tests)")
    p.add_argument("--max-waiting", type=int, default=None)
    return p


def service_from_args(
    args: argparse.Namespace, token: str
) -> tuple[ImageService, Callable[[], Engine]]:
    from heady_node import image_presets
    from heady_node.gpu import GPU_CLASSES

    if args.tiny:
        limits = ImageLimits(64, 256, 32, 4, 1, 4, 0.0)
        served = args.served_model_name or ["tiny-random-sd"]
        waiting = args.max_waiting if args.max_waiting is not None else 4
        queue = JobQueue(max_waiting=waiting, seconds_per_job=1.0)

        def load_tiny() -> Engine:
            from heady_node.image_engine import DiffusersEngine, tiny_pipeline

            return DiffusersEngine.around(tiny_pipeline(), "cpu")

        return ImageService(limits, served, token, queue), load_tiny
    if args.gpu not in GPU_CLASSES:
        raise SystemExit(f"--gpu must be one of {', '.join(GPU_CLASSES)}")
    gpu = GPU_CLASSES[args.gpu]
    preset = image_presets.image_preset(gpu, args.model)
    served = args.served_model_name or [preset.model.repo]
    waiting = args.max_waiting if args.max_waiting is not None else preset.max_waiting
    queue = JobQueue(max_waiting=waiting, seconds_per_job=preset.seconds_per_image)
    # This process may use the part of the card vLLM does not take, less the slack.
    fraction = max(0.05, image_presets.IMAGE_SHARE_OF_CARD - preset.vllm_utilization)

    def load() -> Engine:
        from heady_node.image_engine import DiffusersEngine

        engine = DiffusersEngine.load(preset.model, args.device, preset.batch, fraction)
        engine.warm_up()
        return engine

    return ImageService(preset.limits(), served, token, queue), load


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = _parser().parse_args(argv)
    token = os.environ.get(guard.TOKEN_ENV, "")
    try:
        service, loader = service_from_args(args, token)
    except RuntimeError as exc:
        print(f"image engine: {exc}", file=sys.stderr)
        return 2
    service.load_in_background(loader)
    app = build_app(service)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
