"""Bytes on the wire shared by the node's answers: content types, compact JSON, vLLM's error."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JSON", "SSE_TYPE", "dumps", "error_body"]

JSON = ("content-type", "application/json")
SSE_TYPE = "text/event-stream; charset=utf-8"
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    """vLLM's ErrorResponse (vllm/entrypoints/openai/engine/protocol.py ErrorInfo)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
