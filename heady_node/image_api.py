"""The OpenAI Images API as the node serves it: request checks and answer shapes. Pure.

Shapes follow openai-python's `types/image_generate_params.py`, `image_edit_params.py` and
`images_response.py` (research notes, node-apis.md section 5.1):

    POST /v1/images/generations  JSON {prompt, model?, n?, size?, response_format?, output_format?,
                                       output_compression?, quality?, style?, user?, ...}
    POST /v1/images/edits        multipart {image (or image[]), mask?, prompt, n?, size?, ...}
    -> 200 {"created": <unix s>, "data": [{"b64_json": "..."}], "output_format": "png",
            "size": "512x512"}

What differs from OpenAI, on purpose:
- `response_format` "url" is refused (400): the node has no public file store to point a URL at.
  Left out, it means b64_json (as for OpenAI's GPT image models, which always answer b64_json).
- `size` is any WxH both multiples of the preset's step (64 for Stable Diffusion's latents)
  up to the preset's largest side; "auto" or left out means the preset's native size.
- `stream`/`partial_images` and a transparent `background` are refused: a diffusion pipeline
  has no partial images and no alpha channel.
- Extensions that vLLM-Omni's image server accepts too: `negative_prompt`, `num_inference_steps`,
  `guidance_scale`, `seed` (same image for the same seed and request).
- `quality`, `style`, `moderation` and `user` are accepted and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_PROMPT_CHARS = 32000  # OpenAI's largest (GPT image models); the text encoder truncates anyway
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one node's image preset allows; every request is checked against these."""

    default_side: int  # "auto" / no size: default_side x default_side
    max_side: int
    side_step: int  # width and height must be multiples of this
    max_n: int
    steps: int  # default num_inference_steps
    max_steps: int
    guidance: float  # default guidance_scale (0.0 for the distilled Turbo models)
    edit_strength: float = 0.6  # how much of an edited image is re-drawn (0..1)


@dataclass(frozen=True, slots=True)
class ImageJob:
    """One checked request, everything the engine needs and nothing else."""

    prompt: str
    n: int
    width: int
    height: int
    output_format: str
    compression: int | None  # 0..100 for jpeg/webp quality; None = the encoder's default
    steps: int
    guidance: float
    seed: int | None
    negative_prompt: str | None
    # edits only
    image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, slots=True)
class ApiError:
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    kind: str = "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())  # multipart fields arrive as text
    return None


