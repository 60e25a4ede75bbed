"""Pure decisions of the batch worker: what to send for a line, what to write for its answer,
when to retry, how long to wait, how many lines to keep in flight. No I/O here."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class Request:
    custom_id: str | None
    url: str | None
    body: dict[str, Any] | None
    problem: str | None = None  # why the line cannot be sent (the gateway validated it, but)


def parse_request(raw: bytes, endpoint: str) -> Request:
    """A shard's input line as the worker will send it. The gateway's validate step already
    checked every line; this only refuses what must never reach the engine (another path)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return Request(None, None, None, "line is not valid JSON")
    if not isinstance(obj, dict):
        return Request(None, None, None, "line is not a JSON object")
    cid = obj.get("custom_id")
    cid = cid if isinstance(cid, str) else None
    url, body = obj.get("url"), obj.get("body")
    if url != endpoint:
        return Request(cid, None, None, f"url must be the batch endpoint {endpoint}")
    if not isinstance(body, dict):
        return Request(cid, None, None, "body must be a JSON object")
    if body.get("stream"):
        # A batch answer is one JSON document, as with OpenAI: never an event stream.
        body = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
    return Request(cid, url, body)


def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def answer_line(
    custom_id: str | None, status: int, request_id: str, body: object, line_id: str | None = None
) -> bytes:
    """A BatchRequestOutput for an answer the engine gave (any status)."""
    out = {
        "id": line_id or new_line_id(),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }
    return _dumps(out).encode() + b"\n"


def failure_line(
    custom_id: str | None, code: str, message: str, line_id: str | None = None
) -> bytes:
    """A BatchRequestOutput for a line the engine never answered."""
    out = {
        "id": line_id or new_line_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return _dumps(out).encode() + b"\n"


def response_body(content: bytes) -> object:
    """The engine's answer as JSON; a non-JSON answer is wrapped so the line stays JSON."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        text = content[:2048].decode("utf-8", "replace")
        return {"error": {"message": text, "type": "invalid_response", "code": None}}


def is_success(status: int) -> bool:
    return 200 <= status < 300


def retryable_status(status: int) -> bool:
    """The engine is overloaded or (re)starting: worth another try."""
    return status == 429 or status >= 500


def backoff_s(attempt: int, base: float, cap: float, rand: float) -> float:
    """Exponential backoff with jitter: attempt 0 -> ~base; never above cap; rand in [0, 1)
    spreads retries of many lines (and many nodes) over [50%, 100%] of the step."""
    step = min(cap, base * (2 ** min(attempt, 30)))
    return step * (0.5 + 0.5 * rand)


def usage_of(body: object) -> tuple[int, int]:
    """(input_tokens, output_tokens) of one OpenAI answer body; 0 when it says nothing."""
    usage = body.get("usage") if isinstance(body, Mapping) else None
    if not isinstance(usage, Mapping):
        return 0, 0

    def num(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    return num("prompt_tokens"), num("completion_tokens")


@dataclass(frozen=True)
class Limits:
    low: int = 1
    high: int = 256
    step: int = 8


def next_concurrency(limit: int, in_flight: int, waiting: int, before: int, lim: Limits) -> int:
    """How many lines to keep in flight next, from the engine's queue (`vllm:num_requests_waiting`
    now and at the previous look).

    vLLM runs up to max_num_seqs requests in one batch and queues the rest as "waiting". A queue
    that stays empty while we use our whole allowance means the batch may have room: add `step`.
    A queue that grows means the batch is full (or interactive traffic arrived): more lines would
    only wait, so give back half of the growth (at least one). Otherwise hold."""
    if waiting == 0 and in_flight >= limit:
        return min(lim.high, limit + lim.step)
    if waiting > 0 and waiting > before:
        return max(lim.low, limit - max(1, (waiting - before + 1) // 2))
    return max(lim.low, min(lim.high, limit))
