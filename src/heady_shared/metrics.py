"""A node's load from vLLM's Prometheus `/metrics` text (or a JSON health answer).

vLLM exports `vllm:num_requests_waiting` / `vllm:num_requests_running` gauges, one sample per
model label set (vllm/v1/metrics/loggers.py). A node's load is its queue depth: the waiting
gauge summed over label sets; requests already running are not counted.
"""

from __future__ import annotations

import json
import math
import re

# name, optional {labels} (may contain spaces inside quotes), value, optional timestamp
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(\S+)(?:\s+\S+)?$")
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
# A vision node's image engine queues beside vLLM and reports it the same way
# (heady_node.image_queue): its waiting jobs count in the node's queue depth too.
IMAGES_WAITING = "heady_images:num_requests_waiting"
# Keys a non-vLLM JSON health answer may carry its queue depth under.
QUEUE_KEYS = ("queue_depth", "queue", "num_requests_waiting", "waiting", "pending")
# The largest queue depth believed, from a node or from the shared KV record (src/health.py):
# beyond any real queue, and far below 2**53, so it stays an exact int in JSON and in JS.
MAX_LOAD = 10**9
# vLLM labels its metrics with the first --served-model-name (vllm/v1/metrics/loggers.py,
# labelnames=["model_name", ...]): the node's own model id, for the x-heady-model header.
_MODEL_LABEL = re.compile(r'^vllm:[A-Za-z0-9_:]+\{[^}]*\bmodel_name="([^"\\]{1,128})"', re.M)


def parse_metrics(text: str) -> dict[str, float]:
    """Metric name -> value summed over label sets; unparseable and non-finite samples dropped."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isfinite(value):
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + value
    return totals


def gauge(metrics: dict[str, float], name: str) -> int | None:
    """A count-like metric as a non-negative int, or None if absent or absurd."""
    value = metrics.get(name)
    if value is None or not 0 <= value <= MAX_LOAD:
        return None
    return int(value)


def queue_depth(body: str, content_type: str | None) -> int | None:
    """Queue depth from Prometheus text or a JSON object; None if the answer carries none."""
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
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return int(value) if 0 <= value <= MAX_LOAD else None
        return None
    metrics = parse_metrics(body)
    waiting = gauge(metrics, WAITING)
    images = gauge(metrics, IMAGES_WAITING)
    if waiting is None or images is None:
        return waiting
    return min(waiting + images, MAX_LOAD)


def served_model(text: str) -> str | None:
    """The model id a vLLM node reports in its metrics labels (printable ASCII), or None."""
    m = _MODEL_LABEL.search(text)
    if m is None:
        return None
    name = m.group(1)
    return name if all(0x20 < ord(c) < 0x7F for c in name) else None
