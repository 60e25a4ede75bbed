"""The node's switchable behaviours: ``MODES``, their parameters and validation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["HEALTHY", "MODES", "ModeConfig", "number", "parse_mode"]

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


@dataclass(frozen=True, slots=True)
class ModeConfig:
    name: str
    params: Mapping[str, Any]


def number(name: str, value: Any, *, integer: bool = False) -> float:
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
        out["delay"] = number("delay", params.pop("delay", 1.0))
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
        out["events"] = int(number("events", params.pop("events", 200), integer=True))
        out["interval"] = number("interval", params.pop("interval", 0.01))
    elif mode in ("stream_reset", "stream_eof"):
        out["after"] = int(number("after", params.pop("after", 2), integer=True))
        out["interval"] = number("interval", params.pop("interval", 0.0))
    elif mode == "body_cut":
        size = int(number("size", params.pop("size", 256 * 1024), integer=True))
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


HEALTHY = ModeConfig("healthy", {})
