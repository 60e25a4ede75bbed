"""Gateway configuration: Worker vars and secrets (plain strings) -> a validated GatewayConfig.

Pure: no `js` import. Every problem is reported as a readable message; a bad value never
raises out of `load_config`. Node URLs and tokens are secrets, so no message quotes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from heady_shared.endpoints import EndpointState, parse_endpoint
from heady_shared.routes import NODE_NUMBERS, Pool, endpoint_key, parse_routes
from settings import BY_NAME


@dataclass(frozen=True, slots=True)
class Node:
    """One GPU node slot. `base_url` is a secret: never log or return it."""

    number: int
    config: EndpointState
    base_url: str | None = None
    reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.config == "configured"


@dataclass(frozen=True, slots=True)
class Timeouts:
    attempt_s: float  # per attempt: until the node's response headers
    deadline_s: float  # whole request, all attempts together
    per_role_attempt_s: Mapping[str, float] = field(default_factory=dict)
    upload_s: float = 60.0  # the client's whole upload; the node's clock starts after it

    def attempt_for(self, role: str) -> float:
        return self.per_role_attempt_s.get(role, self.attempt_s)


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    cooldown_base_s: float = 30.0
    cooldown_max_s: float = 600.0
    # Failures keep counting across a recovery shorter than this, so a flapping node's
    # cooldown keeps growing instead of restarting at the base every cycle.
    stable_after_s: float = 1800.0
    refresh_s: float = 30.0  # isolate memory -> KV re-read at most this often
    min_write_interval_s: float = 120.0  # KV write economy: docs/budgets.md
    probe_path: str = "/health"
    metrics_path: str | None = "/metrics"
    probe_timeout_s: float = 5.0
    probe_up_every_s: float = 1800.0  # healthy nodes are probed this sparsely
    kv_timeout_s: float = 1.0  # KV is a hint: a slower read or write is given up


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    nodes: tuple[Node, ...]
    pools: Mapping[str, Pool]
    api_keys: tuple[str, ...]
    auth_disabled: bool
    node_token: str | None
    timeouts: Timeouts
    health: HealthPolicy
    max_body_bytes: int
    max_attempts: int
    cors_origins: tuple[str, ...]  # ("*",) allows any origin
    upstream_paths: tuple[str, ...]  # forwarded path prefixes ("/v1/") or exact paths
    problems: tuple[str, ...]  # non-fatal: reported in /api/status
    fatal: tuple[str, ...]  # the gateway cannot route at all: heavy routes answer 503

    def node(self, number: int) -> Node:
        return self.nodes[number - 1]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.pools)


def _flag(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


def _number(env: Mapping[str, str | None], name: str, problems: list[str]) -> float:
    """A numeric setting within its declared bounds; its default (and a problem) otherwise."""
    spec = BY_NAME[name]
    default, lo, hi = float(spec.default), float(spec.lo), float(spec.hi)  # type: ignore[arg-type]
    raw = env.get(name)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = float(str(raw).strip())
    except ValueError:
        problems.append(f"{name}: {raw!r} is not a number; using {default:g}")
        return default
    if not math.isfinite(value) or not lo <= value <= hi:
        problems.append(f"{name}: {value:g} is outside {lo:g}..{hi:g}; using {default:g}")
        return default
    return value


def _role_timeouts(raw: str | None, problems: list[str]) -> dict[str, float]:
    if raw is None or not raw.strip():
        return {"batch": 600.0}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        problems.append("ROLE_TIMEOUTS_S: not valid JSON; using defaults")
        return {"batch": 600.0}
    out: dict[str, float] = {}
    if not isinstance(data, dict):
        problems.append('ROLE_TIMEOUTS_S: expected an object such as {"batch": 600}')
        return {"batch": 600.0}
    for role, value in data.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not 1 <= value <= 3600:
            problems.append(f"ROLE_TIMEOUTS_S.{role}: expected seconds 1..3600; ignored")
            continue
        out[str(role)] = float(value)
    return out


def _upstream_paths(raw: str | None, problems: list[str]) -> tuple[str, ...]:
    """UPSTREAM_PATHS: "/v1/" forwards everything below /v1; "/tokenize" only that path."""
    default = (str(BY_NAME["UPSTREAM_PATHS"].default),)
    if raw is None or not raw.strip():
        return default
    out = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        ok = (
            item.startswith("/")
            and item != "/"
            and "//" not in item
            and all(seg not in (".", "..") for seg in item.split("/"))
            and all(c.isascii() and (c.isalnum() or c in "/-_.") for c in item)
        )
        if not ok:
            problems.append(f"UPSTREAM_PATHS: {item[:40]!r} is not an absolute path; ignored")
            continue
        out.append(item)
    if not out:
        problems.append("UPSTREAM_PATHS: no usable path; using /v1/")
        return default
    return tuple(out)


def load_config(env: Mapping[str, str | None]) -> GatewayConfig:
    """Build the configuration from the Worker's vars and secrets, never raising."""
    problems: list[str] = []
    nodes = []
    for n in NODE_NUMBERS:
        ep = parse_endpoint(env.get(endpoint_key(n)))
        nodes.append(Node(n, ep.state, ep.base_url, ep.reason))
        if ep.state == "invalid":
            problems.append(f"{endpoint_key(n)}: {ep.reason}")

    pools, route_errors = parse_routes(env.get("ROUTES"))
    keys = tuple(
        k.strip()
        for k in (env.get("GATEWAY_API_KEYS") or "").replace("\n", ",").split(",")
        if k.strip()
    )
    auth_disabled = _flag(env.get("AUTH_DISABLED"))
    token = (env.get("NODE_TOKEN") or "").strip() or None
    if token is not None and any(ord(c) < 0x20 or ord(c) > 0x7E for c in token):
        problems.append("NODE_TOKEN: contains characters not allowed in a header; not sent")
        token = None

    attempt = _number(env, "ATTEMPT_TIMEOUT_S", problems)
    deadline = _number(env, "DEADLINE_S", problems)
    per_role = _role_timeouts(env.get("ROLE_TIMEOUTS_S"), problems)
    base = _number(env, "COOLDOWN_BASE_S", problems)
    cap = _number(env, "COOLDOWN_MAX_S", problems)
    if cap < base:
        problems.append("COOLDOWN_MAX_S is below COOLDOWN_BASE_S; using the base for both")
        cap = base
    probe_path = (env.get("HEALTH_PATH") or "").strip() or "/health"
    if not probe_path.startswith("/") or "//" in probe_path or ".." in probe_path:
        problems.append("HEALTH_PATH: must be an absolute path such as /health; using /health")
        probe_path = "/health"
    metrics_raw = env.get("METRICS_PATH")
    metrics_path: str | None = "/metrics" if metrics_raw is None else metrics_raw.strip() or None
    if metrics_path is not None and (
        not metrics_path.startswith("/") or "//" in metrics_path or ".." in metrics_path
    ):
        problems.append("METRICS_PATH: must be an absolute path or empty; using /metrics")
        metrics_path = "/metrics"
    health = HealthPolicy(
        cooldown_base_s=base,
        cooldown_max_s=cap,
        stable_after_s=_number(env, "STABLE_AFTER_S", problems),
        refresh_s=_number(env, "HEALTH_REFRESH_S", problems),
        min_write_interval_s=_number(env, "KV_MIN_WRITE_INTERVAL_S", problems),
        probe_path=probe_path,
        metrics_path=metrics_path,
        probe_timeout_s=_number(env, "PROBE_TIMEOUT_S", problems),
        probe_up_every_s=_number(env, "PROBE_UP_EVERY_S", problems),
        kv_timeout_s=_number(env, "KV_TIMEOUT_S", problems),
    )
    max_body = int(_number(env, "MAX_BODY_BYTES", problems))
    max_attempts = int(_number(env, "MAX_ATTEMPTS", problems))
    origins_raw = (env.get("CORS_ORIGINS") or "*").strip()
    origins = tuple(o.strip().rstrip("/") for o in origins_raw.split(",") if o.strip()) or ("*",)

    upstream_paths = _upstream_paths(env.get("UPSTREAM_PATHS"), problems)

    fatal = [*route_errors]
    return GatewayConfig(
        nodes=tuple(nodes),
        pools=pools,
        api_keys=keys,
        auth_disabled=auth_disabled,
        node_token=token,
        timeouts=Timeouts(
            attempt, max(deadline, 1.0), per_role, _number(env, "UPLOAD_TIMEOUT_S", problems)
        ),
        health=health,
        max_body_bytes=max_body,
        max_attempts=max_attempts,
        cors_origins=origins,
        upstream_paths=upstream_paths,
        problems=tuple(problems),
        fatal=tuple(fatal),
    )
