"""The Worker vars and secrets that point a gateway at a simulated fleet.

One builder for everything that runs the gateway in front of `sim.fleet` (`make dev`, the
end-to-end and status page tests, the benchmarks): each caller adds only its own settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from heady_shared.routes import NODE_NUMBERS, endpoint_key


class NodeUrls(Protocol):
    """A fleet, in process (sim.fleet.Fleet) or not (sim.fleet.FleetProcess)."""

    def url(self, n: int) -> str: ...


def fleet_env(
    fleet: NodeUrls,
    *,
    node_token: str,
    api_keys: str,
    node_secret: str | None = None,
    nodes: Iterable[int] = NODE_NUMBERS,
    **settings: str,
) -> dict[str, str]:
    """Each of `nodes`' endpoint secret set to its fleet URL, NODE_TOKEN (what the fleet's nodes
    expect), GATEWAY_API_KEYS (comma-separated client keys), NODE_SECRET when given (what the
    batch workers' credentials derive from: `heady_shared.nodeauth.node_credential`), then
    `settings` by name: a setting given there (another endpoint secret, or GATEWAY_API_KEYS
    itself) wins."""
    env = {endpoint_key(n): fleet.url(n) for n in nodes}
    env |= {"GATEWAY_API_KEYS": api_keys, "NODE_TOKEN": node_token}
    if node_secret is not None:
        env["NODE_SECRET"] = node_secret
    env.update(settings)
    return env
