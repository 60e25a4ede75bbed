"""The rules a saved LoRA adapter must follow for vLLM to load it (pure: stdlib only).

`check_vllm_compatible(adapter_dir, base)` reads `adapter_config.json` and the header of
`adapter_model.safetensors` (8-byte little-endian length + JSON: no torch needed) and lists every
broken rule, so the node refuses to upload an adapter that vLLM would refuse on first use.

The rules (research node-apis.md §3.1, §3.3, §3.5; vLLM 0.33.0's `vllm/lora/peft_helper.py`
`PEFTHelper._validate_features`/`validate_legal` and `vllm/lora/lora_model.py`
`LoRAModel.from_local_checkpoint` (unexpected modules, embedding weights) check the same):
  * `peft_type` is "LORA" (vLLM's filesystem resolver checks it; vLLM has no DoRA: `use_dora`
    false) and `bias` is "none";
  * `base_model_name_or_path` equals the string the node gives `vllm serve` (the filesystem
    resolver accepts an adapter only then);
  * the rank `r` (and every `rank_pattern` value) is one of vLLM's --max-lora-rank choices and
    at most the node's --max-lora-rank;
  * no `modules_to_save`, no embedding or lm_head target, no weights for them, no
    `lora_embedding_*` tensors ("... is unsupported LoRA weight": vllm#9280, #21500);
  * no added tokens: vLLM dropped extra-vocabulary LoRA (`lora_extra_vocab_size` deprecated), so
    no `added_tokens.json` and no `new_embeddings.*` next to the adapter;
  * no LoRA bias, aLoRA, layer replication, BD-LoRA, QALoRA, and no init that rewrites the
    base weights (PiSSA, OLoRA, LoftQ, ...);
  * every tensor is a `lora_A`/`lora_B` weight whose rank dimension matches the config.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from heady_node.finetune.hparams import VLLM_LORA_RANKS

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FORBIDDEN_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")
MAX_HEADER = 100 * 1024 * 1024
# String inits vLLM accepts (PEFTHelper._init_is_supported): they leave the base weights alone.
VLLM_INITS = frozenset(
    {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
)  # safetensors' own limit on the JSON header


class AdapterError(ValueError):
    pass


def safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """Tensor name -> {dtype, shape, data_offsets} from a .safetensors file's header."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise AdapterError(f"{path.name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise AdapterError(f"{path.name} has an implausible header length {n}")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name}'s header is not a JSON object")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _forbidden(name: str) -> bool:
    return any(part in FORBIDDEN_MODULES for part in name.split("."))


def config_problems(cfg: Mapping[str, object], base: str, max_rank: int | None) -> list[str]:
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, vLLM loads only 'LORA'")
    if cfg.get("base_model_name_or_path") != base:
        problems.append(
            f"base_model_name_or_path is {cfg.get('base_model_name_or_path')!r}, "
            f"the served base is {base!r}"
        )
    ranks = [cfg.get("r")]
    pattern = cfg.get("rank_pattern")
    if isinstance(pattern, Mapping):
        ranks += list(pattern.values())
    for r in ranks:
        if not isinstance(r, int) or r not in VLLM_LORA_RANKS:
            allowed = ", ".join(map(str, sorted(VLLM_LORA_RANKS)))
            problems.append(f"rank {r!r} is not one of vLLM's --max-lora-rank choices ({allowed})")
        elif max_rank is not None and r > max_rank:
            problems.append(f"rank {r} exceeds the node's --max-lora-rank {max_rank}")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save is {cfg.get('modules_to_save')!r}; vLLM loads none")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        problems.append("target_modules is a regex; name the linear layers explicitly")
    elif not isinstance(targets, list) or not targets:
        problems.append("target_modules is missing")
    else:
        bad = [t for t in targets if not isinstance(t, str) or _forbidden(t)]
        if bad:
            problems.append(f"target_modules includes embedding/lm_head layers {bad}")
    if cfg.get("use_dora"):
        problems.append("use_dora is true; vLLM has no DoRA")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias is {cfg.get('bias')!r}; vLLM needs 'none'")
    # vLLM 0.33.0 vllm/lora/peft_helper.py PEFTHelper._validate_features refuses these too.
    for key in ("lora_bias", "alora_invocation_tokens", "layer_replication", "use_bdlora",
                "use_qalora"):  # fmt: skip
        if cfg.get(key):
            problems.append(f"{key} is set; vLLM does not support it")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        problems.append(f"init_lora_weights is {init!r}: it changes the base weights vLLM serves")
    return problems


def weight_problems(header: Mapping[str, Mapping[str, object]], rank: object) -> list[str]:
    problems = []
    if not header:
        problems.append(f"{WEIGHTS} holds no tensors")
    for name, info in header.items():
        if "modules_to_save" in name or _forbidden(name.removeprefix("base_model.model.")):
            problems.append(f"tensor {name} is an embedding/lm_head/modules_to_save weight")
            continue
        if "lora_embedding" in name:
            problems.append(f"tensor {name} is an embedding LoRA weight")
            continue
        shape = info.get("shape") if isinstance(info, Mapping) else None
        if name.endswith("lora_A.weight"):
            if isinstance(rank, int) and not (isinstance(shape, list) and shape[:1] == [rank]):
                problems.append(f"tensor {name} has shape {shape}, rank {rank} expected first")
        elif name.endswith("lora_B.weight"):
            if isinstance(rank, int) and not (isinstance(shape, list) and shape[-1:] == [rank]):
                problems.append(f"tensor {name} has shape {shape}, rank {rank} expected last")
        else:
            problems.append(f"tensor {name} is not a lora_A/lora_B weight")
    return problems


def check_vllm_compatible(
    adapter_dir: str | Path, base: str, *, max_rank: int | None = None
) -> list[str]:
    """Every rule the adapter in `adapter_dir` breaks for a node serving `base` (empty: ok)."""
    d = Path(adapter_dir)
    cfg_path, weights = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file():
        return [f"{CONFIG} is missing"]
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError:
        return [f"{CONFIG} is not JSON"]
    if not isinstance(cfg, dict):
        return [f"{CONFIG} is not a JSON object"]
    problems = config_problems(cfg, base, max_rank)
    if not weights.is_file():
        problems.append(f"{WEIGHTS} is missing (save with safe_serialization)")
    else:
        try:
            header = safetensors_header(weights)
        except (AdapterError, ValueError, OSError) as exc:
            problems.append(str(exc))
        else:
            rank = None if cfg.get("rank_pattern") else cfg.get("r")
            problems += weight_problems(header, rank)
    for extra in ("added_tokens.json", "new_embeddings.safetensors", "new_embeddings.bin"):
        if (d / extra).exists():
            problems.append(f"{extra} present: vLLM serves no added tokens")
    return problems


def assert_vllm_compatible(adapter_dir: str | Path, base: str, **kw: int | None) -> None:
    problems = check_vllm_compatible(adapter_dir, base, **kw)
    if problems:
        raise AdapterError("adapter not loadable by vLLM: " + "; ".join(problems))


def pack_dir(d: Path, names: Sequence[str] = (CONFIG, WEIGHTS)) -> bytes:
    """A plain tar of `names` from `d`: how adapters and checkpoints travel to and from the
    gateway (application/x-tar; stdlib on both ends)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = (d / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
