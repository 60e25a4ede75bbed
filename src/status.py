"""The body of GET /api/status: every node's configuration and health, the route table and
the configuration problems. Pure; no URL or token ever appears in it."""

from __future__ import annotations

import time

import health
from config import GatewayConfig
from routing import route_table


def status_body(
    config: GatewayConfig,
    view: health.HealthView,
    now: float,
    request_id: str,
    version: str,
    batches: dict[str, object] | None = None,
) -> dict[str, object]:
    """`batches`: batches.status_view for the calling key (None: the batch storage could not
    be read)."""
    nodes = []
    for node in config.nodes:
        h = view.get(node.number)
        nodes.append(
            {
                "node": node.number,
                "roles": [p.role for p in config.pools.values() if node.number in p.pair],
                "config": node.config,
                "config_reason": node.reason,
                "state": view.effective_state(node.number, now) if node.usable else "unknown",
                "since": iso(h.since),
                "until": iso(h.until) if view.is_down(node.number, now) else None,
                "reason": h.reason,
                "failures": h.failures,
                "latency_ms": h.latency_ms,
                "load": view.load(node.number, now),
                "model": h.model,
                # What the node reports it serves (null: not known yet); routing keeps
                # requests that need a capability off nodes without it.
                "capabilities": list(h.capabilities) if h.capabilities is not None else None,
                "checked_at": iso(h.checked_at),
            }
        )
    return {
        "gateway": {
            "version": version,
            "request_id": request_id,
            "auth": "disabled" if config.auth_disabled else "on",
            "time": iso(now),
            # How streams are relayed and when a silent one ends (docs/configuration.md).
            "stream_relay": config.stream_relay,
            "stream_idle_s": config.timeouts.stream_idle_s,
        },
        "nodes": nodes,
        "routes": route_table(config.pools),
        "problems": list(config.problems) + list(config.fatal),
        "batches": batches,
    }


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
