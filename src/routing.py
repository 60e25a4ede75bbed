"""Request routing: URL -> Route, and Route + health -> Plan (the ordered nodes to try).

Pure: decides from plain data only, so every rule is unit-tested in CPython.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

from config import GatewayConfig
from heady_shared.capabilities import LORA
from heady_shared.routes import Pool
from health import HealthView

# The prefix of the API the GPU nodes serve ("heavy": model work, as opposed to what the
# gateway answers itself): /api/heavy/<role>/<node path>.
HEAVY_PREFIX = "/api/heavy/"
MAX_PATH_BYTES = 4096
MAX_QUERY_BYTES = 8192
ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Route:
    role: str
    rest: str  # path after the role, always starting with "/", still percent-encoded
    query: str  # raw query string without "?", may be empty; never holds a client key


@dataclass(frozen=True, slots=True)
class RouteError:
    status: int
    type: str
    message: str


def split_url(url: str) -> tuple[str, str]:
    """'https://host/p/a?q=1' -> ('/p/a', 'q=1') without a URL parser round trip."""
    scheme_end = url.find("://")
    start = url.find("/", scheme_end + 3 if scheme_end >= 0 else 0)
    if start < 0:
        return "/", ""
    path_and_query = url[start:].split("#", 1)[0]
    path, _, query = path_and_query.partition("?")
    return path, query


def parse_route(
    method: str,
    path: str,
    query: str,
    roles: tuple[str, ...],
    upstream_paths: tuple[str, ...] = ("/v1/",),
    keys: Sequence[str] = (),
) -> Route | RouteError:
    """Validate a /api/heavy/<role>/<rest> request. `path` is the runtime's normalised path.

    Only the API goes through: a node also serves /invocations, /pause, /tokenize and more,
    several of them open even with vLLM's --api-key (it guards only paths under /v1; vLLM
    docs/usage/security.md), so anything outside `upstream_paths` never reaches a node.
    A client key sent in the query string is the gateway's, never the node's: the route's
    query is without any parameter whose value is one of `keys`."""
    if method not in ALLOWED_METHODS:
        return RouteError(405, "method_not_allowed", f"method {method[:16]!r} is not supported")
    if len(path) > MAX_PATH_BYTES or len(query) > MAX_QUERY_BYTES:
        return RouteError(414, "uri_too_long", "request path or query is too long")
    tail = path[len(HEAVY_PREFIX) :]
    role, slash, rest = tail.partition("/")
    if role not in roles:
        valid = ", ".join(sorted(roles))
        return RouteError(404, "unknown_role", f"unknown role {role[:32]!r}; valid roles: {valid}")
    rest = "/" + rest if slash else "/"
    problem = _path_problem(rest) or _query_problem(query)
    if problem:
        return RouteError(400, "bad_path", problem)
    if not path_allowed(rest, upstream_paths):
        allowed = ", ".join(upstream_paths)
        return RouteError(404, "not_forwarded", f"only these node paths are served here: {allowed}")
    return Route(role, rest, strip_key_params(query, keys))


def path_allowed(rest: str, upstream_paths: tuple[str, ...]) -> bool:
    """A prefix ending in '/' allows everything below it (and itself without the slash);
    any other entry allows exactly that path. Compared case-sensitively, as vLLM routes."""
    for allowed in upstream_paths:
        if allowed.endswith("/"):
            if rest.startswith(allowed) or rest == allowed[:-1]:
                return True
        elif rest == allowed:
            return True
    return False


def _path_problem(rest: str) -> str | None:
    lowered = rest.lower()
    if "//" in rest:
        return "empty path segments ('//') are not allowed"
    if "%2f" in lowered or "%5c" in lowered or "\\" in rest:
        return "encoded slashes or backslashes are not allowed in the path"
    if "%00" in lowered or any(ord(c) < 0x20 or ord(c) == 0x7F for c in rest):
        return "control characters are not allowed in the path"
    for segment in lowered.split("/"):
        if segment.replace("%2e", ".") in (".", ".."):
            return "'.' and '..' path segments are not allowed"
    return None


def _query_problem(query: str) -> str | None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in query):
        return "control characters are not allowed in the query"
    return None


def strip_key_params(query: str, keys: Sequence[str]) -> str:
    """The query without any parameter whose value (or bare text) is a client key.

    `query` is the raw string after "?" (no "#"). Other parameters keep their exact bytes and
    order. A value is compared percent-decoded, both as-is and with "+" as a space, against
    every key in constant time (no early exit), so timing says nothing about the keys.
    """
    if not query or not keys:
        return query
    encoded = [k.encode() for k in keys if k]
    kept = []
    for part in query.split("&"):
        _, sep, value = part.partition("=")
        candidate = value if sep else part  # "?KEY" alone counts too
        if candidate and _is_key(candidate, encoded):
            continue
        kept.append(part)
    return "&".join(kept)


def _is_key(raw_value: str, keys: list[bytes]) -> bool:
    candidates = {raw_value, unquote(raw_value), unquote_plus(raw_value)}
    found = False
    for candidate in candidates:
        supplied = candidate.encode("utf-8", "surrogateescape")
        for key in keys:
            found |= hmac.compare_digest(supplied, key)
    return found


def upstream_url(base_url: str, route: Route) -> str:
    """Join by string so nothing in the client's path can change the node's host."""
    url = base_url + route.rest
    return f"{url}?{route.query}" if route.query else url


@dataclass(frozen=True, slots=True)
class Plan:
    role: str
    nodes: tuple[int, ...]  # in the order to try; bounded by max_attempts
    pair: tuple[int, ...]  # the role's own nodes: anything else tried is a fallback
    need: str | None = None  # the capability the request needs (capability.needs)
    capable: tuple[int, ...] = ()  # with `need`: configured nodes known to have it

    def is_fallback(self, node: int) -> bool:
        return node not in self.pair


def may_serve(view: HealthView, node: int, need: str | None) -> bool:
    """A node may get a request unless it reported what it serves and that lacks `need`
    (unknown capabilities: tried as before capabilities existed)."""
    if need is None:
        return True
    have = view.capabilities(node)
    return have is None or need in have


def serves_base(view: HealthView, node: int, base: str | None) -> bool:
    """For a fine-tuned model: the node is known to serve LoRA adapters and its served model
    (learnt by the cron) is the adapter's base. Unknown is no: the node would answer 404."""
    if base is None:
        return True
    return LORA in (view.capabilities(node) or ()) and view.get(node).model == base


