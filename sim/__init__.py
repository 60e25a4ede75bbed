"""Simulated GPU-node fleet: vLLM-like OpenAI servers with switchable failure modes.

``sim.fleet.Fleet`` runs N nodes in-process for tests; ``python -m sim.fleet`` runs them as a
local stand-in cluster; ``python -m sim.node`` stands in for ``vllm serve``.
"""

from typing import Any

__all__ = ["MODES", "Fleet", "Node", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    # Lazy: importing submodules here would make `python -m sim.node` warn (runpy double import).
    if name == "Fleet":
        from sim.fleet import Fleet

        return Fleet
    if name in ("MODES", "Node", "RecordedRequest"):
        from sim import node

        return getattr(node, name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
