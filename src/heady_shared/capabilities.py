"""What a node can serve, as the node reports it and the gateway learns it.

vLLM says nothing about this itself: its `/v1/models` cards carry id, object, created, owned_by,
root, parent, max_model_len and permission, no modality (`ModelCard`,
vllm/entrypoints/openai/engine/protocol.py), and vLLM serves no `/v1/images/*` at all. So the node
adds one gauge per capability to the `/metrics` answer the gateway's cron already reads for the
queue depth and the model name:

    heady:node_capability{capability="chat"} 1
    heady:node_capability{capability="image_input"} 1
    heady:node_capability{capability="image_generation"} 1
    heady:node_capability{capability="lora"} 1

`lora`: vLLM runs with --enable-lora (and a LoRA resolver), so it serves fine-tuned `ft:`
models of its base model (the `model_name` label of its metrics) by their slug.

Whoever serves a capability reports it: the node guard (inside vLLM) reports `chat`, and
`image_input` when vLLM was started with image limits; the image engine reports
`image_generation` only once its pipeline is loaded. A node whose metrics carry no such line at
all (an older node, a plain vLLM) has *unknown* capabilities, which is not the same as none.
"""

from __future__ import annotations

import re

CHAT = "chat"
IMAGE_INPUT = "image_input"
IMAGE_GENERATION = "image_generation"
LORA = "lora"
# Order is the display order; the parser keeps only these names (a bounded set, so a hostile
# or corrupt answer cannot grow the health record).
KNOWN: tuple[str, ...] = (CHAT, IMAGE_INPUT, IMAGE_GENERATION, LORA)
METRIC = "heady:node_capability"

_LINE = re.compile(
    r'^heady:node_capability\{capability="([a-z_]{1,32})"\}\s+([0-9.eE+-]+)\s*$', re.M
)


def exposition(
    capabilities: tuple[str, ...] | frozenset[str] | list[str], *, header: bool = True
) -> str:
    """Prometheus text for the given capabilities, one sample each. `header=False` leaves out
    HELP/TYPE, for a part appended after another part that already had them (the image
    engine's line after the guard's)."""
    names = [c for c in KNOWN if c in set(capabilities)]
    if not names:
        return ""
    lines = [
        f"# HELP {METRIC} What this node serves (1 = yes), for the gateway's routing.",
        f"# TYPE {METRIC} gauge",
    ][: 2 if header else 0]
    lines += [f'{METRIC}{{capability="{c}"}} 1' for c in names]
    return "\n".join(lines) + "\n"


def parse(text: str) -> tuple[str, ...] | None:
    """The capabilities a metrics text reports, in KNOWN order; None when it reports none at
    all (unknown). A sample whose value is not 1 does not count."""
    found: set[str] = set()
    seen = False
    for m in _LINE.finditer(text):
        seen = True
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if value == 1.0 and m.group(1) in KNOWN:
            found.add(m.group(1))
    if not seen:
        return None
    return tuple(c for c in KNOWN if c in found)
