"""What one attempt at one node means: pass the answer through, or move to the next node.

Pure: the shell reduces a fetch outcome to plain data (status, a few header values, or an
error kind) and asks `classify`.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["pass", "failover"]

# 502/503/504 are the node (or its tunnel) failing, not the model server's answer.
RETRY_STATUSES = frozenset({502, 503, 504})
# Cloudflare's own origin errors: 520 unknown origin error, 521 down, 522/524 time-outs,
# 523 unreachable, 525/526 origin TLS failures, 530 tunnel
# gone (error 1033). None of them come from the model server.
CLOUDFLARE_TUNNEL_STATUSES = frozenset({520, 521, 522, 523, 524, 525, 526, 530})
MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """The record of one try, as logged and as returned when everything fails (no URLs)."""

    node: int
    outcome: Outcome
    reason: str  # "ok", "refused", "timeout", "busy", "http_503", "tunnel_offline", ...
    status: int | None = None
    ms: float | None = None
    retry_after_s: float | None = None

    def public(self) -> dict[str, object]:
        out: dict[str, object] = {"node": self.node, "reason": self.reason}
        if self.status is not None:
            out["status"] = self.status
        return out


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reason: str
    retry_after_s: float | None = None

    @property
    def node_failed(self) -> bool:
        return self.outcome == "failover"


def classify_response(
    status: int,
    ngrok_error_code: str | None,
    retry_after: str | None,
    now: float,
) -> Verdict:
    """Classify a node's response head. Anything not listed passes through unchanged: a 400,
    401, 404, 422 or 500 is the model server's own answer and the client should see it."""
    if ngrok_error_code:
        return Verdict("failover", "tunnel_offline")
    if status in CLOUDFLARE_TUNNEL_STATUSES:
        return Verdict("failover", "tunnel_down")
    if status == 429:
        return Verdict("failover", "busy", parse_retry_after(retry_after, now))
    if status in RETRY_STATUSES:
        reason = "busy" if status == 503 else f"http_{status}"
        return Verdict("failover", reason, parse_retry_after(retry_after, now))
    return Verdict("pass", "ok")


def classify_error(kind: Literal["timeout", "refused", "error"]) -> Verdict:
    """A fetch that produced no response at all always moves on to the next node."""
    return Verdict("failover", kind)


def error_kind(message: str) -> Literal["refused", "error"]:
    """workerd reports a refused or reset connection as 'Network connection lost' and DNS or
    TLS trouble with other texts; all are node failures, refused ones named as such."""
    lowered = message.lower()
    if "connection lost" in lowered or "refused" in lowered or "connect" in lowered:
        return "refused"
    return "error"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds or an HTTP date -> seconds from now, clamped; None if absent."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # str.isdigit() also accepts "²", which int() refuses
        seconds = float(int(value[:10]))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 1.0), MAX_RETRY_AFTER_S)


def next_step(
    attempts_made: int, plan_length: int, elapsed_s: float, deadline_s: float
) -> Literal["try", "stop"]:
    """After a failed attempt: go on while nodes remain and the deadline has room."""
    if attempts_made >= plan_length or elapsed_s >= deadline_s:
        return "stop"
    return "try"
