"""Active health checks (the cron): which nodes to probe, and what a probe answer means.

Pure. Budget: ngrok's free plan allows 20,000 requests a month per account, and every probe
counts, so healthy nodes are probed sparsely (see README for the arithmetic).
"""

from __future__ import annotations

import json
import math
import re

from config import GatewayConfig
from health import HealthView

_WAITING = re.compile(r"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)
_RUNNING = re.compile(r"^vllm:num_requests_running(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)
UNKNOWN_PERIOD_S = 86400.0
QUEUE_KEYS = ("queue_depth", "queue", "num_requests_waiting", "waiting", "pending")


def cron_period_s(cron: str | None) -> float:
    """Seconds between cron runs for '* * * * *', '*/N * * * *' and 'M * * * *' (hourly).

    Any other form counts as a day: overestimating the period only means healthy nodes are
    probed on every run (more probes), while underestimating it could skip their slot forever.
    """
    fields = (cron or "").split()
    if len(fields) != 5 or any(f != "*" for f in fields[1:]):
        return UNKNOWN_PERIOD_S
    minute = fields[0]
    if minute == "*":
        return 60.0
    if minute.startswith("*/") and minute[2:].isdigit() and 0 < int(minute[2:]) <= 60:
        return 60.0 * int(minute[2:])
    if minute.isdigit() and int(minute) < 60:
        return 3600.0
    return UNKNOWN_PERIOD_S


def nodes_to_probe(
    config: GatewayConfig, view: HealthView, scheduled_s: float, period_s: float
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


def parse_load(body: str, content_type: str | None) -> int | None:
    """Queue depth from vLLM's Prometheus text or a JSON health answer; None if absent."""
    if not body:
        return None
    if (content_type and "json" in content_type) or body.lstrip().startswith("{"):
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if isinstance(data, dict):
            for key in QUEUE_KEYS:
                value = data.get(key)
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if number and 0 <= value < math.inf:  # Infinity/1e999 would crash int()
                    return int(value)
        return None
    waiting = _sum(_WAITING.findall(body))
    if waiting is None:
        return None
    return waiting


def _sum(values: list[str]) -> int | None:
    if not values:
        return None
    total = 0.0
    for v in values:
        try:
            total += float(v)
        except ValueError:
            return None
    return int(total) if 0 <= total < math.inf else None


def running(body: str) -> int | None:
    return _sum(_RUNNING.findall(body))
