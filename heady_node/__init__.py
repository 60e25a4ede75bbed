"""Node side of the Heady cluster: turns a Colab GPU runtime into a gateway-routable vLLM node.

The notebook `notebooks/heady-ai-processing.ipynb` only calls into this package, so every
decision (role, GPU class, preset, engine argv, tunnel URL, paste lines) is unit-tested here.
"""

__all__ = ["gpu", "launcher", "presets", "roles", "status", "tunnel", "wrangler"]
