"""Gateway configuration: Worker vars and secrets (plain strings) -> a validated GatewayConfig.

Pure: no `js` import. Every problem is reported as a readable message; a bad value never
raises out of `load_config`. Node URLs and tokens are secrets, so no message quotes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

NODE_NUMBERS = tuple(range(1, 9))
DEFAULT_ROUTES: dict[str, tuple[int, ...]] = {
    "reasoning": (1, 2),
    "code": (3, 4),
    "vision": (5, 6),
    "batch": (7, 8),
}
DEFAULT_FALLBACK: tuple[int, ...] = (1, 2)
MAX_URL_LENGTH = 2048

NodeConfigState = Literal["configured", "invalid", "unconfigured"]


@dataclass(frozen=True, slots=True)
class Node:
    """One GPU node slot. `base_url` is a secret: never log or return it."""

    number: int
    config: NodeConfigState
    base_url: str | None = None
    reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.config == "configured"


@dataclass(frozen=True, slots=True)
class Pool:
    """A role's routing: the balanced pair first, then the fallback chain."""

    role: str
    pair: tuple[int, ...]
    fallback: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Timeouts:
    attempt_s: float  # per attempt: until the node's response headers
    deadline_s: float  # whole request, all attempts together
    per_role_attempt_s: Mapping[str, float] = field(default_factory=dict)

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
    min_write_interval_s: float = 120.0  # KV write economy, see README
    probe_path: str = "/health"
    metrics_path: str | None = "/metrics"
    probe_timeout_s: float = 5.0
    probe_up_every_s: float = 1800.0  # healthy nodes are probed this sparsely


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
    problems: tuple[str, ...]  # non-fatal: reported in /api/status
    fatal: tuple[str, ...]  # the gateway cannot route at all: heavy routes answer 503

    def node(self, number: int) -> Node:
        return self.nodes[number - 1]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.pools)


def parse_endpoint(raw: str | None) -> tuple[NodeConfigState, str | None, str | None]:
    """Validate one COLAB_ENDPOINT_n value -> (state, normalised base URL, reason)."""
    if raw is None or not raw.strip():
        return "unconfigured", None, "secret not set"
    value = raw.strip()
    if len(value) > MAX_URL_LENGTH:
        return "invalid", None, "URL too long"
    if any(ord(c) < 0x21 or c in '<>"\\^`{|}' for c in value):
        return "invalid", None, "URL contains spaces or characters not allowed in a URL"
    scheme, sep, rest = value.partition("://")
    if not sep:
        return "invalid", None, "URL needs a scheme (https://...)"
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        return "invalid", None, f"scheme {scheme!r} is not http or https"
    if "?" in rest or "#" in rest:
        return "invalid", None, "URL must not carry a query or fragment"
    authority, _, path = rest.partition("/")
    if "@" in authority:
        return "invalid", None, "URL must not carry credentials (user:password@)"
    host, colon, port = authority.rpartition(":") if _has_port(authority) else (authority, "", "")
    if not host or host.startswith(".") or host.endswith("."):
        return "invalid", None, "URL has no valid host"
    if colon and not (port.isdigit() and 0 < int(port) < 65536):
        return "invalid", None, "URL has an invalid port"
    path = "/".join(p for p in path.split("/") if p)  # trailing and doubled slashes dropped
    if any(seg in (".", "..") for seg in path.split("/")):
        return "invalid", None, "URL path must not contain '.' or '..' segments"
    base = f"{scheme}://{authority.lower()}" + (f"/{path}" if path else "")
    return "configured", base, None


def _has_port(authority: str) -> bool:
    if authority.startswith("["):  # IPv6 literal: a port follows the closing bracket
        return "]:" in authority
    return ":" in authority


def _flag(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


def _number(
    env: Mapping[str, str | None],
    name: str,
    default: float,
    problems: list[str],
    *,
    lo: float,
    hi: float,
) -> float:
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


def _node_list(value: object, where: str, errors: list[str]) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not value:
        errors.append(f"{where}: expected a non-empty list of node numbers 1-8")
        return None
    out: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item not in NODE_NUMBERS:
            errors.append(f"{where}: {item!r} is not a node number 1-8")
            return None
        if item in out:
            errors.append(f"{where}: node {item} is listed twice")
            return None
        out.append(item)
    return tuple(out)


def parse_routes(raw: str | None) -> tuple[dict[str, Pool], list[str]]:
    """ROUTES var -> pools. Shape: {"roles": {"code": [3, 4], ...}, "fallback": [1, 2]}.

    Either key may be omitted (defaults apply). Errors are returned, never raised.
    """
    roles = dict(DEFAULT_ROUTES)
    fallback = DEFAULT_FALLBACK
    errors: list[str] = []
    if raw is not None and raw.strip():
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            return {}, [f"ROUTES: not valid JSON ({exc.msg} at char {exc.pos})"]
        except (ValueError, RecursionError):  # e.g. a 5000-digit number, nesting too deep
            return {}, ["ROUTES: not valid JSON (a number too long or nesting too deep)"]
        if not isinstance(data, dict) or set(data) - {"roles", "fallback"}:
            return {}, ['ROUTES: expected an object with keys "roles" and/or "fallback"']
        if "roles" in data:
            if not isinstance(data["roles"], dict) or not data["roles"]:
                return {}, ['ROUTES.roles: expected an object such as {"code": [3, 4]}']
            roles = {}
            for name, nodes in data["roles"].items():
                if not _valid_role_name(name):
                    errors.append(f"ROUTES.roles: {name!r} is not a valid role name (a-z, 0-9, -)")
                    continue
                parsed = _node_list(nodes, f"ROUTES.roles.{name}", errors)
                if parsed is not None:
                    roles[name] = parsed
        if "fallback" in data:
            if data["fallback"] == []:
                fallback = ()
            else:
                parsed = _node_list(data["fallback"], "ROUTES.fallback", errors)
                fallback = parsed if parsed is not None else fallback
    if errors:
        return {}, errors
    pools = {name: Pool(name, pair, fallback) for name, pair in roles.items()}
    return pools, []


def _valid_role_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 32
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in name)
    )


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


