"""The paths a node is asked on besides the API: its health and its metrics.

The gateway's cron (HEALTH_PATH, METRICS_PATH) and `heady probe` read them alike, so the operator
probes exactly what the gateway probes. A bad value falls back to the default with a problem
line, never an exception: the gateway lists it in /api/status, the CLI prints it as a warning.
"""

from __future__ import annotations

DEFAULT_HEALTH_PATH = "/health"  # vLLM's liveness route: 200 once the engine serves
DEFAULT_METRICS_PATH = "/metrics"  # vLLM's Prometheus route: queue depth (heady_shared.metrics)


def parse_health_path(raw: str | None) -> tuple[str, str | None]:
    """HEALTH_PATH -> (path, problem or None); unset or empty means the default."""
    path = (raw or DEFAULT_HEALTH_PATH).strip()
    if not path.startswith("/") or "//" in path or ".." in path:
        why = f"must be an absolute path such as {DEFAULT_HEALTH_PATH}"
        return DEFAULT_HEALTH_PATH, f"HEALTH_PATH: {why}; using {DEFAULT_HEALTH_PATH}"
    return path, None


def parse_metrics_path(raw: str | None) -> tuple[str | None, str | None]:
    """METRICS_PATH -> (path, problem or None); unset means the default, set but empty means
    none: the load is then not read at all."""
    path = DEFAULT_METRICS_PATH if raw is None else raw.strip() or None
    if path is not None and (not path.startswith("/") or ".." in path):
        why = "must be an absolute path or empty"
        return DEFAULT_METRICS_PATH, f"METRICS_PATH: {why}; using {DEFAULT_METRICS_PATH}"
    return path, None