def _float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def fit_size(width: int, height: int, limits: ImageLimits) -> tuple[int, int]:
    """An uploaded image's size made servable: scaled down to the largest side, then each side
    rounded down to the step (never below one step). Keeps the aspect ratio roughly."""
    scale = min(1.0, limits.max_side / max(width, height, 1))
    step = limits.side_step

    def snap(v: int) -> int:
        return max(step, int(v * scale) // step * step)

    return snap(width), snap(height)


def parse_size(
    raw: object, limits: ImageLimits, default: tuple[int, int] | None = None
) -> tuple[int, int] | ApiError:
    if raw is None or raw == "auto":
        return default or (limits.default_side, limits.default_side)
    if not isinstance(raw, str):
        return _bad("size must be a string such as '512x512' or 'auto'", "size")
    w_text, sep, h_text = raw.strip().lower().partition("x")
    if not sep or not w_text.isdigit() or not h_text.isdigit():
        return _bad(f"size {raw!r} is not WIDTHxHEIGHT (e.g. '512x512') or 'auto'", "size")
    w, h = int(w_text), int(h_text)
    step, top = limits.side_step, limits.max_side
    if not (step <= w <= top and step <= h <= top) or w % step or h % step:
        return _bad(
            f"size {raw!r} is not supported here: width and height must be multiples of "
            f"{step} between {step} and {top} (this node's native size is "
            f"{limits.default_side}x{limits.default_side})",
            "size",
            "unsupported_size",
        )
    return w, h


def check_model(raw: object, served: Sequence[str]) -> ApiError | None:
    """As vLLM does: no model means the first served name; an unknown one is a 404."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or raw not in served:
        return ApiError(
            404, f"The model `{raw}` does not exist.", "model", "model_not_found", "NotFoundError"
        )
    return None


def parse_job(
    fields: Mapping[str, Any],
    limits: ImageLimits,
    served: Sequence[str],
    *,
    image: bytes | None = None,
    mask: bytes | None = None,
    default_size: tuple[int, int] | None = None,
) -> ImageJob | ApiError:
    """Check a generation (JSON object) or an edit (multipart fields plus the image bytes;
    `default_size`: the upload's own size, fitted, for size "auto")."""
    edit = image is not None
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _bad("prompt is required and must be a non-empty string", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        return _bad(f"prompt is longer than {MAX_PROMPT_CHARS} characters", "prompt")
    if err := check_model(fields.get("model"), served):
        return err
    n = 1 if fields.get("n") is None else _int(fields.get("n"))
    if n is None or not 1 <= n <= limits.max_n:
        return _bad(f"n must be an integer from 1 to {limits.max_n} on this node", "n")
    fmt = fields.get("response_format")
    if fmt == "url":
        return _bad(
            "response_format 'url' is not supported: this node keeps no files to link to; "
            "ask for response_format 'b64_json'",
            "response_format",
            "unsupported_response_format",
        )
    if fmt not in (None, "b64_json"):
        return _bad("response_format must be 'b64_json'", "response_format")
    if _truthy(fields.get("stream")):
        return _bad("stream is not supported for images here", "stream", "unsupported_stream")
    if fields.get("background") == "transparent":
        return _bad(
            "background 'transparent' is not supported: the diffusion model draws no alpha",
            "background",
        )
    size = parse_size(fields.get("size"), limits, default_size)
    if isinstance(size, ApiError):
        return size
    out = fields.get("output_format") or "png"
    if out not in OUTPUT_FORMATS:
        return _bad(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}", "output_format")
    compression = fields.get("output_compression")
    if compression is not None:
        compression = _int(compression)
        if compression is None or not 0 <= compression <= 100:
            return _bad("output_compression must be an integer from 0 to 100", "output_compression")
    steps = limits.steps
    if fields.get("num_inference_steps") is not None:
        steps_in = _int(fields.get("num_inference_steps"))
        if steps_in is None or not 1 <= steps_in <= limits.max_steps:
            return _bad(
                f"num_inference_steps must be an integer from 1 to {limits.max_steps}",
                "num_inference_steps",
            )
        steps = steps_in
    guidance = limits.guidance
    if fields.get("guidance_scale") is not None:
        g = _float(fields.get("guidance_scale"))
        if g is None or not 0.0 <= g <= 30.0:
            return _bad("guidance_scale must be a number from 0 to 30", "guidance_scale")
        guidance = g
    seed = None
    if fields.get("seed") is not None:
        seed = _int(fields.get("seed"))
        if seed is None or not 0 <= seed <= MAX_SEED:
            return _bad("seed must be a non-negative integer", "seed")
    negative = fields.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        return _bad("negative_prompt must be a string", "negative_prompt")
    strength = None
    if edit:
        strength = limits.edit_strength
        if fields.get("strength") is not None:
            s = _float(fields.get("strength"))
            if s is None or not 0.0 < s <= 1.0:
                return _bad("strength must be a number in (0, 1]", "strength")
            strength = s
    return ImageJob(
        prompt=prompt,
        n=n,
        width=size[0],
        height=size[1],
        output_format=out,
        compression=compression,
        steps=steps,
        guidance=guidance,
        seed=seed,
        negative_prompt=negative or None,
        image=image,
        mask=mask,
        strength=strength,
    )


def _truthy(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1"))


def images_response(job: ImageJob, b64_images: Sequence[str], created: int) -> dict[str, Any]:
    """OpenAI's ImagesResponse: created, data[{b64_json}], plus output_format and size."""
    return {
        "created": created,
        "data": [{"b64_json": b} for b in b64_images],
        "output_format": job.output_format,
        "size": job.size,
    }


MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
