"""OpenAI fine-tuning hyperparameters -> real LoRA training settings (pure; docs/fine-tuning.md).

OpenAI's knobs are `n_epochs` (1-50), `batch_size` (1-256) and `learning_rate_multiplier` (> 0),
each a value or "auto", plus `seed` (research node-apis.md §2). They mean:

  * n_epochs   -> passes over the training file. auto: enough passes that a small file is seen
    ~AUTO_EXAMPLE_PASSES times in all, between 3 and 10 (a 10-example file: 10 epochs; 100+: 3).
  * batch_size -> the *effective* batch: examples per optimizer step. auto: ~1/32 of the file,
    a power of two in 1..16. It is split into a per-device micro batch (what fits in memory next
    to the weights) times gradient accumulation steps; the micro batch is the largest divisor of
    the batch that fits, so micro x accumulation == batch exactly.
  * learning_rate_multiplier -> learning rate = multiplier x a base LoRA learning rate by model
    size (BASE_LR: LoRA trains a few million fresh parameters, so its rates are far above a full
    fine-tune's; smaller models take larger steps). auto = 1.0.
  * seed -> torch/python RNGs and the data order; when the job names none, the gateway derives
    one from the job id (seed_for) and reports it on the job, as OpenAI reports its choice.

Fixed LoRA settings: rank LORA_RANK (<= vLLM's default --max-lora-rank 16, and in vLLM's allowed
set), alpha 2 x rank, dropout 0.05, on the attention and MLP linear projections only (no
embeddings, no lm_head: vLLM refuses those, research §3.5). Precision: bf16 where the card has it
(compute capability >= 8.0), fp16 below (T4). 4-bit QLoRA (bitsandbytes NF4) when the base's
16-bit weights plus training overhead do not fit the card (decided from heady_node.presets data).

A quantised served base (AWQ/GPTQ) is trained from its 16-bit sibling (`train_repo`) and the
adapter still names the served string as its base: a LoRA learned on the 16-bit weights applies
to their 4-bit quantisation (that is QLoRA's premise), and vLLM serves LoRA on AWQ/GPTQ bases.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from heady_node.gpu import BF16_COMPUTE_CAPABILITY, GpuClass
from heady_node.presets import GIB, GPU_MEMORY_UTILIZATION, MODELS, Model

# The request side is shared with the gateway (stdlib, src/heady_shared/ftlines.py).
from heady_shared.ftlines import (  # noqa: F401 (re-exported: hparams.Requested, ...)
    AUTO,
    HyperparameterError,
    Requested,
    parse_requested,
    seed_for,
)

AUTO_EXAMPLE_PASSES = 100
AUTO_EPOCHS_MIN, AUTO_EPOCHS_MAX = 3, 10
AUTO_BATCH_MAX = 16
# vLLM's --max-lora-rank choices (vllm/config/lora.py; research §3.1).
VLLM_LORA_RANKS = frozenset({1, 8, 16, 32, 64, 128, 256, 320, 512})
LORA_RANK = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
# Llama/Qwen2 projection names: every linear layer of attention and MLP, nothing else.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Base LoRA learning rate by model size (billions of parameters, upper bound exclusive).
BASE_LR = ((4.0, 2e-4), (10.0, 1e-4), (math.inf, 5e-5))
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.0
# Memory rule for training (estimates, GiB): weights + TRAIN_OVERHEAD_GIB (CUDA context, LoRA
# weights, their Adam state and gradients, allocator slack) + activations of the micro batch
# with gradient checkpointing, ACT_GIB per billion parameters per 1,024 tokens of a sequence.
TRAIN_OVERHEAD_GIB = 3.0
ACT_GIB_PER_B_PER_KTOK = 0.12
NF4_BYTES_PER_PARAM = 0.55  # 4-bit weights + quant constants + 16-bit embeddings/norms
FP16_BYTES_PER_PARAM = 2.0


@dataclass(frozen=True)
class TrainPlan:
    served_base: str  # the string vLLM serves: the adapter's base_model_name_or_path
    train_repo: str  # the checkpoint training loads
    epochs: int
    batch_size: int  # effective: micro_batch x grad_accum
    micro_batch: int
    grad_accum: int
    learning_rate: float
    lr_multiplier: float
    seed: int
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    precision: str  # "bf16" | "fp16" | "fp32" (CPU)
    load_in_4bit: bool
    max_length: int  # tokens per example (the served context)
    warmup_ratio: float = WARMUP_RATIO
    max_grad_norm: float = MAX_GRAD_NORM
    weight_decay: float = WEIGHT_DECAY

    def reported(self) -> dict[str, object]:
        """The job object's `hyperparameters` once resolved (OpenAI reports real values)."""
        return {
            "n_epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.lr_multiplier,
        }

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TrainPlan:
        kw = dict(data)
        kw["target_modules"] = tuple(kw["target_modules"])  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]


