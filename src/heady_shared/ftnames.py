"""Fine-tuned model names, shared by the gateway and the nodes (stdlib only).

Public name (OpenAI's form): `ft:<base>:<org>:<suffix>:<id>`, e.g.
`ft:Qwen/Qwen2.5-1.5B-Instruct:heady:heady:0123abcd...`; org is always "heady" here (one
gateway, one organisation), id is the hex of the job id. A base id may hold `/` but never `:`.
A job's checkpoint (OpenAI's `fine_tuned_model_checkpoint`) is the job's model name plus
`:ckpt-step-<n>`, n the step it was saved at (decimal, no leading zeros).

The name is unusable as a vLLM LoRA name or a directory: vLLM's filesystem resolver joins the
LoRA name onto its cache dir, so `/` makes sub-paths and `..` climbs out. Nodes and the gateway
therefore use `slug(name)` as the LoRA name, the cache directory and the URL segment of
`GET /api/nodes/v1/adapters/<slug>`; the `ft:` name stays the public alias only. A checkpoint's
slug spells its job id and step (`ft-ckpt-<id>-<n>-<digest>`), so the gateway finds the
checkpoint a node asks for without a table of slugs (`checkpoint_of_slug`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

FT_PREFIX = "ft:"
ORG = "heady"
SLUG_PREFIX = "ft-"
SLUG_MAX = 64
CKPT_TAG = "ckpt-step-"
MAX_STEP = 10**9  # a checkpoint's step: at most 10 digits, so a checkpoint slug fits
_DIGEST_HEX = 20  # 80 bits of SHA-256: collisions are out of reach
_READABLE_MAX = SLUG_MAX - len(SLUG_PREFIX) - 1 - _DIGEST_HEX  # 40
# A job's `suffix` (part of its model name): one rule for the gateway and the CLI's local check.
SUFFIX = re.compile(r"^[a-z0-9_-]{1,64}$")
SUFFIX_RULE = "suffix must be 1 to 64 characters of a-z, 0-9, '-' and '_'"
_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")
_SLUG = re.compile(rf"^{SLUG_PREFIX}[A-Za-z0-9_-]{{0,{_READABLE_MAX}}}-[0-9a-f]{{{_DIGEST_HEX}}}$")
_STEP = re.compile(r"^(0|[1-9][0-9]{0,9})$")
# Job ids are "ftjob-" + 24 hex (jobdb.Ids); "ckpt-" + 24 + "-" + 10 digits is exactly 40.
_JOB_HEX = re.compile(r"^[0-9a-f]{1,24}$")
_CKPT_SLUG = re.compile(
    rf"^{SLUG_PREFIX}ckpt-([0-9a-f]{{1,24}})-(0|[1-9][0-9]{{0,9}})-[0-9a-f]{{{_DIGEST_HEX}}}$"
)


@dataclass(frozen=True, slots=True)
class FtName:
    """A parsed `ft:` name: a job's model (`step` None) or one of its checkpoints."""

    base: str
    org: str
    suffix: str  # "" when the job gave none
    job_hex: str
    step: int | None = None

    @property
    def model(self) -> str:
        """The job's model name (a checkpoint's name without its `:ckpt-step-<n>`)."""
        return ft_model_name(self.base, self.suffix, self.job_hex, self.org)

    def __str__(self) -> str:
        return self.model if self.step is None else checkpoint_name(self.model, self.step)


def ft_model_name(base: str, suffix: str | None, job_hex: str, org: str = ORG) -> str:
    """OpenAI's naming; an absent suffix leaves its field empty (`...:heady::<id>`)."""
    return f"{FT_PREFIX}{base}:{org}:{suffix or ''}:{job_hex}"


def checkpoint_name(model_name: str, step: int) -> str:
    """A checkpoint's name, as OpenAI's `...:<id>:ckpt-step-<n>`."""
    return f"{model_name}:{CKPT_TAG}{step}"


def parse(name: str) -> FtName | None:
    """The fields of an `ft:` model or checkpoint name; None for anything else (base, org and
    id non-empty, a checkpoint's step 0..MAX_STEP written canonically)."""
    if not name.startswith(FT_PREFIX):
        return None
    parts = name[len(FT_PREFIX) :].split(":")
    step = None
    if len(parts) == 5:
        tag = parts.pop()
        digits = tag[len(CKPT_TAG) :]
        if not tag.startswith(CKPT_TAG) or not _STEP.match(digits) or int(digits) > MAX_STEP:
            return None
        step = int(digits)
    if len(parts) != 4 or not parts[0] or not parts[1] or not parts[3]:
        return None
    return FtName(parts[0], parts[1], parts[2], parts[3], step)


def ft_base(name: str) -> str | None:
    """The base model of an `ft:` name (checkpoint names too), or None if it is not one."""
    parsed = parse(name)
    return None if parsed is None else parsed.base


def slug(name: str) -> str:
    """A safe, deterministic LoRA name for a fine-tuned model: `ft-` + its readable
    characters (runs of anything but [A-Za-z0-9-] become one `_`, so never `/`, `:`, `.`)
    cut to 40, then `-` + 20 hex of SHA-256 of the whole name, so two names never share
    one. At most 64 characters, one path segment. A checkpoint of a job with a hex id reads
    `ckpt-<id>-<step>` instead (its job and step, which `checkpoint_of_slug` gives back)."""
    # surrogatepass: total over every str (json.loads can give lone surrogates)
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_HEX]
    parsed = parse(name)
    if parsed is not None and parsed.step is not None and _JOB_HEX.match(parsed.job_hex):
        return f"{SLUG_PREFIX}ckpt-{parsed.job_hex}-{parsed.step}-{digest}"
    body = name[len(FT_PREFIX) :] if name.startswith(FT_PREFIX) else name
    readable = _UNSAFE.sub("_", body)[:_READABLE_MAX]
    return f"{SLUG_PREFIX}{readable}-{digest}"


def is_slug(text: str) -> bool:
    """Whether a URL segment has the form `slug` gives (checked before any lookup)."""
    return len(text) <= SLUG_MAX and _SLUG.match(text) is not None


def checkpoint_of_slug(text: str) -> tuple[str, int] | None:
    """(job hex, step) when `text` has the form of a checkpoint's slug. The form alone proves
    nothing (a model whose base starts `ckpt-` can share it): the caller compares `slug()` of
    the checkpoint it finds there with `text`."""
    m = _CKPT_SLUG.match(text)
    return None if m is None else (m.group(1), int(m.group(2)))
