"""The one error shape every failure answers with: {"error": {type, message, request_id}}."""

from __future__ import annotations

import json

REASON = {
    400: "bad_request",
    408: "request_timeout",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


def error_body(
    status: int, message: str, request_id: str, type_: str | None = None, **extra
) -> str:
    err: dict[str, object] = {
        "type": type_ or REASON.get(status, "error"),
        "message": message,
        "request_id": request_id,
    }
    err.update(extra)
    return json.dumps({"error": err}, separators=(",", ":"))


# The final event's type and message by why the stream ended (forward.cut's reason).
STREAM_ENDS = {
    "upstream_disconnected": "the node's stream broke off; the answer is incomplete",
    "upstream_idle": "the node sent nothing for too long (STREAM_IDLE_S); the answer is incomplete",
}


def sse_error_event(request_id: str, kind: str = "upstream_disconnected") -> str:
    """The final event of a stream whose node broke off (or went silent: `upstream_idle`), in
    the OpenAI error shape: the official `openai` SDK raises APIError on an event whose data
    has an "error" key (openai/_streaming.py). The leading blank lines end any event the node
    left half-written.
    """
    error = {
        "message": STREAM_ENDS[kind],
        "type": kind,
        "code": 502,
        "request_id": request_id,
    }
    return "\n\ndata: " + json.dumps({"error": error}, separators=(",", ":")) + "\n\n"
