"""The scheduled health check: probe the nodes that need it, record the answers in health.

Pure logic over a `Prober` (the shell's GET with a head time-out). Budget: ngrok's free plan
allows 20,000 requests a month per account and every probe counts, so healthy nodes are
probed sparsely (docs/budgets.md has the arithmetic).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import health
from attempt import Head
from config import GatewayConfig
from heady_shared import capabilities
from heady_shared.failures import match
from heady_shared.metrics import queue_depth, served_model
from heady_shared.schedule import cron_period_s


class Prober(Protocol):
    async def get(self, node: int, path: str, timeout_s: float) -> tuple[Head, str] | str:
        """(head, body text) of a GET to the node, or a no-response kind."""
        ...


@dataclass(frozen=True, slots=True)
class ProbeResult:
    node: int
    ok: bool
    reason: str
    ms: float | None = None
    load: int | None = None
    model: str | None = None  # the node's model id from its metrics labels
    # What the node reports it serves (heady_shared.capabilities); None: it says nothing
    capabilities: tuple[str, ...] | None = None

    def log(self) -> dict[str, object]:
        return {
            "node": self.node,
            "ok": self.ok,
            "reason": self.reason,
            "ms": self.ms,
            "load": self.load,
            "model": self.model,
            "capabilities": list(self.capabilities) if self.capabilities is not None else None,
        }


def nodes_to_probe(
    config: GatewayConfig, view: health.HealthView, scheduled_s: float, period_s: float
) -> list[int]:
    """Down or unknown nodes every run; healthy ones once per `probe_up_every_s`, chosen by
    the scheduled time alone so the decision needs no stored state."""
    every = config.health.probe_up_every_s
    due_up = int(scheduled_s // every) != int((scheduled_s - period_s) // every)
    chosen = []
    for node in config.nodes:
        if not node.usable:
            continue
        state = view.effective_state(node.number, scheduled_s)
        if state != "up" or due_up:
            chosen.append(node.number)
    return chosen


async def probe(
    config: GatewayConfig, prober: Prober, node: int, clock: Callable[[], float]
) -> ProbeResult:
    """GET the health path; a 2xx is up. The load comes from its body when it carries one,
    else from the metrics path (vLLM's /health has an empty body), which also names the model
    and what the node serves (its capability gauges)."""
    policy = config.health
    started = clock()
    got = await prober.get(node, policy.probe_path, policy.probe_timeout_s)
    ms = round(max(0.0, clock() - started) * 1000, 1)
    failure = _failure(got)
    if failure:
        return ProbeResult(node, False, failure)
    head, text = got  # type: ignore[misc]
    load = queue_depth(text, head.fields.get("content-type"))
    model = None
    found = None
    if load is None and policy.metrics_path:
        metrics = await prober.get(node, policy.metrics_path, policy.probe_timeout_s)
        if not _failure(metrics):
            mhead, mtext = metrics  # type: ignore[misc]
            load = queue_depth(mtext, mhead.fields.get("content-type"))
            model = served_model(mtext)
            found = capabilities.parse(mtext)
    return ProbeResult(node, True, "ok", ms, load, model, found)


def _failure(got: tuple[Head, str] | str) -> str | None:
    if isinstance(got, str):
        return got
    head = got[0]
    rule = match(head.status, head.fields)
    if rule:
        return rule.reason
    return None if 200 <= head.status < 300 else f"http_{head.status}"


def record_probes(
    view: health.HealthView, results: list[ProbeResult], now: float, config: GatewayConfig
) -> None:
    """Apply probe results to the view (transitions mark it dirty for the KV write)."""
    for r in results:
        old = view.get(r.node)
        new = (
            health.on_success(old, now, r.ms)
            if r.ok
            else health.on_failure(old, now, r.reason, config.health)
        )
        new = health.with_probe(new, now, r.load, r.ms, r.model, r.capabilities)
        news = (
            (r.load is not None and r.load != old.load)
            or (r.model not in (None, old.model))
            or (r.capabilities is not None and r.capabilities != old.capabilities)
        )
        if not view.apply(r.node, new) and news:
            # A changed load steers balancing elsewhere, a new model id is shown to clients,
            # changed capabilities decide which requests may go there: all worth sharing.
            view.dirty = True
            view.changes += 1


async def probe_all(
    config: GatewayConfig,
    view: health.HealthView,
    prober: Prober,
    scheduled_s: float,
    cron: str | None,
    clock: Callable[[], float],
) -> list[ProbeResult]:
    """One cron run's probes, all in parallel, recorded in the view."""
    targets = nodes_to_probe(config, view, scheduled_s, cron_period_s(cron))
    results = list(await asyncio.gather(*(probe(config, prober, n, clock) for n in targets)))
    record_probes(view, results, clock(), config)
    return results
