"""`.dev.vars` parsing, endpoint URL validation and masking: pure helpers shared by commands."""

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from heady_shared import devvars
from heady_shared.endpoints import parse_endpoint
from heady_shared.routes import NODE_COUNT, endpoint_node

# The environment overrides .dev.vars for these, as for every COLAB_ENDPOINT_<n>; ROUTES and
# the probe paths so `heady probe` asks what the gateway asks.
_ENV_KEYS = frozenset(
    {"NODE_TOKEN", "NODE_SECRET", "GATEWAY_API_KEY", "GATEWAY_API_KEYS", "HEADY_GATEWAY_URL"}
    | {"ROUTES", "HEALTH_PATH", "METRICS_PATH"}
)


class CliError(Exception):
    """Bad input or an unusable answer: printed as one line, exit code 2."""


def parse_dev_vars(text: str) -> dict[str, str]:
    """`.dev.vars` read exactly as the gateway's harness reads it (heady_shared.devvars)."""
    try:
        return devvars.parse_dev_vars(text)
    except devvars.DevVarsError as exc:
        raise CliError(str(exc)) from None


def gateway_key(values: Mapping[str, str]) -> str:
    """The client key for `heady status`: GATEWAY_API_KEY, else the first of the gateway's
    own GATEWAY_API_KEYS (the name `.dev.vars` carries for `wrangler dev`)."""
    if values.get("GATEWAY_API_KEY", "").strip():
        return values["GATEWAY_API_KEY"].strip()
    keys = values.get("GATEWAY_API_KEYS", "").replace("\n", ",").split(",")
    return next((k.strip() for k in keys if k.strip()), "")


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
        if key in _ENV_KEYS or endpoint_node(key) is not None:
            values[key] = value
    return values


def endpoints(values: Mapping[str, str]) -> dict[int, str]:
    """node number -> raw URL for COLAB_ENDPOINT_1..8 (empty values count as unset)."""
    found: dict[int, str] = {}
    for key, value in values.items():
        node = endpoint_node(key)
        if node is not None and value.strip():
            if not 1 <= node <= NODE_COUNT:
                raise CliError(f"{key}: node numbers run 1..{NODE_COUNT}")
            found[node] = value.strip()
    return dict(sorted(found.items()))


def validate_url(url: str) -> str:
    """Normalised endpoint URL, or ValueError saying why the gateway would refuse it: the
    very verdict the gateway gives (heady_shared.endpoints), so both always agree."""
    ep = parse_endpoint(url)
    if ep.state != "configured" or ep.base_url is None:
        raise ValueError(ep.reason or "not set")
    return ep.base_url


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


def resolve_gateway(gateway: str | None, key: str | None, dev_vars: str | None) -> tuple[str, str]:
    """Gateway URL and client key as `heady status` finds them: flags, else the environment
    (HEADY_GATEWAY_URL, GATEWAY_API_KEY or the first of GATEWAY_API_KEYS), else .dev.vars."""
    values = load_vars(dev_vars) if (dev_vars or not (gateway and key)) else {}
    base = gateway or values.get("HEADY_GATEWAY_URL", "")
    key = key or gateway_key(values)
    if not base:
        raise CliError("no gateway URL: pass --gateway or set HEADY_GATEWAY_URL")
    if not key:
        raise CliError("no gateway key: pass --key or set GATEWAY_API_KEY (or GATEWAY_API_KEYS)")
    if not base.startswith(("https://", "http://")):
        raise CliError(f"gateway URL must start with https://, got {base[:60]!r}")
    return base.rstrip("/"), key
