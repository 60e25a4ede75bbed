"""LoRA training on OpenAI chat examples: peft over transformers, a plain torch loop.

Why not trl's SFTTrainer: per-turn assistant `weight` (OpenAI's format) is not something its
`assistant_only_loss` expresses (that needs `{% generation %}` markers in the template and trains
every assistant turn), the loop below is ~150 lines we control (loss normalisation across
gradient accumulation, metrics, checkpoint and resume semantics), and it saves importing
trl + datasets on every job (measured in docs/fine-tuning.md).

The loop:
  * every example is rendered with the tokenizer's chat template; labels are -100 except on
    assistant turns with weight 1 (heady_node.finetune.chatmask);
  * each epoch visits the examples in an order drawn from `seed + epoch` (so a resumed job sees
    the same order as the one it replaces), in optimizer steps of `batch_size` examples, each
    step made of micro batches of `micro_batch`; the loss is the mean over the *step's* trained
    tokens (summed over its micro batches), so accumulation does not change the maths;
  * AdamW, linear warmup (warmup_ratio) then linear decay to 0, gradient clipping;
  * every `log_every` steps and at each epoch's end: a metrics record (step, train loss and
    token accuracy since the last record; with a validation file, valid_loss/accuracy over its
    first VALID_SAMPLE examples, and full_valid_loss/accuracy over all of it at epoch ends);
  * at the end of each epoch: a checkpoint directory (the adapter as vLLM loads it + state.json;
    optimizer.pt kept locally only) handed to `on_checkpoint`;
  * at the end: the final adapter, checked with check_vllm_compatible.

Resume: `resume_from` a checkpoint directory restores the adapter weights and the step/epoch
counters (and the optimizer and schedule when its optimizer.pt is there: same node). A partner
node resuming from an uploaded checkpoint gets no optimizer.pt: Adam's moments restart from zero
and the schedule continues at the saved step (documented; a few noisier steps, no lost epochs).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from heady_node.finetune import adapter as adapter_rules
from heady_node.finetune.chatmask import IGNORE, assistant_spans, labels_for
from heady_node.finetune.hparams import TrainPlan, total_steps

STATE = "state.json"
OPTIMIZER = "optimizer.pt"
VALID_SAMPLE = 64  # validation examples scored at every metrics record (all at epoch ends)

Metrics = dict[str, Any]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Callbacks:
    on_metrics: Callable[[Metrics], None] = lambda m: None
    on_checkpoint: Callable[[int, Path, Metrics], None] = lambda step, d, m: None
    should_stop: Callable[[], bool] = lambda: False  # cancel / lease lost: stop at a step end


@dataclass
class Result:
    adapter_dir: Path | None  # None when stopped early
    steps: int
    trained_tokens: int
    metrics: list[Metrics] = field(default_factory=list)


def encode(tokenizer: Any, example: Mapping[str, Any], max_length: int) -> Encoded:
    """Token ids and labels of one example (chat template applied, truncated to max_length)."""
    tools = example.get("tools")

    def render(msgs: Sequence[Mapping[str, object]], gen: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(
            list(msgs), tools=tools, tokenize=False, add_generation_prompt=gen
        )

    text, spans = assistant_spans(render, example["messages"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids = list(enc["input_ids"])[:max_length]
    offsets = [tuple(o) for o in enc["offset_mapping"]][:max_length]
    return Encoded(ids, labels_for(ids, offsets, spans))


def token_count(tokenizer: Any, example: Mapping[str, Any]) -> int:
    """For ftlines' length check: tokens of the templated example, untruncated."""
    return len(encode(tokenizer, example, 1 << 30).input_ids)


def lora_config(plan: TrainPlan, model: torch.nn.Module) -> LoraConfig:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in plan.target_modules if t in present]
    if not targets:
        raise ValueError(f"the model has none of the target modules {plan.target_modules}")
    return LoraConfig(
        r=plan.lora_rank,
        lora_alpha=plan.lora_alpha,
        lora_dropout=plan.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=plan.served_base,
    )


def load_base(plan: TrainPlan, *, device_map: str = "auto") -> Any:
    """The base model for `plan`: 16-bit on the GPU (fp32 on the CPU), or 4-bit NF4 (QLoRA) with
    bitsandbytes (GPU only: docs/fine-tuning.md's checklist), gradient checkpointing on."""
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision, torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    if plan.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    model = AutoModelForCausalLM.from_pretrained(plan.train_repo, **kwargs)
    if plan.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch] for i in range(0, n, batch)]


def _collate(items: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, Any]:
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "mask": mask.to(device)}


def _loss_sums(model: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int, int]:
    """(summed token loss, trained tokens, correctly predicted trained tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["mask"]).logits
    logits = logits[:, :-1, :].float()
    target = batch["labels"][:, 1:]
    flat = logits.reshape(-1, logits.size(-1))
    loss = torch.nn.functional.cross_entropy(
        flat, target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    keep = target != IGNORE
    correct = int(((logits.argmax(-1) == target) & keep).sum())
    return loss, int(keep.sum()), correct


def evaluate(model: Any, data: Sequence[Encoded], micro: int, pad_id: int) -> tuple[float, float]:
    """(mean token loss, token accuracy) over `data`, no gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(data), micro):
            loss, n, ok = _loss_sums(model, _collate(data[i : i + micro], pad_id, device))
            total, tokens, correct = total + float(loss), tokens + n, correct + ok
    if was_training:
        model.train()
    return total / max(1, tokens), correct / max(1, tokens)


