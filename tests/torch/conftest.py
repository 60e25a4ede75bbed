"""The image engine's real code on the CPU: torch + diffusers in the pinned .venv-torch
(`make torch-install`), a tiny randomly initialised pipeline, no hub access at all."""

import os

# Set before diffusers/transformers are imported anywhere: any attempt to reach the hub fails.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
