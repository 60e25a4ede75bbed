"""`heady status`: read a deployed gateway's /api/status. Parsing is pure and tolerant: fields
the gateway adds later are shown in an "other" column rather than breaking the table."""

import json
from dataclasses import dataclass
from typing import Any

import httpx

from heady_cli.config import CliError
from heady_shared.routes import DEFAULT_POOLS

KNOWN = {
    "node", "roles", "config", "config_reason", "state", "since", "until", "reason",
    "failures", "latency_ms", "load", "checked_at",
}  # fmt: skip


@dataclass(frozen=True)
class GatewayStatus:
    version: str
    nodes: list[dict[str, Any]]
    routes: dict[str, Any]


def parse_status(status: int, content_type: str, body: str) -> GatewayStatus:
    if status == 401 or status == 403:
        raise CliError(f"gateway rejected the key (HTTP {status}): {_error_message(body)}")
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        kind = content_type.split(";")[0] or "no content-type"
        raise CliError(f"gateway answered non-JSON (HTTP {status}, {kind})") from None
    if not 200 <= status < 300:
        raise CliError(f"gateway answered HTTP {status}: {_error_message(body)}")
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise CliError("gateway answer has no 'nodes' list: is this the Heady gateway?")
    gw = data.get("gateway") if isinstance(data.get("gateway"), dict) else {}
    nodes = [n for n in data["nodes"] if isinstance(n, dict)]
    routes = data.get("routes") if isinstance(data.get("routes"), dict) else {}
    return GatewayStatus(str(gw.get("version", "?")), nodes, routes)


def _error_message(body: str) -> str:
    try:
        err = json.loads(body).get("error", {})
        return str(err.get("message") or err.get("type") or "no message")
    except (json.JSONDecodeError, AttributeError):
        return body.strip().splitlines()[0][:120] if body.strip() else "empty body"


def uncovered_roles(st: GatewayStatus) -> list[str]:
    """Roles with no configured node the gateway would route to. Like the gateway, an
    `unknown` node (not observed yet, e.g. right after a deploy) counts as available."""
    roles = list(st.routes) or list(DEFAULT_POOLS)
    available: set[str] = set()
    for n in st.nodes:
        usable = n.get("config", "configured") == "configured"
        if usable and n.get("state") in ("up", "unknown") and isinstance(n.get("roles"), list):
            available.update(str(r) for r in n["roles"])
    return [r for r in roles if r not in available]


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def extras(node: dict[str, Any]) -> str:
    return " ".join(f"{k}={cell(v)}" for k, v in node.items() if k not in KNOWN)


def fetch_status(base: str, key: str, timeout: float) -> GatewayStatus:
    url = f"{base.rstrip('/')}/api/status"
    try:
        resp = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
    except httpx.TimeoutException:
        raise CliError(f"gateway at {base} did not answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach gateway at {base}: {type(exc).__name__}") from None
    return parse_status(resp.status_code, resp.headers.get("content-type", ""), resp.text)
