"""Fine-tuned model names, shared by the gateway and the nodes (stdlib only).

Public name (OpenAI's form): `ft:<base>:<org>:<suffix>:<id>`, e.g.
`ft:Qwen/Qwen2.5-1.5B-Instruct:heady:heady:0123abcd...`; org is always "heady" here (one
gateway, one organisation), id is the hex of the job id. A base id may hold `/` but never `:`.

The name is unusable as a vLLM LoRA name or a directory: vLLM's filesystem resolver joins the
LoRA name onto its cache dir, so `/` makes sub-paths and `..` climbs out. Nodes and the gateway
therefore use `slug(name)` as the LoRA name, the cache directory and the URL segment of
`GET /api/nodes/v1/adapters/<slug>`; the `ft:` name stays the public alias only.
"""

from __future__ import annotations

import hashlib
import re

FT_PREFIX = "ft:"
ORG = "heady"
SLUG_PREFIX = "ft-"
SLUG_MAX = 64
_DIGEST_HEX = 20  # 80 bits of SHA-256: collisions are out of reach
_READABLE_MAX = SLUG_MAX - len(SLUG_PREFIX) - 1 - _DIGEST_HEX  # 40
_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")
_SLUG = re.compile(rf"^{SLUG_PREFIX}[A-Za-z0-9_-]{{0,{_READABLE_MAX}}}-[0-9a-f]{{{_DIGEST_HEX}}}$")


def ft_model_name(base: str, suffix: str | None, job_hex: str, org: str = ORG) -> str:
    """OpenAI's naming; an absent suffix leaves its field empty (`...:heady::<id>`)."""
    return f"{FT_PREFIX}{base}:{org}:{suffix or ''}:{job_hex}"


def checkpoint_name(model_name: str, step: int) -> str:
    """A checkpoint's name, as OpenAI's `...:<id>:ckpt-step-<n>`."""
    return f"{model_name}:ckpt-step-{step}"


def ft_base(name: str) -> str | None:
    """The base model of an `ft:` name (checkpoint names too), or None if it is not one."""
    if not name.startswith(FT_PREFIX):
        return None
    parts = name[len(FT_PREFIX) :].split(":")
    if len(parts) == 5 and parts[4].startswith("ckpt-step-"):
        parts = parts[:4]
    if len(parts) != 4 or not parts[0] or not parts[1] or not parts[3]:
        return None
    return parts[0]


def slug(name: str) -> str:
    """A safe, deterministic LoRA name for a fine-tuned model: `ft-` + its readable
    characters (runs of anything but [A-Za-z0-9-] become one `_`, so never `/`, `:`, `.`)
    cut to 40, then `-` + 20 hex of SHA-256 of the whole name, so two names never share
    one. At most 64 characters, one path segment."""
    body = name[len(FT_PREFIX) :] if name.startswith(FT_PREFIX) else name
    readable = _UNSAFE.sub("_", body)[:_READABLE_MAX]
    digest = hashlib.sha256(name.encode()).hexdigest()[:_DIGEST_HEX]
    return f"{SLUG_PREFIX}{readable}-{digest}"


def is_slug(text: str) -> bool:
    """Whether a URL segment has the form `slug` gives (checked before any lookup)."""
    return len(text) <= SLUG_MAX and _SLUG.match(text) is not None
