"""An exchange is one client request and the gateway's answer to it (HTTP's term for a
request/response pair). `Exchange` keeps its bookkeeping — id, route, attempts, how it
ended — and renders the one JSON log line the gateway prints per request. Pure."""

from __future__ import annotations

from collections.abc import Callable

from attempt import Attempt
from routing import HEAVY_PREFIX


class Exchange:
    def __init__(
        self, rid: str, method: str, path: str, origin: str | None, clock: Callable[[], float]
    ) -> None:
        self.rid = rid
        self.method = method
        self.path = path
        self.origin = origin
        self._clock = clock
        self.started = clock()
        self.role: str | None = None
        self.attempts: list[Attempt] = []
        self.status = 0
        self.error: str | None = None

    def log_line(self) -> dict[str, object]:
        line: dict[str, object] = {
            "msg": "request",
            "request_id": self.rid,
            "method": self.method,
            # Node paths are the client's business (and may carry ids): only the prefix.
            "route": self.path if not self.path.startswith(HEAVY_PREFIX) else HEAVY_PREFIX + "*",
            "role": self.role,
            "status": self.status,
            "ms": round(max(0.0, self._clock() - self.started) * 1000, 1),
            "attempts": [a.log() for a in self.attempts],
        }
        if self.error:
            line["error"] = self.error
        return line