def auto_epochs(n_examples: int) -> int:
    want = math.ceil(AUTO_EXAMPLE_PASSES / max(1, n_examples))
    return max(AUTO_EPOCHS_MIN, min(AUTO_EPOCHS_MAX, want))


def auto_batch(n_examples: int) -> int:
    target = max(1, n_examples // 32)
    return min(AUTO_BATCH_MAX, 1 << (target.bit_length() - 1))


def base_lr(params_b: float) -> float:
    return next(lr for bound, lr in BASE_LR if params_b < bound)


_QUANT_SUFFIX = re.compile(r"-(AWQ|GPTQ-Int4|GPTQ-Int8|GPTQ)$", re.IGNORECASE)


def train_repo(served: str) -> str:
    """The 16-bit checkpoint to train for a served base (a quantised one's sibling)."""
    return _QUANT_SUFFIX.sub("", served)


def training_gib(params_b: float, bytes_per_param: float, seq_tokens: int, micro: int) -> float:
    weights = params_b * 1e9 * bytes_per_param / GIB
    acts = ACT_GIB_PER_B_PER_KTOK * params_b * (seq_tokens / 1024) * micro
    return weights + TRAIN_OVERHEAD_GIB + acts


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan(
    requested: Requested,
    *,
    served_base: str,
    n_examples: int,
    max_length: int,
    seq_tokens: int,
    seed: int,
    gpu: GpuClass | None,
    bf16: bool | None = None,
    memory_gib: float | None = None,
    model: Model | None = None,
) -> TrainPlan:
    """Resolve the job's hyperparameters for this node. `seq_tokens`: the longest example's
    tokens (sizes the micro batch); `gpu` None trains on the CPU in fp32 (tests, no card);
    `model` overrides the preset table's entry (a base not in it)."""
    mdl = model or MODELS.get(served_base) or MODELS.get(train_repo(served_base))
    params_b = mdl.params_b if mdl and mdl.params_b else 0.0
    epochs = requested.n_epochs if requested.n_epochs != AUTO else auto_epochs(n_examples)
    batch = requested.batch_size if requested.batch_size != AUTO else auto_batch(n_examples)
    mult = (
        float(requested.learning_rate_multiplier)
        if requested.learning_rate_multiplier != AUTO
        else 1.0
    )
    assert isinstance(epochs, int) and isinstance(batch, int)
    if gpu is None:
        precision, four_bit, micro = "fp32", False, min(batch, 8)
        micro = next(d for d in _divisors_desc(batch) if d <= micro)
    else:
        has_bf16 = gpu.compute_capability >= BF16_COMPUTE_CAPABILITY if bf16 is None else bf16
        precision = "bf16" if has_bf16 else "fp16"
        card = GPU_MEMORY_UTILIZATION * (memory_gib if memory_gib is not None else gpu.memory_gib)
        tokens = max(1, min(seq_tokens, max_length))
        four_bit = training_gib(params_b, FP16_BYTES_PER_PARAM, tokens, 1) > card
        per_param = NF4_BYTES_PER_PARAM if four_bit else FP16_BYTES_PER_PARAM
        micro = next(
            (
                d
                for d in _divisors_desc(batch)
                if training_gib(params_b, per_param, tokens, d) <= card
            ),
            1,
        )
    return TrainPlan(
        served_base=served_base,
        train_repo=train_repo(served_base),
        epochs=epochs,
        batch_size=batch,
        micro_batch=micro,
        grad_accum=batch // micro,
        learning_rate=mult * base_lr(params_b),
        lr_multiplier=mult,
        seed=seed,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=TARGET_MODULES,
        precision=precision,
        load_in_4bit=four_bit,
        max_length=max_length,
    )


def total_steps(plan: TrainPlan, n_examples: int) -> int:
    """Optimizer steps for the whole job (a partial last batch is a step of its own)."""
    return plan.epochs * math.ceil(n_examples / plan.batch_size)
