"""The image engine a vision node runs next to vLLM, as the gateway sees it through the guard.

A real vision node (heady_node.image_server behind heady_node.guard) answers OpenAI's Images API
(openai-python `types/image_generate_params.py`, `image_edit_params.py`, `images_response.py`):

    POST /v1/images/generations  JSON -> {created, data: [{b64_json}], output_format, size}
    POST /v1/images/edits        multipart (image / image[], mask?, prompt, n, size, ...)

The simulator runs the node's own request checks (heady_node.image_api.parse_job) and its own
queue (heady_node.image_queue.JobQueue: one job at a time, a bounded wait, 429 + Retry-After,
the `heady_images:*` gauges and the capability line in /metrics), so the two cannot disagree.
Only the drawing is stood in for: a PNG of the asked size whose pixels are half noise, half
flat, so its size is that of a real diffusion PNG (~1.5 MB at 1024x1024), made after
`seconds_per_image x n` seconds (the preset's estimate by default).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import random
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from heady_node import image_presets
from heady_node.image_api import (
    ApiError,
    ImageJob,
    ImageLimits,
    fit_size,
    images_response,
    parse_job,
)
from heady_node.image_queue import JobQueue, QueueFull

__all__ = ["ImageSim", "image_sim_for", "png", "png_size"]

MAX_EDIT_BYTES = 50 << 20


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, seed: int) -> bytes:
    """An RGB PNG: the left half of every row noise, the right half one colour."""
    rng = random.Random(seed)
    noisy = (width // 2) * 3
    flat = bytes(rng.getrandbits(8) for _ in range(3)) * (width - width // 2)
    rows = b"".join(b"\x00" + rng.randbytes(noisy) + flat for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows, 1))
        + _chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None if it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return w, h


@dataclass
class ImageSim:
    """One node's simulated image engine."""

    model: str  # the image checkpoint (first served name of the image engine)
    limits: ImageLimits
    seconds_per_image: float
    max_waiting: int = 8
    queue: JobQueue = field(init=False)

    def __post_init__(self) -> None:
        self.queue = JobQueue(self.max_waiting, self.seconds_per_image)

    def served(self, vllm_names: Sequence[str]) -> tuple[str, ...]:
        """As the node session starts it: the image repo, then the roles vLLM answers to."""
        return tuple(dict.fromkeys((self.model, *vllm_names[1:])))

    def metrics(self) -> str:
        return self.queue.metrics(self.model, ready=True)

    async def run(self, job: ImageJob) -> tuple[int, dict]:
        """(status, body) for a checked job; waits its turn and its drawing time."""
        seed = job.seed if job.seed is not None else random.getrandbits(32)
        delay = self.seconds_per_image * job.n

        def draw() -> list[str]:
            started = time.monotonic()
            files = [png(job.width, job.height, seed + i) for i in range(job.n)]
            time.sleep(max(0.0, delay - (time.monotonic() - started)))
            return [base64.b64encode(f).decode("ascii") for f in files]

        try:
            b64 = await self.queue.run(draw, cost=job.n)
        except QueueFull as full:
            err = ApiError(
                429,
                f"the image engine is busy ({self.queue.waiting} waiting); retry after "
                f"{full.retry_after}s",
                None,
                "rate_limit_exceeded",
                "rate_limit_error",
            )
            return 429, {"body": err.body(), "retry_after": full.retry_after}
        return 200, {"body": images_response(job, b64, int(time.time()))}

    def job(
        self, content_type: str | None, body: bytes, vllm_names: Sequence[str], edit: bool
    ) -> ImageJob | ApiError:
        served = self.served(vllm_names)
        if not edit:
            import json

            try:
                fields = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                return ApiError(400, "the body is not valid JSON")
            if not isinstance(fields, dict):
                return ApiError(400, "the body must be a JSON object")
            return parse_job(fields, self.limits, served)
        if not content_type or "multipart/form-data" not in content_type:
            return ApiError(400, "edits take multipart/form-data (image, prompt, ...)")
        if len(body) > MAX_EDIT_BYTES:
            return ApiError(413, f"the body is larger than {MAX_EDIT_BYTES} bytes")
        parsed = parse_multipart(content_type, body)
        if parsed is None:
            return ApiError(400, "the multipart body cannot be parsed")
        texts, files = parsed
        image = files.get("image") or files.get("image[]")
        if image is None:
            return ApiError(400, "image (a file) is required", "image")
        size = png_size(image)
        if size is None:
            # The real engine reads PNG, JPEG and WebP; the simulator only PNG headers.
            return ApiError(400, "image is not a readable PNG, JPEG or WebP image", "image")
        return parse_job(
            texts,
            self.limits,
            served,
            image=image,
            mask=files.get("mask"),
            default_size=fit_size(*size, self.limits),
        )


def parse_multipart(
    content_type: str, body: bytes
) -> tuple[dict[str, str], dict[str, bytes]] | None:
    """(text fields, file fields) of a multipart/form-data body (stdlib email parser)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    try:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    except Exception:
        return None
    if not msg.is_multipart():
        return None
    texts: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files.setdefault(name, payload)
        else:
            texts[name] = payload.decode("utf-8", "replace")
    return texts, files


def image_sim_for(gpu_key: str, seconds_per_image: float | None = None) -> ImageSim:
    """The image engine a vision node on this GPU class runs (heady_node.image_presets)."""
    from heady_node.gpu import GPU_CLASSES

    preset = image_presets.image_preset(GPU_CLASSES[gpu_key])
    secs = preset.seconds_per_image if seconds_per_image is None else seconds_per_image
    return ImageSim(preset.model.repo, preset.limits(), secs, preset.max_waiting)