def capable_nodes(
    config: GatewayConfig, view: HealthView, need: str, base: str | None = None
) -> tuple[int, ...]:
    """Every usable node known to have `need`, in node order (for the error message)."""
    return tuple(
        n.number
        for n in config.nodes
        if n.usable
        and need in (view.capabilities(n.number) or ())
        and serves_base(view, n.number, base)
    )


def make_plan(
    pool: Pool,
    config: GatewayConfig,
    view: HealthView,
    now: float,
    turn: int,
    need: str | None = None,
    base: str | None = None,
) -> Plan:
    """Order the nodes for one request.

    The pair comes first, balanced (less-loaded first when both loads are known, else
    round-robin on `turn`), then the fallback chain; no node twice; unconfigured or invalid
    nodes never. Nodes marked down move behind every available one; if all are down they are
    still tried in that order (last resort) instead of failing fast.

    With a `need` (a capability the request requires) only nodes that may serve it stay
    (`may_serve`); if none of those is up the plan is empty, and the caller answers
    `no_capable_node` instead of sending the request where it cannot be served.

    With a `base` (a fine-tuned `ft:` model's base model; `need` is then LORA) the model
    decides, not the role: after the role's nodes come every other configured node, and only
    those that serve LoRA on that base stay (`serves_base`).
    """
    pair = [n for n in pool.pair if config.node(n).usable]
    if len(pair) > 1:
        pair = _balance(pair, view, now, turn)
    order = list(dict.fromkeys(pair))
    for n in pool.fallback:
        if n not in order and config.node(n).usable:
            order.append(n)
    if base is not None:
        order += [n.number for n in config.nodes if n.usable and n.number not in order]
    order = [n for n in order if may_serve(view, n, need) and serves_base(view, n, base)]
    available = [n for n in order if not view.is_down(n, now)]
    down = [n for n in order if view.is_down(n, now)]
    if need is not None and not available:
        down = []  # every node that could serve it is down: say so rather than retry them
    nodes = tuple((available + down)[: config.max_attempts])
    capable = capable_nodes(config, view, need, base) if need is not None else ()
    return Plan(pool.role, nodes, tuple(pool.pair), need, capable)


def _balance(pair: list[int], view: HealthView, now: float, turn: int) -> list[int]:
    loads = [view.load(n, now) for n in pair]
    if all(load is not None for load in loads) and len(set(loads)) > 1:
        return [n for _, n in sorted(zip(loads, pair, strict=True))]
    k = turn % len(pair)
    return pair[k:] + pair[:k]


def route_table(pools: Mapping[str, Pool]) -> dict[str, dict[str, list[int]]]:
    return {name: {"pair": list(p.pair), "fallback": list(p.fallback)} for name, p in pools.items()}
