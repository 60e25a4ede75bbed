"""When is a node's answer the node failing, rather than the model server answering?

One table over a response head (status + a few header values), read by the gateway (fail over
and mark the node down) and by `heady probe` (tell the operator why). Anything no rule matches
is the model server's own answer — a 400, 401, 404, 422 or 500 goes to the client unchanged.

To add a failover trigger: add a row here (and, if it reads a new header, its name to
HEAD_FIELDS), a sim mode that produces it, and an e2e case (docs/architecture.md walks it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

# The only response headers any rule reads: the gateway fetches just these across the
# JS boundary, so a rule over a new header must list it here.
HEAD_FIELDS = ("ngrok-error-code", "retry-after")

# Cloudflare's own origin errors: 520 unknown origin error, 521 down, 522/524 time-outs,
# 523 unreachable, 525/526 origin TLS failures, 530 with error 1033 = no connector for the
# tunnel (Cloudflare docs: support/troubleshooting/http-status-codes/cloudflare-5xx-errors).
CLOUDFLARE_ORIGIN_ERRORS = frozenset({520, 521, 522, 523, 524, 525, 526, 530})


@dataclass(frozen=True, slots=True)
class FailureRule:
    reason: str  # the name in logs, health records and /api/status
    matches: Callable[[int, Mapping[str, str | None]], bool]
    retry_after: bool  # the node's Retry-After sets the cooldown
    explain: str  # for operators: what it usually means on a Colab node


RULES: tuple[FailureRule, ...] = (
    FailureRule(
        "tunnel_offline",
        lambda s, h: bool(h.get("ngrok-error-code")),
        False,
        # ngrok answers for an agent that is gone with an ngrok-error-code header, e.g.
        # ERR_NGROK_3200 "endpoint is offline" (ngrok.com/docs/errors/err_ngrok_3200/).
        "ngrok endpoint offline: the node's ngrok agent (its Colab tab) is gone",
    ),
    FailureRule(
        "tunnel_down",
        lambda s, h: s in CLOUDFLARE_ORIGIN_ERRORS,
        False,
        "Cloudflare Tunnel has no live origin (530/1033 or 52x): runtime or cloudflared stopped",
    ),
    FailureRule(
        "busy",
        lambda s, h: s in (429, 503),
        True,
        "the engine is overloaded or still loading (429/503)",
    ),
    FailureRule(
        "http_502",
        lambda s, h: s == 502,
        True,
        "bad gateway between the tunnel and the engine (502)",
    ),
    FailureRule(
        "http_504",
        lambda s, h: s == 504,
        True,
        "the tunnel timed out waiting for the engine (504)",
    ),
)

# Failures with no response at all.
NO_RESPONSE_EXPLAIN = {
    "refused": "connection refused, reset or host unreachable: the node or its tunnel is down",
    "timeout": "no response head within the attempt time-out",
    "error": "network error (DNS, TLS) reaching the node",
}
EXPLAIN = {r.reason: r.explain for r in RULES} | NO_RESPONSE_EXPLAIN


def match(status: int, head: Mapping[str, str | None]) -> FailureRule | None:
    """The first rule this response head meets; None means: the model server answered."""
    for rule in RULES:
        if rule.matches(status, head):
            return rule
    return None


def connection_error_kind(message: str) -> str:
    """workerd reports a refused or reset connection as 'Network connection lost' and DNS or
    TLS trouble with other texts; httpx says 'connection refused' / 'ConnectError'."""
    lowered = message.lower()
    if "connection lost" in lowered or "refused" in lowered or "connect" in lowered:
        return "refused"
    return "error"