def _save_adapter(model: Any, out: Path, plan: TrainPlan) -> None:
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), save_embedding_layers=False, safe_serialization=True)
    # peft writes the base model's name_or_path; vLLM matches the served string exactly.
    cfg_path = out / adapter_rules.CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = plan.served_base
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "README.md").unlink(missing_ok=True)  # peft's model card: not part of the adapter


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    plan: TrainPlan,
    out_dir: str | Path,
    *,
    validation: Sequence[Mapping[str, Any]] = (),
    callbacks: Callbacks | None = None,
    resume_from: str | Path | None = None,
    log_every: int = 10,
) -> Result:
    """Train a LoRA adapter on `model` (a transformers causal LM, already on its device)."""
    cb = callbacks or Callbacks()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _seed_all(plan.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = [encode(tokenizer, ex, plan.max_length) for ex in examples]
    valid = [encode(tokenizer, ex, plan.max_length) for ex in validation]
    model = get_peft_model(model, lora_config(plan, model))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    steps_total = total_steps(plan, len(data))
    warmup = math.ceil(plan.warmup_ratio * steps_total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps_total - step) / max(1, steps_total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    step, start_epoch, trained_tokens = 0, 0, 0
    if resume_from is not None:
        step, start_epoch, trained_tokens = _resume(model, opt, sched, Path(resume_from))
    use_amp = plan.precision in ("fp16", "bf16") and device.type == "cuda"
    amp_dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and plan.precision == "fp16")
    result = Result(None, step, trained_tokens)
    window: list[tuple[float, int, int]] = []
    model.train()

    def record(epoch: int, full: bool) -> Metrics:
        loss = sum(w[0] for w in window) / max(1, sum(w[1] for w in window))
        acc = sum(w[2] for w in window) / max(1, sum(w[1] for w in window))
        m: Metrics = {"step": step, "total_steps": steps_total, "epoch": epoch + 1,
                      "train_loss": loss, "train_mean_token_accuracy": acc}  # fmt: skip
        if valid:  # OpenAI's names: valid_* on a sample, full_valid_* on the whole file
            m["valid_loss"], m["valid_mean_token_accuracy"] = evaluate(
                model, valid[:VALID_SAMPLE], plan.micro_batch, pad_id
            )
            if full:
                m["full_valid_loss"], m["full_valid_mean_token_accuracy"] = evaluate(
                    model, valid, plan.micro_batch, pad_id
                )
        window.clear()
        result.metrics.append(m)
        cb.on_metrics(m)
        return m

    last: Metrics = {}
    for epoch in range(start_epoch, plan.epochs):
        batches = _batches(len(data), plan.batch_size, plan.seed, epoch)
        for i_batch, batch in enumerate(batches):
            if cb.should_stop():
                result.steps, result.trained_tokens = step, trained_tokens
                return result
            items = [data[i] for i in batch]
            n_trained = max(1, sum(e.trained for e in items))
            opt.zero_grad(set_to_none=True)
            step_loss, step_ok = 0.0, 0
            for i in range(0, len(items), plan.micro_batch):
                mb = _collate(items[i : i + plan.micro_batch], pad_id, device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss, _n, ok = _loss_sums(model, mb)
                scaler.scale(loss / n_trained).backward()
                step_loss, step_ok = step_loss + float(loss.detach()), step_ok + ok
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            trained_tokens += sum(len(e.input_ids) for e in items)
            window.append((step_loss, sum(e.trained for e in items), step_ok))
            epoch_end = i_batch == len(batches) - 1
            if epoch_end or step % log_every == 0:
                last = record(epoch, full=epoch_end)
        ckpt = out / f"ckpt-step-{step}"
        _save_adapter(model, ckpt, plan)
        state = {"step": step, "epoch": epoch + 1, "trained_tokens": trained_tokens,
                 "seed": plan.seed, "plan": plan.to_dict()}  # fmt: skip
        (ckpt / STATE).write_text(json.dumps(state))
        saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        torch.save(saved, out / f"{OPTIMIZER}.{step}")
        cb.on_checkpoint(step, ckpt, last)
    final = out / "adapter"
    _save_adapter(model, final, plan)
    problems = adapter_rules.check_vllm_compatible(final, plan.served_base)
    if problems:
        raise adapter_rules.AdapterError("; ".join(problems))
    result.adapter_dir, result.steps, result.trained_tokens = final, step, trained_tokens
    return result


def _resume(model: Any, opt: Any, sched: Any, ckpt: Path) -> tuple[int, int, int]:
    state = json.loads((ckpt / STATE).read_text())
    weights = load_file(str(ckpt / adapter_rules.WEIGHTS))
    missing = set_peft_model_state_dict(model, weights)
    if getattr(missing, "unexpected_keys", None):
        raise ValueError(f"checkpoint does not fit the model: {missing.unexpected_keys[:3]}")
    step = int(state["step"])
    local = ckpt.parent / f"{OPTIMIZER}.{step}"
    if local.is_file():
        saved = torch.load(local, weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
    else:
        for group in opt.param_groups:  # the schedule continues where the job was
            group["lr"] = group["initial_lr"] * sched.lr_lambdas[0](step)
        sched.last_epoch = step
    return step, int(state["epoch"]), int(state.get("trained_tokens", 0))
