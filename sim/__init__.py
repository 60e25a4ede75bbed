"""Simulated GPU-node fleet: vLLM-like OpenAI servers with switchable failure modes.

``sim.fleet.Fleet`` runs N nodes in-process for tests; ``python -m sim.fleet`` (or
``sim.fleet.FleetProcess`` from Python) runs them as a local stand-in cluster;
``python -m sim.node`` stands in for ``vllm serve``. Each node behaves like vLLM wherever the
gateway depends on it (served names, API-key prefixes, endpoints, errors; see sim/node/).
"""

from typing import Any

__all__ = ["MODES", "Fleet", "FleetProcess", "Node", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    # Lazy: importing submodules here would make `python -m sim.fleet` warn (runpy double import).
    if name in ("Fleet", "FleetProcess"):
        from sim import fleet

        return getattr(fleet, name)
    if name in ("MODES", "Node", "RecordedRequest"):
        from sim import node

        return getattr(node, name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
