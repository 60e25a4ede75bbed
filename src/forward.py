"""The request path's decisions: try the plan's nodes in order until one answers.

Pure logic over a small I/O interface: the shell's `Upstream` performs one fetch up to the
response head; everything else (deadline, which nodes, what a head means, health marks, the
Retry-After of a 503) is decided here and unit-tested in CPython with a fake Upstream.
The result (`ForwardResult`) carries the head it chose, and with it the shell's response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import health
from attempt import Attempt, Head, NoResponse, judge, no_response
from config import HealthPolicy
from routing import Plan
from services import Clock

if TYPE_CHECKING:
    from sync import HealthSync

# An attempt with less time than this left before the deadline is not started: it could
# only end as a time-out.
MIN_ATTEMPT_S = 0.1


class Upstream(Protocol):
    """One fetch to a node, up to its response head (the shell's JS fetch)."""

    async def head(self, node: int, timeout_s: float) -> Head | NoResponse | str:
        """The head (its `response` the shell's own, for relaying or discarding), a
        no-response kind ("timeout", "refused", "error"), or "client_gone" when the client
        left while waiting (nothing more is tried then)."""
        ...

    def discard(self, head: Head) -> None:
        """Free a failed answer's connection; nothing of it reaches the client."""
        ...


@dataclass(frozen=True, slots=True)
class Budget:
    """A request's time: its clock, when it must be over, and the cap on one attempt."""

    clock: Clock
    deadline: float  # epoch seconds: no attempt starts that could outlive it
    attempt_s: float  # one attempt, until the node's response head


@dataclass(slots=True)
class ForwardResult:
    """How forwarding ended: `node` answered and `head` (with its response) is the answer to
    relay, or nobody did (`node` None: the client gets a 503 with `retry_after_s`)."""

    attempts: list[Attempt] = field(default_factory=list)
    node: int | None = None
    head: Head | None = None
    client_gone: bool = False
    retry_after_s: int | None = None  # for the 503 when every node failed

    @property
    def response(self) -> object:
        """The chosen node's response, as the shell's Upstream made it (None if no node)."""
        return None if self.head is None else self.head.response


async def forward(
    plan: Plan, upstream: Upstream, sync: HealthSync, budget: Budget
) -> ForwardResult:
    """Try `plan.nodes` in order. Each node at most once; no attempt past the deadline; a
    failed node is marked down at once in `sync.view` (so concurrent requests in this
    isolate skip it); the client leaving stops everything without blaming the node."""
    clock, view, policy = budget.clock, sync.view, sync.policy
    out = ForwardResult()
    for n in plan.nodes:
        started = clock()
        remaining = budget.deadline - started
        if remaining <= MIN_ATTEMPT_S:
            break
        result = await upstream.head(n, min(budget.attempt_s, remaining))
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
                upstream.discard(result)
            view.apply(n, health.on_failure(view.get(n), now, a.reason, policy, a.retry_after_s))
            continue
        if view.get(n).state != "up":
            view.apply(n, health.on_success(view.get(n), now, ms))
        out.node, out.head = n, result
        return out
    out.retry_after_s = retry_after(view, plan.nodes, clock(), policy)
    return out


def retry_after(
    view: health.HealthView, nodes: tuple[int, ...], now: float, policy: HealthPolicy
) -> int:
    """Seconds until the first of these nodes leaves its cooldown (at least 1)."""
    ends = [view.get(n).until for n in nodes if view.is_down(n, now)]
    if not ends:
        return int(policy.cooldown_base_s)
    # Rounded first: (t + 120) - t is 120.00000000000001 in floats, which ceil makes 121.
    return max(1, math.ceil(round(min(e for e in ends if e is not None) - now, 3)))


def cut(
    node: int, sync: HealthSync, now: float, ms: float, reason: str = "upstream_disconnected"
) -> Attempt:
    """The node's body broke (or, `upstream_idle`, went silent for STREAM_IDLE_S) after its
    head was relayed: a node failure like any other."""
    view = sync.view
    view.apply(node, health.on_failure(view.get(node), now, "cut", sync.policy))
    return Attempt(node, "cut", reason, None, round(max(0.0, ms), 1))
