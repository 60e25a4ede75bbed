"""LoRA training on OpenAI chat examples: peft over transformers, driven by trl's SFTTrainer.

trl 1.16's SFTTrainer takes an already tokenized dataset: rows of `input_ids` plus `labels` (or
`assistant_masks`) are used as given, so OpenAI's per-turn assistant `weight` is honoured by
handing it our own labels (heady_node.finetune.chatmask) rather than trl's `assistant_only_loss`
(which needs `{% generation %}` markers in the template and trains every assistant turn).
`skip_prepare_dataset` keeps trl from re-truncating or dropping all-masked rows (the step count
stays hparams.total_steps).

What trl/transformers do, with the settings of `sft_config`:
  * each epoch visits the examples in an order drawn from `seed` and the epoch (accelerate's
    seedable sampler), in optimizer steps of `batch_size` examples = micro batches of
    `micro_batch` x `grad_accum`; the loss is the summed token loss over the *step's* trained
    tokens (Trainer counts the labels != -100 of all the step's micro batches,
    `num_items_in_batch`, and trl divides by it), so accumulation does not change the maths;
  * AdamW, linear warmup (warmup_ratio of the steps, from lr 0) then linear decay to 0, gradient
    clipping; fp16/bf16 mixed precision by the plan (fp16 with a gradient scaler);
  * trl saves, logs, evaluates and reports nothing itself.

What the callbacks here do:
  * every `log_every` steps and at each epoch's end: a metrics record (step, train loss and
    token accuracy summed over the micro batches since the last record; with a validation file,
    valid_loss/accuracy over its first VALID_SAMPLE examples, and full_valid_loss/accuracy over
    all of it at epoch ends: `evaluate` below, with the same labels);
  * at the end of each epoch: a checkpoint directory (the adapter as vLLM loads it + state.json;
    optimizer.pt kept locally only) handed to `on_checkpoint`;
  * `should_stop` after every step (cancel / lease lost): training ends there, no adapter;
  * at the end: the final adapter, checked with check_vllm_compatible.

Resume: `resume_from` a checkpoint directory is laid out as a transformers checkpoint (adapter +
trainer_state.json at the saved step, + optimizer/scheduler state when this node kept its
optimizer.pt) and handed to `Trainer.train(resume_from_checkpoint=...)`, which restores the
weights and skips the epochs already trained. A partner node resuming from an uploaded
checkpoint gets no optimizer.pt: Adam's moments restart from zero and the schedule continues at
the saved step (documented; a few noisier steps, no lost epochs).
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
from peft import LoraConfig, get_peft_model
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


def sft_config(plan: TrainPlan, n_examples: int, work_dir: Path, *, cpu: bool) -> Any:
    """trl's SFTConfig for `plan`: OpenAI's knobs mapped onto transformers' Trainer settings.

    batch_size = per-device micro batch x gradient accumulation (hparams.plan splits it);
    the data order comes from `seed` (data_seed: accelerate's seedable sampler, reseeded per
    epoch, so a resumed job sees the order of the job it replaces). trl saves, logs, reports and
    evaluates nothing itself: the callbacks below do (the adapter in vLLM's form)."""
    from trl import SFTConfig

    steps_total = total_steps(plan, n_examples)
    return SFTConfig(
        output_dir=str(work_dir),
        num_train_epochs=plan.epochs,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=plan.learning_rate,
        lr_scheduler_type="linear",  # warmup from 0, then linear decay to 0
        warmup_steps=math.ceil(plan.warmup_ratio * steps_total),
        max_grad_norm=plan.max_grad_norm,
        weight_decay=plan.weight_decay,
        optim="adamw_torch",
        seed=plan.seed,
        data_seed=plan.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",  # cards below compute capability 8.0 (hparams.plan)
        use_cpu=cpu,
        # load_base turns it on for real models; the tiny CPU test models go without.
        activation_checkpointing=False,
        # Rows are already tokenized and labelled by chatmask (weight-0 turns are -100):
        # no re-tokenizing, no truncation (encode did it), no dropping of all-masked rows
        # (trl's prepare step would drop them and change the step count the job reported).
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=plan.max_length,
        packing=False,
        padding_free=False,
        dataloader_num_workers=0,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
    )


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
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    cb = callbacks or Callbacks()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _seed_all(plan.seed)  # the LoRA init draws from it too (before trl's own set_seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = [encode(tokenizer, ex, plan.max_length) for ex in examples]
    valid = [encode(tokenizer, ex, plan.max_length) for ex in validation]
    model = get_peft_model(model, lora_config(plan, model))
    device = next(model.parameters()).device
    steps_total = total_steps(plan, len(data))
    per_epoch = math.ceil(len(data) / plan.batch_size)
    start = _resume_state(Path(resume_from)) if resume_from is not None else None
    result = Result(None, start["step"] if start else 0, start["trained_tokens"] if start else 0)
    if cb.should_stop():
        return result
    rows = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in data], "labels": [e.labels for e in data]}
    )
    # token sums of the micro batches since the last record: (loss sum, trained, correct)
    window: list[tuple[float, int, int]] = []
    last: Metrics = {}
    stopped = False

    class Sft(SFTTrainer):  # type: ignore[misc]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                # trl's loss: summed token losses / num_items_in_batch (the trained tokens of
                # the whole optimizer step, counted by Trainer over its micro batches).
                n = int((inputs["labels"][:, 1:] != IGNORE).sum())
                denom = float(num_items_in_batch) if num_items_in_batch is not None else n
                acc = self._metrics["train"]["mean_token_accuracy"][-1]  # this micro batch's
                value = loss[0] if isinstance(loss, tuple) else loss
                window.append((float(value.detach()) * denom, n, round(acc * n)))
                result.trained_tokens += int(inputs["attention_mask"].sum())
            return loss

    def record(step: int, full: bool) -> Metrics:
        tokens = max(1, sum(w[1] for w in window))
        m: Metrics = {"step": step, "total_steps": steps_total,
                      "epoch": (step - 1) // per_epoch + 1,
                      "train_loss": sum(w[0] for w in window) / tokens,
                      "train_mean_token_accuracy": sum(w[2] for w in window) / tokens}  # fmt: skip
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

    class Hooks(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if start and not start["optimizer"]:
                _continue_schedule(kw["optimizer"], kw["lr_scheduler"], start["step"])

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            nonlocal last, stopped
            step = state.global_step
            result.steps = step
            epoch_end = step % per_epoch == 0
            if epoch_end or step % log_every == 0:
                last = record(step, full=epoch_end)
            if cb.should_stop():  # cancel / lease lost: no further step
                stopped = control.should_training_stop = True

        def on_epoch_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            step = state.global_step
            if step == 0 or step % per_epoch:  # stopped inside the epoch: no checkpoint
                return
            ckpt = out / f"ckpt-step-{step}"
            _save_adapter(model, ckpt, plan)
            meta = {"step": step, "epoch": step // per_epoch,
                    "trained_tokens": result.trained_tokens, "seed": plan.seed,
                    "plan": plan.to_dict()}  # fmt: skip
            (ckpt / STATE).write_text(json.dumps(meta))
            saved = {"optimizer": kw["optimizer"].state_dict(),
                     "scheduler": kw["lr_scheduler"].state_dict()}  # fmt: skip
            torch.save(saved, out / f"{OPTIMIZER}.{step}")
            cb.on_checkpoint(step, ckpt, last)

    sft = Sft(
        model=model,
        args=sft_config(plan, len(data), out / "trl", cpu=device.type == "cpu"),
        train_dataset=rows,
        processing_class=tokenizer,
        callbacks=[Hooks()],
    )
    sft.remove_callback(PrinterCallback)  # it prints the run's summary dict to stdout
    for p in model.parameters():  # trl casts a quantised base's LoRA to bf16: fp16 cards
        if p.requires_grad and p.dtype != torch.float32:  # have no bf16 AMP; fp32 masters
            p.data = p.data.float()
    resume_dir = _hf_checkpoint(Path(resume_from), out, plan, start) if start else None
    try:
        sft.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)
        shutil.rmtree(out / "trl", ignore_errors=True)
    if stopped:
        return result
    final = out / "adapter"
    _save_adapter(model, final, plan)
    problems = adapter_rules.check_vllm_compatible(final, plan.served_base)
    if problems:
        raise adapter_rules.AdapterError("; ".join(problems))
    result.adapter_dir = final
    return result


