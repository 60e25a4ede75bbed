"""The request path's decisions: try the plan's nodes in order until one answers.

Pure logic over a small I/O interface: the shell's `Upstream` performs one fetch up to the
response head; everything else (deadline, which nodes, what a head means, health marks, the
Retry-After of a 503) is decided here and unit-tested in CPython with a fake Upstream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import health as hl
from attempt import Attempt, Head, NoResponse, judge, no_response
from config import HealthPolicy
from routing import Plan

# An attempt with less time than this left before the deadline is not started: it could
# only end as a time-out.
MIN_ATTEMPT_S = 0.1


class Upstream(Protocol):
    """One fetch to a node, up to its response head (the shell's JS fetch)."""

    async def head(self, node: int, timeout_s: float) -> Head | NoResponse | str:
        """The head, a no-response kind ("timeout", "refused", "error"), or "client_gone"
        when the client left while waiting (nothing more is tried then)."""
        ...

    def discard(self, node: int) -> None:
        """Free a failed answer's connection; nothing of it reaches the client."""
        ...


@dataclass(slots=True)
class Forwarded:
    """How the request ended: `node` answered (its head is relayed), or nobody did."""

    attempts: list[Attempt] = field(default_factory=list)
    node: int | None = None
    head: Head | None = None
    client_gone: bool = False
    retry_after_s: int | None = None  # for the 503 when every node failed


async def forward(
    plan: Plan,
    upstream: Upstream,
    view: hl.HealthView,
    policy: HealthPolicy,
    *,
    attempt_s: float,
    deadline: float,
    clock: Callable[[], float],
) -> Forwarded:
    """Try `plan.nodes` in order. Each node at most once; no attempt past `deadline`; a
    failed node is marked down at once (so concurrent requests in this isolate skip it); the
    client leaving stops everything without blaming the node."""
    out = Forwarded()
    for n in plan.nodes:
        started = clock()
        remaining = deadline - started
        if remaining <= MIN_ATTEMPT_S:
            break
        result = await upstream.head(n, min(attempt_s, remaining))
        now = clock()
        ms = round(max(0.0, now - started) * 1000, 1)
        if result == "client_gone":
            out.attempts.append(Attempt(n, "gone", "client_gone", None, ms))
            out.client_gone = True
            return out
        a = judge(n, result, ms, now) if isinstance(result, Head) else no_response(n, result, ms)
        out.attempts.append(a)
        if a.node_failed:
            if isinstance(result, Head):
                upstream.discard(n)
            view.apply(n, hl.on_failure(view.get(n), now, a.reason, policy, a.retry_after_s))
            continue
        if view.get(n).state != "up":
            view.apply(n, hl.on_success(view.get(n), now, ms))
        out.node, out.head = n, result
        return out
    out.retry_after_s = retry_after(view, plan.nodes, clock(), policy)
    return out


def retry_after(
    view: hl.HealthView, nodes: tuple[int, ...], now: float, policy: HealthPolicy
) -> int:
    """Seconds until the first of these nodes leaves its cooldown (at least 1)."""
    ends = [view.get(n).until for n in nodes if view.is_down(n, now)]
    if not ends:
        return int(policy.cooldown_base_s)
    # Rounded first: (t + 120) - t is 120.00000000000001 in floats, which ceil makes 121.
    return max(1, math.ceil(round(min(e for e in ends if e is not None) - now, 3)))


def cut(node: int, view: hl.HealthView, policy: HealthPolicy, now: float, ms: float) -> Attempt:
    """The node's body broke after its head was relayed: a node failure like any other."""
    view.apply(node, hl.on_failure(view.get(node), now, "cut", policy))
    return Attempt(node, "cut", "upstream_disconnected", None, round(max(0.0, ms), 1))
