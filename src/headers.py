"""Header rules: what goes to a node, what comes back to the client, request ids, CORS, auth.

Pure: works on plain dicts of lower-cased header names.
"""

from __future__ import annotations

import hmac
import secrets

# RFC 9110 §7.6.1 hop-by-hop headers plus proxy-specific ones; never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's credentials are for the gateway only; Host belongs to the node's URL; the
# runtime recomputes Content-Length from the buffered body; cf-* and x-forwarded-* are
# rewritten by the edge anyway and would leak the client's network details to the node.
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "authorization",
    "cookie",
    "x-api-key",
    "content-length",
    "x-request-id",
    "x-real-ip",
    "true-client-ip",
    "forwarded",
}
REQUEST_DROP_PREFIXES = ("cf-", "x-forwarded-", "cdn-loop")
# Tunnel-specific response headers would tell a client which tunnel (and so which URL) a
# node sits behind.
RESPONSE_DROP = HOP_BY_HOP | {"server", "via", "alt-svc", "report-to", "nel", "set-cookie"}
RESPONSE_DROP_PREFIXES = ("ngrok-", "cf-", "x-sim-", "x-heady-")
MAX_HEADER_BYTES = 32 * 1024
REQUEST_ID_MAX = 128
CORS_ALLOW_HEADERS = "authorization, content-type, x-api-key, x-request-id, accept"
CORS_EXPOSE_HEADERS = (
    "x-request-id, x-heady-node, x-heady-role, x-heady-model, x-heady-attempts, "
    "x-heady-fallback, retry-after"
)
CORS_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def connection_tokens(value: str | None) -> set[str]:
    """Headers named in `Connection` are hop-by-hop for this message too."""
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers_for_node(client: dict[str, str], node_token: str | None) -> dict[str, str]:
    drop = REQUEST_DROP | connection_tokens(client.get("connection"))
    out = {
        k: v for k, v in client.items() if k not in drop and not k.startswith(REQUEST_DROP_PREFIXES)
    }
    if node_token:
        out["authorization"] = f"Bearer {node_token}"
    # Without it a free ngrok endpoint answers an HTML interstitial instead of the API.
    out["ngrok-skip-browser-warning"] = "1"
    return out


def response_header_drop(names: list[str], connection: str | None) -> list[str]:
    """Which of a node's response header names must not reach the client."""
    extra = connection_tokens(connection)
    return [
        n for n in names if n in RESPONSE_DROP or n in extra or n.startswith(RESPONSE_DROP_PREFIXES)
    ]


def request_id(client_value: str | None) -> str:
    """Keep the client's id when it is sane (printable token, bounded); else mint one."""
    if client_value:
        v = client_value.strip()
        if 0 < len(v) <= REQUEST_ID_MAX and all(
            c.isascii() and (c.isalnum() or c in "-_.:") for c in v
        ):
            return v
    return secrets.token_hex(12)


def header_bytes(headers: dict[str, str]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.items())


def presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def key_matches(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time against every configured key, so timing says nothing about which."""
    if presented is None:
        return False
    supplied = presented.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(supplied, key.encode())
    return found


def cors_headers(origin: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    if "*" in allowed:
        allow = "*"
    elif origin and origin.rstrip("/") in allowed:
        allow = origin
    else:
        return {"vary": "Origin"}
    out = {
        "access-control-allow-origin": allow,
        "access-control-expose-headers": CORS_EXPOSE_HEADERS,
    }
    if allow != "*":
        out["vary"] = "Origin"
    return out


def preflight_headers(origin: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    out = cors_headers(origin, allowed)
    if "access-control-allow-origin" in out:
        out |= {
            "access-control-allow-methods": CORS_METHODS,
            "access-control-allow-headers": CORS_ALLOW_HEADERS,
            "access-control-max-age": "86400",
        }
    return out


def auth_problem(
    headers: dict[str, str], keys: tuple[str, ...], disabled: bool
) -> tuple[int, str, str] | None:
    """(status, type, message) when the request may not pass, else None."""
    if disabled:
        return None
    if not keys:
        return (
            503,
            "not_configured",
            "gateway not configured: set the GATEWAY_API_KEYS secret "
            "(or AUTH_DISABLED=true for local use only)",
        )
    if not key_matches(presented_key(headers), keys):
        return 401, "unauthorized", "missing or invalid API key"
    return None


def relay_headers(
    node_headers: dict[str, str], cors: dict[str, str], heady: dict[str, str]
) -> dict[str, str]:
    """The client's response headers: the node's, less hop-by-hop and tunnel headers, plus
    CORS and the gateway's own x-heady-* / x-request-id."""
    out = dict(node_headers)
    for name in response_header_drop(list(out), out.get("connection")):
        del out[name]
    out.update(cors)
    out.update(heady)
    if not is_sse(out) and "content-encoding" not in out:
        # The edge (and miniflare, which copies its rules) gzips JSON and text answers that
        # carry no Content-Encoding, and its compressor ends a body that broke off as if
        # complete. An explicit encoding turns that off, so a cut answer stays cut
        # (developers.cloudflare.com/speed/optimization/content/compression/).
        out["content-encoding"] = "identity"
    return out


def is_sse(headers: dict[str, str]) -> bool:
    return "text/event-stream" in (headers.get("content-type") or "")