def _resume_state(ckpt: Path) -> dict[str, Any]:
    state = json.loads((ckpt / STATE).read_text())
    step = int(state["step"])
    return {"step": step, "epoch": int(state["epoch"]),
            "trained_tokens": int(state.get("trained_tokens", 0)),
            "optimizer": (ckpt.parent / f"{OPTIMIZER}.{step}").is_file()}  # fmt: skip


def _hf_checkpoint(ckpt: Path, out: Path, plan: TrainPlan, start: Mapping[str, Any]) -> Path:
    """Our checkpoint in the layout transformers' Trainer resumes from: the adapter, a
    trainer_state.json at the saved step (Trainer then skips the epochs already trained), and
    the optimizer/scheduler state when this node kept them (a partner node has none: Adam's
    moments restart from zero, the schedule continues at the step, see on_train_begin)."""
    from transformers import TrainerState

    weights = load_file(str(ckpt / adapter_rules.WEIGHTS))  # refuse a foreign checkpoint early
    if not weights:
        raise ValueError(f"checkpoint {ckpt} has no adapter weights")
    d = out / f"hf-resume-{start['step']}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    for name in (adapter_rules.CONFIG, adapter_rules.WEIGHTS):
        shutil.copyfile(ckpt / name, d / name)
    state = TrainerState(
        global_step=start["step"],
        epoch=float(start["epoch"]),
        num_train_epochs=plan.epochs,
        train_batch_size=plan.micro_batch,
    )
    state.save_to_json(str(d / "trainer_state.json"))
    if start["optimizer"]:
        saved = torch.load(ckpt.parent / f"{OPTIMIZER}.{start['step']}", weights_only=True)
        torch.save(saved["optimizer"], d / "optimizer.pt")
        torch.save(saved["scheduler"], d / "scheduler.pt")
    return d


def _continue_schedule(opt: Any, sched: Any, step: int) -> None:
    """A fresh optimizer's schedule moved to `step` (as if it had stepped that often)."""
    inner = getattr(sched, "scheduler", sched)  # accelerate may wrap it
    for group, base in zip(opt.param_groups, inner.base_lrs, strict=True):
        group["lr"] = base * inner.lr_lambdas[0](step)
    inner.last_epoch = step
