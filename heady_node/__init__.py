"""Node side of the Heady cluster: turns a Linux GPU host (a rented box, or a Colab runtime for a
trial) into a gateway-routable vLLM node behind the node guard and a tunnel.

`heady-node serve --node N` (heady_node.cli) and the notebook `notebooks/heady-ai-processing.ipynb`
drive the same NodeSession, so every decision (role, GPU class, preset, engine argv, per-node
secrets, tunnel URL, paste lines) is unit-tested here.
"""

__all__ = [
    "cli", "colab", "dry_run_tunnel", "gpu", "guard", "install", "launcher", "presets", "roles",
    "session", "settings", "status", "tunnel", "wrangler",
]  # fmt: skip