def load_config(env: Mapping[str, str | None]) -> GatewayConfig:
    """Build the configuration from the Worker's vars and secrets, never raising."""
    problems: list[str] = []
    nodes = []
    for n in NODE_NUMBERS:
        state, base, reason = parse_endpoint(env.get(f"COLAB_ENDPOINT_{n}"))
        nodes.append(Node(n, state, base, reason))
        if state == "invalid":
            problems.append(f"COLAB_ENDPOINT_{n}: {reason}")

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

    attempt = _number(env, "ATTEMPT_TIMEOUT_S", 120.0, problems, lo=1, hi=3600)
    deadline = _number(env, "DEADLINE_S", 900.0, problems, lo=1, hi=7200)
    per_role = _role_timeouts(env.get("ROLE_TIMEOUTS_S"), problems)
    base = _number(env, "COOLDOWN_BASE_S", 30.0, problems, lo=1, hi=3600)
    cap = _number(env, "COOLDOWN_MAX_S", 600.0, problems, lo=1, hi=86400)
    if cap < base:
        problems.append("COOLDOWN_MAX_S is below COOLDOWN_BASE_S; using the base for both")
        cap = base
    probe_path = (env.get("HEALTH_PATH") or "/health").strip()
    if not probe_path.startswith("/") or "//" in probe_path or ".." in probe_path:
        problems.append("HEALTH_PATH: must be an absolute path such as /health; using /health")
        probe_path = "/health"
    metrics_raw = env.get("METRICS_PATH")
    metrics_path: str | None = "/metrics" if metrics_raw is None else metrics_raw.strip() or None
    if metrics_path is not None and (not metrics_path.startswith("/") or ".." in metrics_path):
        problems.append("METRICS_PATH: must be an absolute path or empty; using /metrics")
        metrics_path = "/metrics"
    health = HealthPolicy(
        cooldown_base_s=base,
        cooldown_max_s=cap,
        stable_after_s=_number(env, "STABLE_AFTER_S", 1800.0, problems, lo=0, hi=86400),
        refresh_s=_number(env, "HEALTH_REFRESH_S", 30.0, problems, lo=1, hi=3600),
        min_write_interval_s=_number(
            env, "KV_MIN_WRITE_INTERVAL_S", 120.0, problems, lo=1, hi=86400
        ),
        probe_path=probe_path,
        metrics_path=metrics_path,
        probe_timeout_s=_number(env, "PROBE_TIMEOUT_S", 5.0, problems, lo=0.5, hi=60),
        probe_up_every_s=_number(env, "PROBE_UP_EVERY_S", 1800.0, problems, lo=60, hi=86400),
    )
    max_body = int(
        _number(env, "MAX_BODY_BYTES", 10 * 1024 * 1024, problems, lo=0, hi=100 * 1024 * 1024)
    )
    max_attempts = int(_number(env, "MAX_ATTEMPTS", 4, problems, lo=1, hi=8))
    origins_raw = (env.get("CORS_ORIGINS") or "*").strip()
    origins = tuple(o.strip().rstrip("/") for o in origins_raw.split(",") if o.strip()) or ("*",)

    fatal = [*route_errors]
    return GatewayConfig(
        nodes=tuple(nodes),
        pools=pools,
        api_keys=keys,
        auth_disabled=auth_disabled,
        node_token=token,
        timeouts=Timeouts(attempt, max(deadline, 1.0), per_role),
        health=health,
        max_body_bytes=max_body,
        max_attempts=max_attempts,
        cors_origins=origins,
        problems=tuple(problems),
        fatal=tuple(fatal),
    )


CONFIG_KEYS = (
    *(f"COLAB_ENDPOINT_{n}" for n in NODE_NUMBERS),
    "ROUTES",
    "GATEWAY_API_KEYS",
    "AUTH_DISABLED",
    "NODE_TOKEN",
    "ATTEMPT_TIMEOUT_S",
    "DEADLINE_S",
    "ROLE_TIMEOUTS_S",
    "COOLDOWN_BASE_S",
    "COOLDOWN_MAX_S",
    "STABLE_AFTER_S",
    "HEALTH_REFRESH_S",
    "KV_MIN_WRITE_INTERVAL_S",
    "HEALTH_PATH",
    "METRICS_PATH",
    "PROBE_TIMEOUT_S",
    "PROBE_UP_EVERY_S",
    "MAX_BODY_BYTES",
    "MAX_ATTEMPTS",
    "CORS_ORIGINS",
)
