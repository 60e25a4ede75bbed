"""The one error shape every failure answers with: {"error": {type, message, request_id}}."""

from __future__ import annotations

import json

REASON = {
    400: "bad_request",
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
