"""The SIMULATED CLUSTER's training base: a tiny random model that stands in for the served base.

    NEVER ON A REAL NODE. An adapter trained on this stand-in is random noise to the real
    base model whose name it carries; vLLM would load it (the shapes are LoRA's, the base
    name matches) and answer nonsense. The runner accepts it only with `--gpu cpu`.

Why it exists: `make dev` runs the real fine-tuning runner (heady_node.finetune.runner) beside
the simulated batch pair (sim.fleet), so the README's fine-tuning calls complete offline on the
CPU: lease, validation, hyperparameters, training loop, checkpoints, adapter upload, commit, and
the adapter fetched by the simulated nodes' real LoRA resolver. Only the weights are fake: the
served bases (Qwen2.5 3B-14B) cannot train on a laptop's CPU, nor be downloaded offline.

The stand-in (`load` / `load_tokenizer`, the runner's Loader / TokenizerLoader under
`--dev-base`):
  * a Llama built from a config with fixed random weights (seeded: the same model on every
    call, so a partner node resuming a checkpoint resumes the same model), the projections
    LoRA targets (q/k/v/o, gate/up/down) present, a few hundred thousand parameters;
  * a byte-level tokenizer built in memory (no hub, no files): the 256 byte symbols plus the
    ChatML specials, so it encodes any text (any language, emoji, code) without an unknown
    token, each UTF-8 byte one token;
  * the ChatML chat template the Qwen2.5 bases use (`<|im_start|>role\\n...<|im_end|>\\n`),
    so token counts and assistant-turn masking behave as the real template's do.
"""

from __future__ import annotations

import logging
from typing import Any

from heady_node.finetune.hparams import TrainPlan

log = logging.getLogger("heady_node.finetune")

__all__ = [
    "CHATML",
    "SEED",
    "SPECIALS",
    "load",
    "load_tokenizer",
    "make_model",
    "make_tokenizer",
    "warm",
]

SEED = 0
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (PAD, IM_START, IM_END)
# ChatML as Qwen2.5 writes it (without its default system prompt and tool-call wording): an
# assistant turn that only calls tools renders its calls as JSON, so it has tokens to train on.
CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for p in m['content'] %}{{ p.get('text', '') }}{% endfor %}"
    "{% endif %}"
    "{% if m.get('tool_calls') %}{{ m['tool_calls'] | tojson }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Small enough to train a few hundred steps in seconds on one core, big enough to learn a
# handful of short answers. max_position_embeddings: RoPE has no hard limit; this is the size
# reported in the config, not a truncation (the plan's max_length truncates).
HIDDEN, LAYERS, HEADS, KV_HEADS, MLP = 64, 2, 4, 2, 128
POSITIONS = 32768


def make_tokenizer() -> Any:
    """Byte-level BPE with no merges: every UTF-8 byte of any text is one of 256 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *sorted(alphabet)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHATML
    return tok


def make_model(vocab_size: int, seed: int = SEED) -> Any:
    """The same random Llama for the same seed (fp32, on the CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=POSITIONS,
        pad_token_id=0,
        tie_word_embeddings=False,
        # The frozen lm_head bounds the logits (RMSNorm fixes the hidden state's size): with
        # the default 0.02 no LoRA could make a confident prediction.
        initializer_range=0.4,
    )
    with torch.random.fork_rng():  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def load_tokenizer(repo: str) -> Any:
    """The runner's TokenizerLoader under --dev-base: the same tokenizer whatever `repo`."""
    del repo  # the stand-in stands in for every base
    return make_tokenizer()


def load(plan: TrainPlan) -> tuple[Any, Any]:
    """The runner's Loader under --dev-base: (stand-in model, tokenizer) for `plan`'s base.
    The adapter still names `plan.served_base` (the trainer writes it), as on a real node."""
    log.warning(
        "--dev-base: training the simulated cluster's tiny random stand-in under the name %s "
        "(not that model: the adapter is for the simulator only)",
        plan.served_base,
    )
    tok = make_tokenizer()
    model = make_model(len(tok))
    model.name_or_path = plan.served_base  # as from_pretrained sets it (peft reads it)
    return model, tok


def warm() -> None:
    """Import torch and transformers and build the stand-in once, in the background before
    the first lease (the runner imports them lazily): ~10 s on a shared CPU that would
    otherwise fall inside the first job. Logs the outcome; a failure shows again in the job."""
    try:
        make_model(len(make_tokenizer()))
    except Exception as exc:  # logged; the job reports it as its error too
        log.warning("--dev-base: the stand-in base cannot be built here: %s", exc)
        return
    log.info("--dev-base: the stand-in base is ready (torch and transformers loaded)")
