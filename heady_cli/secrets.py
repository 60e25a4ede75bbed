"""`heady secrets`: collected endpoint URLs -> JSON for `npx wrangler secret bulk`; and a
node's batch credential (HEADY_NODE_CREDENTIAL) from the gateway's NODE_SECRET."""

import json
import re
from collections.abc import Iterable, Mapping

from heady_cli.config import CliError, endpoints, parse_dev_vars, validate_url
from heady_shared.nodeauth import node_credential
from heady_shared.routes import ENDPOINT_PREFIX, NODE_COUNT, endpoint_key

_ARG = re.compile(rf"^(?:{re.escape(ENDPOINT_PREFIX)})?([0-9]+)=(.*)$")


def parse_args_urls(args: Iterable[str]) -> dict[int, str]:
    """`3=https://…` or `COLAB_ENDPOINT_3=https://…`."""
    out: dict[int, str] = {}
    for arg in args:
        m = _ARG.match(arg.strip())
        if not m:
            raise CliError(f"expected N=URL or {ENDPOINT_PREFIX}N=URL, got {arg[:40]!r}")
        node = int(m.group(1))
        if not 1 <= node <= NODE_COUNT:
            raise CliError(f"node {node} out of range 1..{NODE_COUNT}")
        out[node] = m.group(2).strip()
    return out


def parse_file(text: str) -> dict[int, str]:
    return endpoints(parse_dev_vars(text))


def credential_json(secret: str, node: int) -> str:
    """{"HEADY_NODE_CREDENTIAL": ...}: what node `node`'s batch worker presents to the
    gateway (set it as that node's secret; heady_node reads it from the environment)."""
    if not secret:
        raise CliError("NODE_SECRET is not set (.dev.vars or the environment)")
    if not 1 <= node <= NODE_COUNT:
        raise CliError(f"node {node} out of range 1..{NODE_COUNT}")
    return json.dumps({"HEADY_NODE_CREDENTIAL": node_credential(secret, node)}, indent=2)


def bulk_json(
    urls: Mapping[int, str], token: str | None = None, node_secret: str | None = None
) -> str:
    """Validated, normalised {"COLAB_ENDPOINT_n": url}; every bad URL named in one line."""
    if not urls:
        raise CliError("no endpoint URLs given (.dev.vars, --file or N=URL arguments)")
    good: dict[str, str] = {}
    bad: list[str] = []
    for node in sorted(urls):
        try:
            good[endpoint_key(node)] = validate_url(urls[node])
        except ValueError as exc:
            bad.append(f"{endpoint_key(node)}: {exc}")
    if bad:
        raise CliError("invalid endpoint URL(s): " + "; ".join(bad))
    if token is not None:
        if not token:
            raise CliError("--with-token given but NODE_TOKEN is not set")
        good["NODE_TOKEN"] = token
    if node_secret is not None:
        if not node_secret:
            raise CliError("--with-node-secret given but NODE_SECRET is not set")
        good["NODE_SECRET"] = node_secret
    return json.dumps(good, indent=2)
