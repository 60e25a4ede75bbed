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
"""

from dataclasses import dataclass, field

from heady_node.gpu import GPU_CLASSES, GpuClass
from heady_node.roles import ROLES

GIB = 1024**3
GPU_MEMORY_UTILIZATION = 0.90
FULL_SEQS = 2
OVERHEAD_GIB = 2.0
VISION_OVERHEAD_GIB = 2.0
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
class Preset:
    role: str
    gpu: GpuClass
    model: Model
    max_model_len: int
    max_num_seqs: int
    extra_args: tuple[str, ...] = field(default=())

    @property
    def dtype(self) -> str:
        # Turing/Volta have no bfloat16; Qwen checkpoints default to it, so force float16.
        return "auto" if self.gpu.bf16 else "half"

    @property
    def quantization(self) -> str | None:
        return None if self.model.quant == "fp16" else self.model.quant


# (model, max_model_len, max_num_seqs) per role and GPU class.
_TABLE: dict[str, dict[str, tuple[str, int, int]]] = {
    "reasoning": {
        "t4": ("Qwen/Qwen2.5-7B-Instruct-AWQ", 16384, 16),
        "v100": ("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", 16384, 16),
        "l4": ("Qwen/Qwen2.5-14B-Instruct-AWQ", 16384, 32),
        "a100-40": ("Qwen/Qwen2.5-32B-Instruct-AWQ", 16384, 64),
        "a100-80": ("Qwen/Qwen2.5-32B-Instruct-AWQ", 32768, 64),
    },
    "code": {
        "t4": ("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", 16384, 16),
        "v100": ("Qwen/Qwen2.5-Coder-7B-Instruct-GPTQ-Int4", 16384, 16),
        "l4": ("Qwen/Qwen2.5-Coder-14B-Instruct-AWQ", 16384, 32),
        "a100-40": ("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", 16384, 64),
        "a100-80": ("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", 32768, 64),
    },
    "vision": {
        "t4": ("Qwen/Qwen2-VL-2B-Instruct", 8192, 16),
        "v100": ("Qwen/Qwen2-VL-2B-Instruct", 8192, 16),
        "l4": ("Qwen/Qwen2.5-VL-7B-Instruct-AWQ", 16384, 16),
        "a100-40": ("Qwen/Qwen2.5-VL-7B-Instruct", 32768, 32),
        "a100-80": ("Qwen/Qwen2.5-VL-7B-Instruct", 32768, 64),
    },
    "batch": {
        "t4": ("Qwen/Qwen2.5-3B-Instruct", 8192, 64),
        "v100": ("Qwen/Qwen2.5-3B-Instruct", 8192, 64),
        "l4": ("Qwen/Qwen2.5-7B-Instruct-AWQ", 16384, 128),
        "a100-40": ("Qwen/Qwen2.5-7B-Instruct", 16384, 256),
        "a100-80": ("Qwen/Qwen2.5-14B-Instruct", 16384, 256),
    },
}


class PresetError(ValueError):
    pass


def memory_estimate(model: Model, max_model_len: int) -> float:
    """GiB the rule above charges for serving `model` with `max_model_len`."""
    kv = model.kv_bytes_per_token * max_model_len * FULL_SEQS / GIB
    overhead = OVERHEAD_GIB + (VISION_OVERHEAD_GIB if model.vision else 0.0)
    return model.weights_gib + kv + overhead


def budget(gpu: GpuClass, memory_gib: float | None = None) -> float:
    return GPU_MEMORY_UTILIZATION * (memory_gib if memory_gib is not None else gpu.memory_gib)


def fits(model: Model, max_model_len: int, gpu: GpuClass, memory_gib: float | None = None) -> bool:
    return memory_estimate(model, max_model_len) <= budget(gpu, memory_gib)


def kernels_supported(model: Model, gpu: GpuClass) -> bool:
    return model.quant != "awq" or gpu.awq


def preset_for(role: str, gpu: GpuClass, model: str | None = None) -> Preset:
    """The role's preset on this GPU; `model` overrides the checkpoint but keeps the limits."""
    if role not in _TABLE:
        raise PresetError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    repo, max_len, seqs = _TABLE[role][gpu.key]
    chosen = MODELS[repo]
    if model:
        chosen = MODELS.get(model) or Model(model, 0.0, 0, "fp16", vision=role == "vision")
        if chosen.params_b and not kernels_supported(chosen, gpu):
            raise PresetError(f"{model} is AWQ, which vLLM cannot run on {gpu.label}")
        if chosen.params_b and not fits(chosen, max_len, gpu):
            need = memory_estimate(chosen, max_len)
            raise PresetError(
                f"{model} needs ~{need:.1f} GiB at {max_len} tokens; "
                f"{gpu.label} allows {budget(gpu):.1f} GiB"
            )
    return Preset(role=role, gpu=gpu, model=chosen, max_model_len=max_len, max_num_seqs=seqs)


def engine_argv(
    preset: Preset, *, port: int, api_key: str, engine: list[str], host: str = "127.0.0.1"
) -> list[str]:
    """`vllm serve MODEL ...` arguments; `engine` is the command prefix (stand-in in tests)."""
    argv = [
        *engine,
        preset.model.repo,
        "--host", host,
        "--port", str(port),
        "--api-key", api_key,
        "--served-model-name", preset.model.repo,
        "--max-model-len", str(preset.max_model_len),
        "--max-num-seqs", str(preset.max_num_seqs),
        "--gpu-memory-utilization", f"{GPU_MEMORY_UTILIZATION:.2f}",
        "--dtype", preset.dtype,
    ]  # fmt: skip
    if preset.quantization:
        argv += ["--quantization", preset.quantization]
    return argv + list(preset.extra_args)


def redact_argv(argv: list[str]) -> list[str]:
    """Argv safe to print: the API key is the cluster's NODE_TOKEN."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--api-key":
            out[i + 1] = "***"
    return out


def table_rows() -> list[tuple[str, str, str, int, str, float, float]]:
    """(role, gpu label, model, context, quantisation, estimate GiB, budget GiB) for docs/tests."""
    rows = []
    for role in ROLES:
        for gpu in GPU_CLASSES.values():
            p = preset_for(role, gpu)
            quant = {"fp16": "none (" + ("bf16" if gpu.bf16 else "fp16") + ")"}.get(
                p.model.quant, p.model.quant.upper() + " 4-bit"
            )
            rows.append(
                (
                    role,
                    gpu.label,
                    p.model.repo,
                    p.max_model_len,
                    quant,
                    round(memory_estimate(p.model, p.max_model_len), 1),
                    round(budget(gpu), 1),
                )
            )
    return rows
