"""heady_shared.probes: the health and metrics paths the gateway and `heady probe` ask a node on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import load_config
from heady_shared.probes import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_METRICS_PATH,
    parse_health_path,
    parse_metrics_path,
)


def test_defaults_are_vllms_routes():
    assert (DEFAULT_HEALTH_PATH, DEFAULT_METRICS_PATH) == ("/health", "/metrics")


@pytest.mark.parametrize(
    ("raw", "path", "problem"),
    [
        (None, "/health", False),
        ("/healthz", "/healthz", False),
        (" /v1/models ", "/v1/models", False),
        ("", "/health", False),
        ("   ", "/health", False),  # blank: unset, like every other setting
        ("health", "/health", True),
        ("//evil.example/x", "/health", True),
        ("/a/../b", "/health", True),
        ("https://other.example/health", "/health", True),
    ],
)
def test_health_path(raw, path, problem):
    got, why = parse_health_path(raw)
    assert got == path
    assert (why is not None) is problem
    assert why is None or (why.startswith("HEALTH_PATH: ") and why.endswith("using /health"))


@pytest.mark.parametrize(
    ("raw", "path", "problem"),
    [
        (None, "/metrics", False),
        ("", None, False),  # set but empty: no load read at all
        ("   ", None, False),
        ("/stats", "/stats", False),
        (" /stats ", "/stats", False),
        ("metrics", "/metrics", True),
        ("/../metrics", "/metrics", True),
    ],
)
def test_metrics_path(raw, path, problem):
    got, why = parse_metrics_path(raw)
    assert got == path
    assert (why is not None) is problem
    assert why is None or (why.startswith("METRICS_PATH: ") and why.endswith("using /metrics"))


paths = st.one_of(st.none(), st.text(alphabet="/.ab -:", max_size=12), st.text(max_size=12))


@given(paths, paths)
@settings(max_examples=300, deadline=None)
def test_the_gateway_reads_the_same_paths(health_raw, metrics_raw):
    # The gateway's config and `heady probe` must ask a node on the same paths, with the same
    # problem line for a bad value.
    env = {"HEALTH_PATH": health_raw, "METRICS_PATH": metrics_raw}
    cfg = load_config(env)
    health, health_problem = parse_health_path(health_raw)
    metrics, metrics_problem = parse_metrics_path(metrics_raw)
    assert (cfg.health.probe_path, cfg.health.metrics_path) == (health, metrics)
    mine = [p for p in cfg.problems if p.startswith(("HEALTH_PATH", "METRICS_PATH"))]
    assert mine == [p for p in (health_problem, metrics_problem) if p]
