"""One try at one node, as plain data: what happened and what it means for the request.

Pure: the shell reduces a fetch outcome to a `Head` (status + the few header values the
failure rules read) or a no-response kind, and `judge` decides.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from heady_shared.failures import match

# pass: relayed to the client; failover: the node failed, try the next one; cut: the node's
# body broke after its head was relayed; gone: the client left, nobody is retried.
Outcome = Literal["pass", "failover", "cut", "gone"]
NoResponse = Literal["timeout", "refused", "error"]
MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True, slots=True)
class Head:
    """A node's response head as the decision needs it."""

    status: int
    fields: Mapping[str, str | None]  # heady_shared.failures.HEAD_FIELDS -> value
    # The shell's own response object (a JS Response), opaque to the core: it travels with
    # the head so that whoever holds the head can relay or discard it.
    response: object = field(default=None, compare=False, repr=False)
    # The shell's handle on that fetch (a JS AbortController), armed past the head: aborting
    # it errors the response's body, which is how a stalled stream is ended.
    abort: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Attempt:
    """The one record of a try: logged, counted in health, returned when all fail (no URLs)."""

    node: int
    outcome: Outcome
    reason: str  # "ok", "refused", "timeout", "busy", "tunnel_offline", "client_gone", ...
    status: int | None = None
    ms: float | None = None
    retry_after_s: float | None = None

    @property
    def node_failed(self) -> bool:
        """Does this count against the node's health?"""
        return self.outcome in ("failover", "cut")

    def public(self) -> dict[str, object]:
        out: dict[str, object] = {"node": self.node, "reason": self.reason}
        if self.status is not None:
            out["status"] = self.status
        return out

    def log(self) -> dict[str, object]:
        return {
            "node": self.node,
            "outcome": self.outcome,
            "reason": self.reason,
            "status": self.status,
            "ms": self.ms,
        }


def judge(node: int, head: Head, ms: float, now: float) -> Attempt:
    """A response head: the node failing (a failure rule matched) or the model server's own
    answer, which passes through whatever its status (400, 401, 404, 422, 500 included)."""
    rule = match(head.status, head.fields)
    if rule is None:
        return Attempt(node, "pass", "ok", head.status, ms)
    retry = parse_retry_after(head.fields.get("retry-after"), now) if rule.retry_after else None
    return Attempt(node, "failover", rule.reason, head.status, ms, retry)


def no_response(node: int, kind: NoResponse, ms: float) -> Attempt:
    """A fetch that produced no response head always moves on to the next node."""
    return Attempt(node, "failover", kind, None, ms)


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
