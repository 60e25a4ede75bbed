"""The paths a node is asked on besides the API: its health and its metrics.

The gateway's cron (HEALTH_PATH, METRICS_PATH) and `heady probe` read them alike, so the operator
probes exactly what the gateway probes. A bad value falls back to the default with a problem
line, never an exception: the gateway lists it in /api/status, the CLI prints it as a warning.
"""

from __future__ import annotations

DEFAULT_HEALTH_PATH = "/health"  # vLLM's liveness route: 200 once the engine serves
DEFAULT_METRICS_PATH = "/metrics"  # vLLM's Prometheus route: queue depth (heady_shared.metrics)


def _absolute(path: str) -> bool:
    return path.startswith("/") and "//" not in path and ".." not in path


def parse_path(name: str, raw: str | None, default: str) -> tuple[str, str | None]:
    """A path setting -> (path, problem or None); unset or blank means the default."""
    path = (raw or "").strip() or default
    if not _absolute(path):
        return default, f"{name}: must be an absolute path such as {default}; using {default}"
    return path, None


def parse_optional_path(name: str, raw: str | None, default: str) -> tuple[str | None, str | None]:
    """A path setting that may be switched off -> (path or None, problem or None); unset means
    the default, set but empty means none."""
    path = default if raw is None else raw.strip() or None
    if path is not None and not _absolute(path):
        return default, f"{name}: must be an absolute path or empty; using {default}"
    return path, None


def parse_health_path(raw: str | None) -> tuple[str, str | None]:
    """HEALTH_PATH -> (path, problem or None)."""
    return parse_path("HEALTH_PATH", raw, DEFAULT_HEALTH_PATH)


def parse_metrics_path(raw: str | None) -> tuple[str | None, str | None]:
    """METRICS_PATH -> (path, problem or None); empty: the load is not read at all."""
    return parse_optional_path("METRICS_PATH", raw, DEFAULT_METRICS_PATH)
