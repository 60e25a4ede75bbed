"""One verdict on a node endpoint URL (a COLAB_ENDPOINT_n secret), for the gateway and the CLI.

Node URLs are secrets: no reason text quotes the URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_URL_LENGTH = 2048
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
# Cloudflare quick tunnels do not carry SSE and cap in-flight requests at 200 (Cloudflare docs,
# "TryCloudflare" limitations), so a streaming LLM node cannot sit behind one.
QUICK_TUNNEL_SUFFIX = ".trycloudflare.com"

EndpointState = Literal["configured", "invalid", "unconfigured"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    state: EndpointState
    base_url: str | None = None  # normalised: lower-case scheme and host, no trailing slash
    reason: str | None = None


def parse_endpoint(raw: str | None) -> Endpoint:
    """Validate one COLAB_ENDPOINT_n value."""
    if raw is None or not raw.strip():
        return Endpoint("unconfigured", reason="secret not set")
    value = raw.strip()
    if len(value) > MAX_URL_LENGTH:
        return _invalid("URL too long")
    if any(ord(c) < 0x21 or ord(c) > 0x7E or c in "<>\"'\\^`{|}" for c in value):
        return _invalid("URL contains spaces, quotes or characters not allowed in a URL")
    scheme, sep, rest = value.partition("://")
    if not sep:
        return _invalid("URL needs a scheme (https://...)")
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        # Quote the scheme only when it looks like one: anything longer may be the host.
        shown = f"{scheme!r} " if len(scheme) <= 8 and scheme.isalpha() else ""
        return _invalid(f"scheme {shown}is not https (https://...)")
    if "?" in rest or "#" in rest:
        return _invalid("URL must not carry a query or fragment")
    authority, _, path = rest.partition("/")
    if "@" in authority:
        return _invalid("URL must not carry credentials; the gateway sends NODE_TOKEN itself")
    host, colon, port = authority.rpartition(":") if _has_port(authority) else (authority, "", "")
    host = host.lower()
    if not host or not _valid_host(host):
        return _invalid("URL has no valid host")
    if colon and not (port.isdigit() and 0 < int(port) < 65536):
        return _invalid("URL has an invalid port")
    if "%" in path:
        return _invalid("URL path must not be percent-encoded")
    path = "/".join(p for p in path.split("/") if p)  # trailing and doubled slashes dropped
    if any(seg in (".", "..") for seg in path.split("/")):
        return _invalid("URL path must not contain '.' or '..' segments")
    local = host in LOOPBACK_HOSTS
    if scheme == "http" and not local:
        return _invalid("plain http is only allowed for localhost; tunnels give https")
    if not local and "." not in host:
        return _invalid("host has no domain")
    if is_quick_tunnel(host):
        return _invalid("quick tunnels (trycloudflare.com) do not carry SSE; use a named tunnel")
    authority = host + (f":{port}" if colon else "")
    return Endpoint("configured", f"{scheme}://{authority}" + (f"/{path}" if path else ""))


def is_quick_tunnel(host: str) -> bool:
    """A Cloudflare quick tunnel's host: refused by the gateway and never opened by a node."""
    return host.lower().endswith(QUICK_TUNNEL_SUFFIX)


def _invalid(reason: str) -> Endpoint:
    return Endpoint("invalid", reason=reason)


def _valid_host(host: str) -> bool:
    """A DNS name of [a-z0-9-] labels, an IPv4 address, or a bracketed IPv6 literal: what
    fetch() can reach. Anything else (a second ':', brackets, '%') is refused here rather
    than failing on every request."""
    if host.startswith("["):
        inner = host[1:-1]
        return host.endswith("]") and bool(inner) and all(c in "0123456789abcdef:." for c in inner)
    labels = host.split(".")
    return all(
        0 < len(label) <= 63
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )


def _has_port(authority: str) -> bool:
    if authority.startswith("["):  # IPv6 literal: a port follows the closing bracket
        return "]:" in authority
    return ":" in authority
