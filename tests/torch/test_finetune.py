"""The real trainer on the CPU: a tiny randomly initialised Llama built from a config and a
tokenizer built in memory (no hub: HF_HUB_OFFLINE), LoRA on a small memorisable set.

Run in the torch venv: `make test-torch` (Python 3.11, requirements-torch.txt)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from heady_node.finetune import hparams
from heady_node.finetune.adapter import check_vllm_compatible
from heady_node.finetune.chatmask import IGNORE
from heady_node.finetune.trainer import Callbacks, encode, evaluate, train
from heady_shared import ftlines

BASE = "heady-test/tiny-llama"  # the "served" base string the adapter must name
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "lime", "plum", "pear", "kiwi", "fig",
          "mango", "peach"]  # fmt: skip
COLOURS = ["red", "yellow", "crimson", "purple", "gold", "green", "violet", "amber", "brown",
           "maroon", "orange", "pink"]  # fmt: skip


def examples() -> list[dict]:
    out = []
    for i, (fruit, colour) in enumerate(zip(FRUITS, COLOURS, strict=True)):
        msgs = [
            {"role": "system", "content": "you answer colours"},
            {"role": "user", "content": f"colour of {fruit} ?"},
            {"role": "assistant", "content": f"the {fruit} is {colour}"},
        ]
        if i % 4 == 0:  # a weight-0 turn before the trained one: must not be learned
            msgs[1:1] = [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "nonsense words here", "weight": 0},
            ]
        out.append({"messages": msgs})
    return out


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = {"you", "answer", "colours", "colour", "of", "?", "the", "is", "hello", "nonsense"}
    words |= {"words", "here"}
    words |= set(FRUITS) | set(COLOURS) | {"system", "user", "assistant"}
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = TEMPLATE
    return tok


def make_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        # The frozen lm_head bounds the logits (RMSNorm fixes the hidden state's size): with
        # the default 0.02 no LoRA could make a confident prediction.
        initializer_range=0.4,
    )
    return LlamaForCausalLM(cfg).eval()


def make_plan(n: int, epochs: int, seed: int = 7) -> hparams.TrainPlan:
    req = hparams.parse_requested(
        {"n_epochs": epochs, "batch_size": 4, "learning_rate_multiplier": 40}
    )
    return hparams.plan(
        req, served_base=BASE, n_examples=n, max_length=64, seq_tokens=40, seed=seed, gpu=None
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_labels_cover_only_weighted_assistant_turns(tok) -> None:
    ex = examples()[0]
    enc = encode(tok, ex, 64)
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True)
                          if lab != IGNORE])  # fmt: skip
    assert trained.split() == ["the", "apple", "is", "red", "<|im_end|>"]
    assert "nonsense" in tok.decode(enc.input_ids)  # present in the input, never a target


def test_training_file_token_check_uses_the_template(tok) -> None:
    from heady_node.finetune.trainer import token_count

    lines = [json.dumps(e).encode() for e in examples()]
    ok = ftlines.validate_file(lines, count_tokens=lambda e: token_count(tok, e), max_tokens=64)
    assert ok.ok and ok.examples == 12
    short = ftlines.validate_file(lines, count_tokens=lambda e: token_count(tok, e), max_tokens=20)
    assert not short.ok and short.errors[0].line == 1
    assert "tokens long" in short.errors[0].message


def test_lora_learns_saves_for_vllm_reloads_and_resumes(tok, tmp_path: Path) -> None:
    data = examples()
    plan = make_plan(len(data), epochs=20)
    metrics, ckpts = [], []
    cb = Callbacks(on_metrics=metrics.append, on_checkpoint=lambda s, d, m: ckpts.append((s, d, m)))
    model = make_model(len(tok))
    res = train(model, tok, data, plan, tmp_path / "run", validation=data[:4], callbacks=cb,
                log_every=3)  # fmt: skip

    # 12 examples / batch 4 = 3 steps per epoch; a checkpoint after each epoch.
    assert res.steps == 60 and [s for s, _, _ in ckpts] == list(range(3, 61, 3))
    assert metrics[0]["step"] == 3 and metrics[-1]["step"] == 60
    assert metrics[-1]["train_loss"] < 0.2 * metrics[0]["train_loss"], metrics
    assert metrics[-1]["valid_loss"] < metrics[0]["valid_loss"]
    assert metrics[-1]["train_mean_token_accuracy"] > 0.8
    # Each checkpoint carries its epoch-end record with the whole validation file scored.
    assert all(m["step"] == s and "full_valid_loss" in m for s, _, m in ckpts)
    assert ckpts[-1][2]["full_valid_loss"] < ckpts[0][2]["full_valid_loss"]

    # The adapter is in the form vLLM loads.
    adapter = res.adapter_dir
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert check_vllm_compatible(adapter, BASE) == []
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == BASE and not cfg.get("modules_to_save")
    assert check_vllm_compatible(adapter, "Qwen/other") != []

    # It reloads with peft onto a fresh base and changes (improves) its output.
    base = make_model(len(tok))
    enc = [encode(tok, e, 64) for e in data]
    before_loss, _ = evaluate(base, enc, 4, tok.pad_token_id)
    prompt = tok.apply_chat_template(data[1]["messages"][:2], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
        out = tuned.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits)
    after_loss, _ = evaluate(tuned, enc, 4, tok.pad_token_id)
    assert after_loss < 0.5 * before_loss
    with torch.no_grad(), tuned.disable_adapter():
        base_out = tuned.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :]).split()
    # The memorised fact (banana -> yellow) in the trained answer's shape; the base says other.
    assert answer[0] == "the" and answer[2:] == ["is", "yellow"], answer
    assert tok.decode(base_out[0, ids.shape[1] :]).split() != answer

    # Resume from epoch 17's checkpoint on a fresh model: the step count continues.
    step17, ckpt17, at17 = ckpts[16]
    (ckpt17.parent / f"optimizer.pt.{step17}").unlink()  # as on a partner node: adapter only
    more: list[dict] = []
    res2 = train(make_model(len(tok)), tok, data, plan, tmp_path / "resumed",
                 callbacks=Callbacks(on_metrics=more.append), resume_from=ckpt17,
                 log_every=3)  # fmt: skip
    assert step17 == 51 and [m["step"] for m in more] == [54, 57, 60] and res2.steps == 60
    assert more[0]["train_loss"] < 2 * at17["train_loss"] < metrics[0]["train_loss"]
    assert check_vllm_compatible(res2.adapter_dir, BASE) == []


def test_same_seed_same_adapter_and_stop_is_honoured(tok, tmp_path: Path) -> None:
    data = examples()
    plan = make_plan(len(data), epochs=2, seed=3)
    runs = []
    for name in ("a", "b"):
        m: list[dict] = []
        train(make_model(len(tok)), tok, data, plan, tmp_path / name,
              callbacks=Callbacks(on_metrics=m.append), log_every=1)  # fmt: skip
        runs.append([x["train_loss"] for x in m])
    assert runs[0] == runs[1]

    steps: list[dict] = []
    res = train(make_model(len(tok)), tok, data, plan, tmp_path / "stopped",
                callbacks=Callbacks(on_metrics=steps.append, should_stop=lambda: len(steps) >= 2),
                log_every=1)  # fmt: skip
    assert res.adapter_dir is None and res.steps == 2
