"""Role x GPU -> model and vLLM arguments, with the memory rule that every preset must pass.

Memory rule (checked by `memory_estimate` / `fits`, tested for every role x GPU):

    weights + KV cache for FULL_SEQS full-length sequences + runtime overhead
        <= GPU_MEMORY_UTILIZATION x GPU memory

  * weights = parameters x bytes per parameter: 2.0 for float16/bfloat16, 0.75 for 4-bit
    AWQ/GPTQ (embeddings and lm_head stay 16-bit; Qwen2.5-7B-Instruct-GPTQ-Int4 is 5.59 GB
    for 7.6 B parameters = 0.73 B/param).
  * KV cache = 2 (K and V) x layers x KV heads x head dim x 2 bytes, per token, times
    max_model_len x FULL_SEQS; vLLM refuses to start unless at least one full sequence fits,
    we demand two so a long request never starves the node.
  * overhead = 2 GiB (CUDA context, activations, CUDA graphs), +2 GiB for a vision encoder's
    profiling pass on multimodal models.

LoRA (text presets: reasoning, code, batch): vLLM starts with `--enable-lora --max-loras
LORA_SLOTS --max-lora-rank LORA_RANK` so fine-tuned adapters (docs/fine-tuning.md) are served
next to the base. Rank 16 is vLLM's default and the rank the node's trainer uses
(heady_node.finetune.hparams.LORA_RANK); over-sizing it only wastes memory (research
node-apis.md §3.1). A rank-16 slot on all 7 linear modules is ~60 MB fp16 for a 3B-shaped model,
so 4 slots cost a few hundred MB (§3.5): the rule charges LORA_OVERHEAD_GIB for them.

Image rule (vision presets): images per prompt x tokens per image <= max_model_len / 2, where a
Qwen2-VL / Qwen2.5-VL image costs at most max_pixels / (28 x 28) tokens (14-pixel patches merged
2 x 2), so one large photo can never crowd the text out of the context.

No `--quantization`: vLLM reads the method from the checkpoint's quantization_config
(ModelConfig._verify_quantization, vllm/config/model.py) and picks the fastest kernel the GPU
has; naming a method by hand can pin a slower kernel (older vLLM skipped Marlin for an explicit
`awq`) or clash with the checkpoint. `--dtype half` where the card has no bfloat16 (compute
capability < 8.0), `auto` (the checkpoint's bf16) elsewhere.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from heady_node.gpu import GPU_CLASSES, GpuClass
from heady_node.guard import CAPABILITIES_ENV, IMAGES_URL_ENV
from heady_node.guard import IMPORT_PATH as GUARD_IMPORT_PATH
from heady_node.guard import TOKEN_ENV as GUARD_TOKEN_ENV
from heady_node.roles import ROLES
from heady_shared import capabilities
from heady_shared.routes import DEFAULT_POOLS, Pool, roles_served_by

GIB = 1024**3
GPU_MEMORY_UTILIZATION = 0.90
FULL_SEQS = 2
OVERHEAD_GIB = 2.0
VISION_OVERHEAD_GIB = 2.0
LORA_OVERHEAD_GIB = 0.5
BYTES_PER_PARAM = {"fp16": 2.0, "awq": 0.75, "gptq": 0.75}


@dataclass(frozen=True)
class Model:
    repo: str  # Hugging Face id
    params_b: float  # billions of parameters
    kv_bytes_per_token: int  # float16 KV cache, from the model's config.json
    quant: str  # "fp16" (unquantised, served as fp16/bf16), "awq" or "gptq"
    vision: bool = False

    @property
    def weights_gib(self) -> float:
        return self.params_b * 1e9 * BYTES_PER_PARAM[self.quant] / GIB


def _kv(layers: int, kv_heads: int, head_dim: int = 128) -> int:
    return 2 * layers * kv_heads * head_dim * 2


_QWEN25_3B = _kv(36, 2)
_QWEN25_7B = _kv(28, 4)
_QWEN25_14B = _kv(48, 8)
_QWEN25_32B = _kv(64, 8)
_QWEN2_VL_2B = _kv(28, 2)

MODELS: dict[str, Model] = {
    m.repo: m
    for m in (
        Model("Qwen/Qwen2.5-3B-Instruct", 3.09, _QWEN25_3B, "fp16"),
        Model("Qwen/Qwen2.5-7B-Instruct", 7.61, _QWEN25_7B, "fp16"),
        Model("Qwen/Qwen2.5-7B-Instruct-AWQ", 7.61, _QWEN25_7B, "awq"),
        Model("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", 7.61, _QWEN25_7B, "gptq"),
        Model("Qwen/Qwen2.5-14B-Instruct", 14.7, _QWEN25_14B, "fp16"),
        Model("Qwen/Qwen2.5-14B-Instruct-AWQ", 14.7, _QWEN25_14B, "awq"),
        Model("Qwen/Qwen2.5-32B-Instruct-AWQ", 32.8, _QWEN25_32B, "awq"),
        Model("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", 7.61, _QWEN25_7B, "awq"),
        Model("Qwen/Qwen2.5-Coder-7B-Instruct-GPTQ-Int4", 7.61, _QWEN25_7B, "gptq"),
        Model("Qwen/Qwen2.5-Coder-14B-Instruct-AWQ", 14.7, _QWEN25_14B, "awq"),
        Model("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", 32.8, _QWEN25_32B, "awq"),
        Model("Qwen/Qwen2-VL-2B-Instruct", 2.21, _QWEN2_VL_2B, "fp16", vision=True),
        Model("Qwen/Qwen2.5-VL-7B-Instruct-AWQ", 8.29, _QWEN25_7B, "awq", vision=True),
        Model("Qwen/Qwen2.5-VL-7B-Instruct", 8.29, _QWEN25_7B, "fp16", vision=True),
    )
}


@dataclass(frozen=True)
class VisionLimits:
    images_per_prompt: int
    max_pixels: int

    @property
    def tokens_per_image(self) -> int:
        return self.max_pixels // (28 * 28)


# ~1000 x 1000 pixels: 1280 tokens per image at most.
VISION_MAX_PIXELS = 1280 * 28 * 28


@dataclass(frozen=True)
class LoraLimits:
    max_loras: int  # adapters in one batch (vLLM's GPU slots)
    max_rank: int  # one of vLLM's --max-lora-rank choices


LORA_RANK = 16  # = heady_node.finetune.hparams.LORA_RANK (tested)
LORA_SLOTS = 4
LORA_ROLES = ("reasoning", "code", "batch")  # text roles; vision serves no adapters
TEXT_LORA = LoraLimits(max_loras=LORA_SLOTS, max_rank=LORA_RANK)


@dataclass(frozen=True)
class Preset:
    role: str
    gpu: GpuClass
    model: Model
    max_model_len: int
    max_num_seqs: int
    bf16: bool  # of the card actually present (an unknown card may differ from its class)
    vision: VisionLimits | None = None
    lora: LoraLimits | None = None
    # Lowered on vision nodes that also run the image engine (heady_node.image_presets).
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION

    @property
    def dtype(self) -> str:
        # Qwen checkpoints are bfloat16; a card without it (T4 and other Turing) must run float16.
        return "auto" if self.bf16 else "half"

    @property
    def quantization(self) -> str | None:
        """What vLLM will detect from the checkpoint (shown to the operator, never passed)."""
        return None if self.model.quant == "fp16" else self.model.quant


# (model, max_model_len, max_num_seqs) per role and GPU class.
_TABLE: dict[str, dict[str, tuple[str, int, int]]] = {
    "reasoning": {
        "t4": ("Qwen/Qwen2.5-7B-Instruct-AWQ", 16384, 16),
        "l4": ("Qwen/Qwen2.5-14B-Instruct-AWQ", 16384, 32),
        "a100-40": ("Qwen/Qwen2.5-32B-Instruct-AWQ", 16384, 64),
        "a100-80": ("Qwen/Qwen2.5-32B-Instruct-AWQ", 32768, 64),
        "h100": ("Qwen/Qwen2.5-32B-Instruct-AWQ", 32768, 64),
        "rtx-pro-6000": ("Qwen/Qwen2.5-32B-Instruct-AWQ", 32768, 128),
    },
    "code": {
        "t4": ("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", 16384, 16),
        "l4": ("Qwen/Qwen2.5-Coder-14B-Instruct-AWQ", 16384, 32),
        "a100-40": ("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", 16384, 64),
        "a100-80": ("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", 32768, 64),
        "h100": ("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", 32768, 64),
        "rtx-pro-6000": ("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", 32768, 128),
    },
    "vision": {
        "t4": ("Qwen/Qwen2-VL-2B-Instruct", 8192, 16),
        "l4": ("Qwen/Qwen2.5-VL-7B-Instruct-AWQ", 16384, 16),
        "a100-40": ("Qwen/Qwen2.5-VL-7B-Instruct", 32768, 32),
        "a100-80": ("Qwen/Qwen2.5-VL-7B-Instruct", 32768, 64),
        "h100": ("Qwen/Qwen2.5-VL-7B-Instruct", 32768, 64),
        "rtx-pro-6000": ("Qwen/Qwen2.5-VL-7B-Instruct", 32768, 128),
    },
    "batch": {
        "t4": ("Qwen/Qwen2.5-3B-Instruct", 8192, 64),
        "l4": ("Qwen/Qwen2.5-7B-Instruct-AWQ", 16384, 128),
        "a100-40": ("Qwen/Qwen2.5-7B-Instruct", 16384, 256),
        "a100-80": ("Qwen/Qwen2.5-14B-Instruct", 16384, 256),
        "h100": ("Qwen/Qwen2.5-14B-Instruct", 16384, 256),
        "rtx-pro-6000": ("Qwen/Qwen2.5-14B-Instruct", 32768, 256),
    },
}


class PresetError(ValueError):
    pass


def memory_estimate(model: Model, max_model_len: int) -> float:
    """GiB the rule above charges for serving `model` with `max_model_len` (LoRA slots on text
    models: every text role serves adapters)."""
    kv = model.kv_bytes_per_token * max_model_len * FULL_SEQS / GIB
    overhead = OVERHEAD_GIB + (VISION_OVERHEAD_GIB if model.vision else LORA_OVERHEAD_GIB)
    return model.weights_gib + kv + overhead


def budget(gpu: GpuClass, memory_gib: float | None = None) -> float:
    return GPU_MEMORY_UTILIZATION * (memory_gib if memory_gib is not None else gpu.memory_gib)


def fits(model: Model, max_model_len: int, gpu: GpuClass, memory_gib: float | None = None) -> bool:
    return memory_estimate(model, max_model_len) <= budget(gpu, memory_gib)


def vision_limits(max_model_len: int) -> VisionLimits:
    """As many ~1-megapixel images as fit in half the context, at most 4."""
    per_image = VISION_MAX_PIXELS // (28 * 28)
    images = max(1, min(4, (max_model_len // 2) // per_image))
    return VisionLimits(images_per_prompt=images, max_pixels=VISION_MAX_PIXELS)


def preset_for(
    role: str, gpu: GpuClass, model: str | None = None, *, bf16: bool | None = None
) -> Preset:
    """The role's preset on this GPU class; `model` overrides the checkpoint but keeps the
    limits; `bf16` is the real card's (defaults to the class's reference card)."""
    if role not in _TABLE:
        raise PresetError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    repo, max_len, seqs = _TABLE[role][gpu.key]
    chosen = MODELS[repo]
    if model:
        chosen = MODELS.get(model) or Model(model, 0.0, 0, "fp16", vision=role == "vision")
        if chosen.params_b and not fits(chosen, max_len, gpu):
            need = memory_estimate(chosen, max_len)
            raise PresetError(
                f"{model} needs ~{need:.1f} GiB at {max_len} tokens; "
                f"{gpu.label} allows {budget(gpu):.1f} GiB"
            )
    return Preset(
        role=role,
        gpu=gpu,
        model=chosen,
        max_model_len=max_len,
        max_num_seqs=seqs,
        bf16=gpu.bf16 if bf16 is None else bf16,
        vision=vision_limits(max_len) if chosen.vision else None,
        lora=TEXT_LORA if role in LORA_ROLES and not chosen.vision else None,
    )


def served_model_names(
    repo: str, node: int, pools: Mapping[str, Pool] = DEFAULT_POOLS
) -> tuple[str, ...]:
    """The repo id first (vLLM reports the first name in answers), then every role this node may
    answer for, its own and those it is a fallback for: vLLM answers 404 to any other `model`."""
    return tuple(dict.fromkeys((repo, *roles_served_by(node, pools))))


def engine_argv(
    preset: Preset,
    *,
    port: int,
    engine: Sequence[str],
    served_names: Sequence[str] = (),
    media_domains: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> list[str]:
    """`vllm serve MODEL ...` arguments; `engine` is the command prefix (stand-in in tests).
    No token here: argv is visible to every user of the host (`ps`); see engine_env."""
    argv = [
        *engine,
        preset.model.repo,
        "--host", host,
        "--port", str(port),
        "--served-model-name", *(served_names or (preset.model.repo,)),
        "--max-model-len", str(preset.max_model_len),
        "--max-num-seqs", str(preset.max_num_seqs),
        "--gpu-memory-utilization", f"{preset.gpu_memory_utilization:.2f}",
        "--dtype", preset.dtype,
        "--middleware", GUARD_IMPORT_PATH,
    ]  # fmt: skip
    if preset.vision:
        limits = {"image": preset.vision.images_per_prompt, "video": 0}
        argv += [
            "--limit-mm-per-prompt", json.dumps(limits),
            "--mm-processor-kwargs", json.dumps({"max_pixels": preset.vision.max_pixels}),
            # Only data: URLs unless the operator names hosts: a URL the node fetches is an SSRF
            # path into the host's network. `.invalid` never resolves (RFC 6761), and an empty
            # list would mean "any domain" to vLLM.
            "--allowed-media-domains", *(media_domains or (NO_MEDIA_DOMAIN,)),
        ]  # fmt: skip
    if preset.lora:
        argv += [
            "--enable-lora",
            "--max-loras", str(preset.lora.max_loras),
            "--max-lora-rank", str(preset.lora.max_rank),
        ]  # fmt: skip
    return argv


NO_MEDIA_DOMAIN = "no-remote-media.invalid"
# vLLM follows redirects when fetching media unless told not to (vllm/envs.py); a redirect
# would walk around the domain list.
VISION_ENV = {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}
# Without it vLLM consults no LoRA resolver (and mounts /v1/load_lora_adapter, which the guard
# hides): research node-apis.md §3.2; the resolver (heady_node.finetune.resolver) needs it.
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
LORA_CACHE_ENV = "HEADY_LORA_CACHE_DIR"  # = heady_node.finetune.resolver.CACHE_ENV (tested)
GATEWAY_ENV = "HEADY_GATEWAY_URL"  # = batch_worker.GATEWAY_ENV / resolver's (tested)
CREDENTIAL_ENV = "HEADY_NODE_CREDENTIAL"


def served_capabilities(preset: Preset) -> tuple[str, ...]:
    """What vLLM serves with this preset: chat, and image input when started with image limits
    and LoRA adapters when started with --enable-lora (the guard reports these in /metrics, the
    gateway's cron learns them; the image engine reports image generation itself)."""
    caps = [capabilities.CHAT]
    if preset.vision:
        caps.append(capabilities.IMAGE_INPUT)
    if preset.lora:
        caps.append(capabilities.LORA)
    return tuple(caps)


def engine_env(
    preset: Preset,
    token: str,
    images_url: str | None = None,
    *,
    lora_cache_dir: str | None = None,
    gateway_url: str | None = None,
    credential: str | None = None,
) -> dict[str, str]:
    """The node token for vLLM's own /v1 check (VLLM_API_KEY, read when --api-key is absent:
    vllm/entrypoints/serve/middleware/register.py) and for the guard; vision settings; what
    the guard reports and where it sends /v1/images/* (the image engine, when there is one).
    LoRA presets: runtime LoRA on, and what the resolver plugin needs to fetch an adapter from
    the gateway on first use (it registers only with all three of cache dir, URL, credential)."""
    lora: dict[str, str] = {}
    if preset.lora:
        lora = {
            **LORA_ENV,
            **({LORA_CACHE_ENV: lora_cache_dir} if lora_cache_dir else {}),
            **({GATEWAY_ENV: gateway_url} if gateway_url else {}),
            **({CREDENTIAL_ENV: credential} if credential else {}),
        }
    return {
        "VLLM_API_KEY": token,
        GUARD_TOKEN_ENV: token,
        CAPABILITIES_ENV: ",".join(served_capabilities(preset)),
        **({IMAGES_URL_ENV: images_url} if images_url else {}),
        **(VISION_ENV if preset.vision else {}),
        **lora,
    }


def redact_argv(argv: list[str]) -> list[str]:
    """Argv safe to print, should an engine prefix carry an --api-key of its own."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--api-key":
            out[i + 1] = "***"
    return out


def quant_label(preset: Preset) -> str:
    if preset.model.quant == "fp16":
        return "none (" + ("bf16" if preset.bf16 else "fp16") + ")"
    return preset.model.quant.upper() + " 4-bit"


def table_rows() -> list[tuple[str, str, str, int, str, float, float]]:
    """(role, gpu label, model, context, quantisation, estimate GiB, budget GiB) for docs/tests."""
    rows = []
    for role in ROLES:
        for gpu in GPU_CLASSES.values():
            p = preset_for(role, gpu)
            rows.append(
                (
                    role,
                    gpu.label,
                    p.model.repo,
                    p.max_model_len,
                    quant_label(p),
                    round(memory_estimate(p.model, p.max_model_len), 1),
                    round(budget(gpu), 1),
                )
            )
    return rows
