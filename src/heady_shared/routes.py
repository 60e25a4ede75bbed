"""Nodes, roles and the route table: which pair serves a role and which nodes it falls back to."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

NODE_COUNT = 8
NODE_NUMBERS = tuple(range(1, NODE_COUNT + 1))
DEFAULT_ROUTES: Mapping[str, tuple[int, ...]] = {
    "reasoning": (1, 2),
    "code": (3, 4),
    "vision": (5, 6),
    "batch": (7, 8),
}
DEFAULT_FALLBACK: tuple[int, ...] = (1, 2)


@dataclass(frozen=True, slots=True)
class Pool:
    """A role's routing: the balanced pair first, then the fallback chain."""

    role: str
    pair: tuple[int, ...]
    fallback: tuple[int, ...]

    @property
    def chain(self) -> tuple[int, ...]:
        """Every node a request for this role may reach, in plan order, each once."""
        return tuple(dict.fromkeys(self.pair + self.fallback))


DEFAULT_POOLS: Mapping[str, Pool] = {
    role: Pool(role, pair, DEFAULT_FALLBACK) for role, pair in DEFAULT_ROUTES.items()
}


ENDPOINT_PREFIX = "COLAB_ENDPOINT_"


def endpoint_key(node: int) -> str:
    """The Worker secret holding a node's tunnel URL."""
    return f"{ENDPOINT_PREFIX}{node}"


def endpoint_node(key: str) -> int | None:
    """The node number an `endpoint_key` name carries, or None for any other name. Any n >= 1
    counts, even past NODE_COUNT, so a reader of .dev.vars can say the number is out of range."""
    digits = key[len(ENDPOINT_PREFIX) :] if key.startswith(ENDPOINT_PREFIX) else ""
    if digits.isascii() and digits.isdigit() and not digits.startswith("0"):
        return int(digits)
    return None


def valid_role_name(name: object) -> bool:
    """Role names appear in URLs and are served model names: a-z, 0-9 and '-', 1..32 chars."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 32
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in name)
    )


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
                if not valid_role_name(name):
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
    return {name: Pool(name, pair, fallback) for name, pair in roles.items()}, []


def _node_list(value: object, where: str, errors: list[str]) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not value:
        errors.append(f"{where}: expected a non-empty list of node numbers 1-{NODE_COUNT}")
        return None
    out: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item not in NODE_NUMBERS:
            errors.append(f"{where}: {item!r} is not a node number 1-{NODE_COUNT}")
            return None
        if item in out:
            errors.append(f"{where}: node {item} is listed twice")
            return None
        out.append(item)
    return tuple(out)


def role_of(node: int, pools: Mapping[str, Pool] = DEFAULT_POOLS) -> str | None:
    """The role whose pair holds this node (its own role), or None for a node in no pair."""
    return next((p.role for p in pools.values() if node in p.pair), None)


def roles_served_by(node: int, pools: Mapping[str, Pool] = DEFAULT_POOLS) -> tuple[str, ...]:
    """Every role whose requests may reach this node (its own pair or the fallback chain).

    A node's engine must answer to each of these as a model name: vLLM answers 404 to a
    `model` it does not serve, so a fallback would otherwise fail on the name alone.
    """
    return tuple(p.role for p in pools.values() if node in p.chain)
