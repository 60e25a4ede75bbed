"""What reached a node: one ``RecordedRequest`` per request, kept for tests and the control API."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["HISTORY", "RecordedRequest"]

HISTORY = 1000  # requests a node remembers


@dataclass(slots=True)
class RecordedRequest:
    """A request as it reached a node, recorded as soon as its head arrived (so also when the
    node then hangs or fails it, or the body never completes).

    ``closed`` is when the connection that carried it closed (``time.monotonic()``; None while
    open): after a client gives up, it shows how promptly the gateway let go of the node.
    ``declared``/``received``/``complete`` say whether the body arrived whole."""

    node: int
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, value) in arrival order
    body: bytes  # the whole body once complete; b"" before
    arrived: float  # time.monotonic() when the head was parsed
    wall: float  # time.time()
    declared: int | None = 0  # Content-Length; None for a chunked body
    received: int = 0  # body bytes that arrived (set when the body completes or the conn closes)
    complete: bool = False  # the whole body arrived
    closed: float | None = None  # time.monotonic() when the connection closed

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    def json(self) -> Any:
        return json.loads(self.body)

    def to_dict(self, text_limit: int = 4096) -> dict[str, Any]:
        """JSON-friendly summary: body as sha256 + length, plus its text when small."""
        text: str | None = None
        if len(self.body) <= text_limit:
            try:
                text = self.body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        return {
            "node": self.node,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(h) for h in self.headers],
            "body_len": len(self.body),
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "body": text,
            "arrived": self.arrived,
            "wall": self.wall,
            "declared": self.declared,
            "received": self.received,
            "complete": self.complete,
            "closed": self.closed,
        }
