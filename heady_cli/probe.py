"""`heady probe`: check every configured node concurrently and say which roles are covered.

The roles (ROUTES) and the paths asked (HEALTH_PATH, METRICS_PATH) are read from the same vars,
by the same heady_shared functions, as the gateway reads them. `read_setup`, `diagnose`, `plan`
and `uncovered_roles` are pure (tested on canned responses); `probe_node` is the thin httpx shell.
"""

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from heady_cli.config import CliError, mask_url, validate_url
from heady_shared import capabilities as caps
from heady_shared.failures import EXPLAIN, HEAD_FIELDS, match
from heady_shared.metrics import WAITING, gauge, parse_metrics
from heady_shared.probes import parse_health_path, parse_metrics_path
from heady_shared.routes import (
    DEFAULT_POOLS,
    NODE_NUMBERS,
    Pool,
    endpoint_key,
    parse_routes,
    role_of,
)

NGROK_SKIP = {"ngrok-skip-browser-warning": "1"}


@dataclass(frozen=True)
class Setup:
    """What the gateway would read from the same vars: the role table and the probe paths."""

    pools: Mapping[str, Pool]
    health_path: str
    metrics_path: str | None  # None: the load is not read
    problems: tuple[str, ...]  # values the gateway would replace by their default


def read_setup(values: Mapping[str, str]) -> Setup:
    """ROUTES, HEALTH_PATH and METRICS_PATH as the gateway reads them. A bad ROUTES leaves the
    gateway nothing to route by, so it is an error here; a bad path falls back, as there."""
    pools, errors = parse_routes(values.get("ROUTES"))
    if errors:
        raise CliError("; ".join(errors))
    health, health_problem = parse_health_path(values.get("HEALTH_PATH"))
    metrics, metrics_problem = parse_metrics_path(values.get("METRICS_PATH"))
    problems = tuple(p for p in (health_problem, metrics_problem) if p)
    return Setup(pools, health, metrics, problems)


@dataclass(frozen=True)
class NodeResult:
    node: int
    role: str | None  # the role whose pair holds the node; None for a fallback-only node
    state: str  # up | down | unconfigured | invalid
    url: str | None = None
    latency_ms: float | None = None
    model: str | None = None
    queue: int | None = None
    reason: str | None = None
    # What the node reports it serves in its metrics, as the gateway's cron reads it
    capabilities: tuple[str, ...] | None = None

    def as_dict(self, show_secrets: bool) -> dict[str, object]:
        d = dict(self.__dict__)
        d["url"] = self.url if show_secrets or not self.url else mask_url(self.url)
        return d


def diagnose(status: int, headers: Mapping[str, str], body: str) -> str | None:
    """Why an HTTP answer is not a usable node answer (None when it is fine)."""
    h = {k.lower(): v for k, v in headers.items()}
    # The gateway's own failure rules first, so `heady probe` and the gateway agree.
    rule = match(status, {f: h.get(f) for f in HEAD_FIELDS})
    if rule is not None:
        code = h.get("ngrok-error-code")
        return f"{rule.explain} ({code or status})"
    if "error code: 1033" in body:
        return EXPLAIN["tunnel_down"] + " (1033)"
    if "text/html" in h.get("content-type", "") and "ngrok" in body.lower():
        return "ngrok browser-warning page: ngrok-skip-browser-warning header not honoured"
    if status in (401, 403):
        return f"HTTP {status}: NODE_TOKEN rejected (must equal the notebook's NODE_TOKEN)"
    if not 200 <= status < 300:
        return f"HTTP {status}"
    return None


def parse_models(body: str) -> str:
    """First model id from /v1/models; ValueError for anything else."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError("malformed JSON from /v1/models") from exc
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise ValueError("/v1/models lists no model")
    return str(items[0].get("id", "?"))


def error_reason(exc: Exception, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host unreachable"
    if isinstance(exc, httpx.HTTPError):
        return f"network error ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


async def probe_node(
    client: httpx.AsyncClient, node: int, url: str, token: str, timeout: float, setup: Setup
) -> NodeResult:
    role = role_of(node, setup.pools)
    down = {"node": node, "role": role, "state": "down", "url": url}
    headers = {**NGROK_SKIP, "Authorization": f"Bearer {token}"}
    try:
        start = time.perf_counter()
        health_url = f"{url}{setup.health_path}"
        health = await client.get(health_url, headers=headers, timeout=timeout)
        latency = (time.perf_counter() - start) * 1000
        if why := diagnose(health.status_code, health.headers, health.text):
            return NodeResult(**down, latency_ms=latency, reason=f"{setup.health_path}: {why}")
        models = await client.get(f"{url}/v1/models", headers=headers, timeout=timeout)
        if why := diagnose(models.status_code, models.headers, models.text):
            return NodeResult(**down, latency_ms=latency, reason=f"/v1/models: {why}")
        try:
            model = parse_models(models.text)
        except ValueError as exc:
            return NodeResult(**down, latency_ms=latency, reason=str(exc))
        queue = found = None
        try:  # queue depth is informative only: a node without metrics is still up
            if setup.metrics_path is not None:
                metrics_url = f"{url}{setup.metrics_path}"
                metrics = await client.get(metrics_url, headers=headers, timeout=timeout)
                if metrics.status_code == 200:
                    queue = gauge(parse_metrics(metrics.text), WAITING)
                    found = caps.parse(metrics.text)
        except httpx.HTTPError:
            pass
        return NodeResult(node, role, "up", url, latency, model, queue, capabilities=found)
    except Exception as exc:  # any failure of one node must not sink the whole probe
        return NodeResult(**down, reason=error_reason(exc, timeout))


def plan(
    raw: Mapping[int, str], pools: Mapping[str, Pool] = DEFAULT_POOLS
) -> tuple[dict[int, str], list[NodeResult]]:
    """Split configured nodes into probe targets and results known without the network."""
    targets: dict[int, str] = {}
    fixed: list[NodeResult] = []
    for node in NODE_NUMBERS:
        role = role_of(node, pools)
        if node not in raw:
            fixed.append(
                NodeResult(node, role, "unconfigured", reason=f"{endpoint_key(node)} not set")
            )
            continue
        try:
            targets[node] = validate_url(raw[node])
        except ValueError as exc:
            fixed.append(NodeResult(node, role, "invalid", raw[node], reason=str(exc)))
    return targets, fixed


def uncovered_roles(
    results: list[NodeResult], pools: Mapping[str, Pool] = DEFAULT_POOLS
) -> list[str]:
    """Roles whose own pair has no healthy node (the fallback chain is not counted)."""
    up = {r.node for r in results if r.state == "up"}
    return [role for role, pool in pools.items() if not up.intersection(pool.pair)]


async def probe_all(
    targets: Mapping[int, str], token: str, timeout: float, setup: Setup, on_done=None
) -> list[NodeResult]:
    async with httpx.AsyncClient(follow_redirects=False) as client:

        async def one(node: int, url: str) -> NodeResult:
            result = await probe_node(client, node, url, token, timeout, setup)
            if on_done:
                on_done(result)
            return result

        return list(await asyncio.gather(*(one(n, u) for n, u in targets.items())))
