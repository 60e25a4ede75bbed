"""`.dev.vars` parsing, endpoint URL validation and masking: pure helpers shared by commands."""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from heady_node.roles import NODE_COUNT

ENDPOINT_KEY = re.compile(r"^COLAB_ENDPOINT_([1-9][0-9]*)$")
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
QUICK_TUNNEL = "trycloudflare.com"
_ENV_KEYS = frozenset({"NODE_TOKEN", "GATEWAY_API_KEY", "HEADY_GATEWAY_URL"})


class CliError(Exception):
    """Bad input or an unusable answer: printed as one line, exit code 2."""


def parse_dev_vars(text: str) -> dict[str, str]:
    """KEY=value / KEY="value" / KEY='value' lines, # comments and blank lines, as wrangler dev
    reads them. Unquoted values lose a trailing ` # comment`."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = _LINE.match(raw)
        if not m:
            raise CliError(f".dev.vars line {n} is not KEY=value: {raw.strip()[:40]!r}")
        key, value = m.group(1), m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace("\\n", "\n") if value[0] == '"' else value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        out[key] = value
    return out


def load_vars(path: str | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`.dev.vars` (the given path, else ./.dev.vars when present) overlaid by the environment."""
    env = os.environ if env is None else env
    values: dict[str, str] = {}
    if path is not None or Path(".dev.vars").is_file():
        file = Path(path or ".dev.vars")
        try:
            values = parse_dev_vars(file.read_text())
        except OSError as exc:
            raise CliError(f"cannot read {file}: {exc.strerror or exc}") from exc
    for key, value in env.items():
        if key in _ENV_KEYS or ENDPOINT_KEY.match(key):
            values[key] = value
    return values


def endpoints(values: Mapping[str, str]) -> dict[int, str]:
    """node number -> raw URL for COLAB_ENDPOINT_1..8 (empty values count as unset)."""
    found: dict[int, str] = {}
    for key, value in values.items():
        m = ENDPOINT_KEY.match(key)
        if m and value.strip():
            node = int(m.group(1))
            if not 1 <= node <= NODE_COUNT:
                raise CliError(f"{key}: node numbers run 1..{NODE_COUNT}")
            found[node] = value.strip()
    return dict(sorted(found.items()))


def validate_url(url: str) -> str:
    """Normalised endpoint URL or ValueError saying why it cannot be a node endpoint."""
    if not url or any(c.isspace() for c in url) or any(c in url for c in "\"'<>"):
        raise ValueError("empty or contains spaces/quotes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from exc
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http"):
        raise ValueError(f"scheme must be https, got {parts.scheme or 'none'!r}")
    if not host:
        raise ValueError("no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL; the gateway sends NODE_TOKEN itself")
    local = host in ("localhost", "127.0.0.1", "::1")
    if parts.scheme == "http" and not local:
        raise ValueError("plain http is only allowed for localhost; tunnels give https")
    if parts.query or parts.fragment:
        raise ValueError("no query string or fragment allowed")
    if host.endswith(QUICK_TUNNEL):
        raise ValueError(
            "quick tunnels (trycloudflare.com) do not carry SSE; use ngrok or a named tunnel"
        )
    if "." not in host and not local:
        raise ValueError(f"host {host!r} has no domain")
    netloc = host if port is None else f"{host}:{port}"
    if ":" in host:
        netloc = f"[{host}]" if port is None else f"[{host}]:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def mask_url(url: str) -> str:
    """https://abcd-12-34.ngrok-free.app -> https://ab…34.ngrok-free.app (path dropped; the
    tunnel's sub-domain is what makes a node reachable, so it is the part we hide)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparseable URL)"
    if not host:
        return "(no host)"
    if host in ("localhost", "::1") or host.replace(".", "").isdigit():
        return f"{parts.scheme}://{host}{port}"  # loopback/IP test setups: nothing to hide
    first, dot, rest = host.partition(".")
    masked = f"{first[:2]}…{first[-2:]}" if len(first) > 6 else "…"
    return f"{parts.scheme}://{masked}{dot}{rest}{port}"
