"""A request for a fine-tuned `ft:` model (a job's model or one of its checkpoints,
`...:ckpt-step-<n>`) on the forward path, and `/v1/models` with the caller's fine-tuned models
(not their checkpoints). Pure; the shell (ft_shell.py) does the D1 read and the JS crossings.

Cost for every other request: one byte search of the body for `"ft:` (NEEDLE, bounded windows,
capability.contains) and nothing else: no JSON parse, no D1 read. A hit (a string value that
starts with `ft:`, or a text quoting `\\"ft:`) is confirmed by parsing the body
(`requested_model`), and only a body whose top-level `model` starts with `ft:` costs the D1
lookup (finetune.route_ft_model).

The node is asked for the LoRA named by the slug (heady_shared.ftnames.slug): vLLM's
filesystem resolver joins the requested name onto its cache directory, so the public `ft:`
name (with `/` and `:`) can never be sent as it is. `rewrite_model` replaces the model's value
in place when the body spells it exactly once as `"model": "<name>"` (a byte splice: one copy,
no JSON re-encode however large the body); otherwise (an escaped spelling, a duplicate) it
re-encodes the parsed body, which is still correct, only slower for a large body.
"""

from __future__ import annotations

import json
import re

from heady_shared.ftnames import FT_PREFIX, is_slug

NEEDLE = b'"' + FT_PREFIX.encode()
# A node's /v1/models answer larger than this is relayed untouched (a list of a few models is a
# few KB; the bound keeps a misbehaving node from making the gateway buffer a large body).
MODELS_MAX_BYTES = 1 << 20


def requested_model(body: bytes) -> tuple[str, dict] | None:
    """(the `ft:` model, the parsed body) when the JSON body's top-level `model` is one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # the node answers a malformed body itself, as for any other model
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not isinstance(model, str) or not model.startswith(FT_PREFIX):
        return None
    return model, data


def rewrite_model(body: bytes, data: dict, name: str, slug: str) -> bytes:
    """The body with its `model` (`name`) replaced by `slug`: spliced when the body holds
    `"model": "<name>"` exactly once, else the parsed body re-encoded."""
    key = rb'"model"\s*:\s*' + re.escape(json.dumps(name).encode())
    found = list(re.finditer(key, body))
    if len(found) == 1:
        m = found[0]
        value = json.dumps(slug).encode()
        start = m.end() - len(json.dumps(name).encode())
        return body[:start] + value + body[m.end() :]
    return json.dumps({**data, "model": slug}, separators=(",", ":")).encode()


def merge_models(node_answer: str, mine: list[dict[str, object]]) -> str | None:
    """The node's `/v1/models` list with the caller's fine-tuned models appended (an id the
    node already lists is not repeated); None when the node's answer is not such a list."""
    try:
        data = json.loads(node_answer)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    # vLLM lists every adapter it loaded (any key's) under its slug: those cards are dropped,
    # the caller's own fine-tuned models are listed under their public names instead.
    cards = [m for m in data["data"] if not (isinstance(m, dict) and _is_slug(m.get("id")))]
    seen = {m.get("id") for m in cards if isinstance(m, dict)}
    data["data"] = [*cards, *(m for m in mine if m["id"] not in seen)]
    return json.dumps(data)


def _is_slug(value: object) -> bool:
    return isinstance(value, str) and is_slug(value)
