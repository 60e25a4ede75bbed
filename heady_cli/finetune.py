"""`heady finetune` (alias `heady ft`) `create | watch | list | events | checkpoints | cancel`:
the operator side of the gateway's OpenAI fine-tuning jobs API (docs/fine-tuning-jobs.md),
over the same client (`batch.Api`), key resolution, error lines and displays as `heady batch`.

Decisions (the structural check of a training file, the job request, progress and losses from
the metrics events, which events are new, exit codes) are pure functions over plain data; the
httpx/rich shell stays thin. Exit codes: 0 done (watch: the job succeeded), 1 the job ended
failed or cancelled, 2 an error (one line, no traceback), 130 Ctrl-C (the job keeps running)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import TextColumn
from rich.table import Table
from rich.text import Text

from heady_cli.batch import (
    CHUNK,
    EXIT_INTERRUPTED,
    EXIT_OK,
    MAX_TRANSIENT,
    POLL_MIN_S,
    Api,
    ApiError,
    LineBase,
    LiveBar,
    api_from_args,
    checked_id,
    clock_fields,
    clock_text,
    common_options,
    drop_uploads,
    fmt_duration,
    fmt_when,
    input_file,
    iter_list,
    line_rate,
    next_interval,
    parse_metadata,
    positive_int,
    stderr_console,
    to_stderr,
)
from heady_cli.config import CliError
from heady_shared import ftlines
from heady_shared.batchlines import split_lines

TERMINAL_EXIT = {"succeeded": EXIT_OK, "failed": 1, "cancelled": 1}
# Each poll is two Worker requests (the job, then its new events): at most every 20 s keeps a
# long training run at `heady batch watch`'s 6 requests a minute.
POLL_MAX_S = 20.0
EVENTS_FIRST = 20  # the first poll shows this many latest events, as context
EVENTS_PAGE = 100  # later polls page on with this many until they reach the last one shown
MAX_EVENT_PAGES = 5  # per poll; beyond, the older new events are skipped (and said so)
SHOWN_PROBLEMS = 20  # of a refused training file, on stderr
_sleep = time.sleep  # the tests replace it (and batch's clocks) with one fake clock


# --- pure core ---------------------------------------------------------------------------


def _real(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None  # type: ignore[arg-type]


def _count(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None  # type: ignore[return-value]


def _ts(value: object) -> float | None:
    t = _real(value)
    return t if t is not None and t > 0 else None


@dataclass(frozen=True)
class JobView:
    """What the CLI needs of an OpenAI FineTuningJob, parsed tolerantly."""

    id: str
    status: str
    model: str = ""
    fine_tuned_model: str | None = None
    created_at: float | None = None
    finished_at: float | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_EXIT


def parse_job(data: object) -> JobView:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise CliError(
            "gateway answer is not a fine-tuning job (no id): is this the Heady gateway?"
        )
    status = data.get("status")
    if not isinstance(status, str) or not status:
        raise CliError(f"job {data['id'][:60]} has no status in the gateway's answer")
    err = data.get("error")
    return JobView(
        id=data["id"],
        status=status,
        model=str(data.get("model") or ""),
        fine_tuned_model=model if isinstance(model := data.get("fine_tuned_model"), str) else None,
        created_at=_ts(data.get("created_at")),
        finished_at=_ts(data.get("finished_at")),
        trained_tokens=_count(data.get("trained_tokens")),
        error=err if isinstance(err, dict) and (err.get("message") or err.get("code")) else None,
    )


def error_text(job: JobView) -> str:
    """A failed job's `error` as one line: `message [code] (param x)`."""
    if job.error is None:
        return "no error given"
    e = job.error
    message = " ".join(str(e.get("message") or "").split())[:400] or "no message"
    code = f" [{e['code']}]" if e.get("code") else ""
    param = f" (param {e['param']})" if e.get("param") else ""
    return f"{message}{code}{param}"


@dataclass(frozen=True)
class EventView:
    id: str
    created_at: float | None
    level: str
    type: str
    message: str
    data: dict[str, Any]


def parse_event(obj: object) -> EventView | None:
    """A FineTuningJobEvent, or None for anything without an id (skipped, not fatal)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        return None
    data = obj.get("data")
    return EventView(
        id=obj["id"],
        created_at=_ts(obj.get("created_at")),
        level=str(obj.get("level") or "info"),
        type=str(obj.get("type") or "message"),
        message=str(obj.get("message") or ""),
        data=data if isinstance(data, dict) else {},
    )


def event_line(e: EventView, full_date: bool = False) -> str:
    """`08:01:02 Training started`; a warn/error event says its level: `... error: ...`."""
    stamp = fmt_when(e.created_at)  # `2027-01-15 08:00:00Z`, or `-` when unknown
    when = "--:--:--" if e.created_at is None else stamp if full_date else stamp[11:19]
    level = "" if e.level == "info" else f"{e.level}: "
    return f"{when} {level}{' '.join(e.message.split())[:300]}"


def unseen(page: Sequence[EventView], last_shown: str | None) -> tuple[list[EventView], bool]:
    """A newest-first page cut at the last event already shown: the new events (newest first)
    and whether the page reached that event."""
    out: list[EventView] = []
    for e in page:
        if e.id == last_shown:
            return out, True
        out.append(e)
    return out, False


@dataclass(frozen=True)
class TrainProgress:
    """The job's training as its metrics events tell it: the latest step, its total, the
    latest training loss and the latest validation loss (not every step has one)."""

    step: int | None = None
    total_steps: int | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    samples: tuple[tuple[float, int], ...] = ()  # (event time, step), oldest first: the rate


def fold_metrics(p: TrainProgress, events: Iterable[EventView]) -> TrainProgress:
    """Fold events (oldest first) into the progress. A metrics event's `data` is the node's
    (OpenAI's keys: step, total_steps, train_loss, valid_loss, full_valid_loss...): only
    non-negative integers and finite numbers count. A step lower than the last one is a job
    resumed from an earlier checkpoint: it is the truth now, and the rate starts over."""
    for e in events:
        step = _count(e.data.get("step"))
        if e.type != "metrics" or step is None:
            continue
        samples = p.samples if p.step is None or step >= p.step else ()
        if e.created_at is not None:
            samples = (*samples, (e.created_at, step))[-200:]
        valid = _real(e.data.get("full_valid_loss"))
        valid = valid if valid is not None else _real(e.data.get("valid_loss"))
        p = TrainProgress(
            step=step,
            total_steps=_count(e.data.get("total_steps")) or p.total_steps,
            train_loss=_real(e.data.get("train_loss")),
            valid_loss=valid if valid is not None else p.valid_loss,
            samples=samples,
        )
    return p


def step_rate(p: TrainProgress, terminal: bool, now: float) -> float | None:
    """Steps per second from the metrics events' own timestamps (the gateway's clock): an
    ended job's over its whole run, a running one's as `heady batch`'s line rate."""
    if not terminal:
        return line_rate(p.samples, None, now)
    if len(p.samples) < 2:
        return None
    (t0, s0), (t1, s1) = p.samples[0], p.samples[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


def job_elapsed(job: JobView, server_now: float) -> float | None:
    if job.created_at is None:
        return None
    return max(0.0, (job.finished_at or server_now) - job.created_at)


def job_eta(job: JobView, p: TrainProgress, rate: float | None) -> float | None:
    if job.terminal:
        return 0.0
    if job.status != "running" or not rate or p.step is None or not p.total_steps:
        return None
    return max(0, p.total_steps - p.step) / rate


def loss_text(p: TrainProgress) -> str:
    parts = []
    if p.train_loss is not None:
        parts.append(f"train loss {p.train_loss:.4f}")
    if p.valid_loss is not None:
        parts.append(f"valid loss {p.valid_loss:.4f}")
    return " · ".join(parts)


def step_text(p: TrainProgress) -> str:
    step = "-" if p.step is None else str(p.step)
    return f"step {step}/{p.total_steps or '?'}"


def job_body(
    model: str,
    training_file: str,
    validation_file: str | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    metadata: dict[str, str] | None = None,
    n_epochs: int | None = None,
    batch_size: int | None = None,
    lr_multiplier: float | None = None,
) -> dict[str, Any]:
    """The `POST /v1/fine_tuning/jobs` body as the openai SDK sends `jobs.create(...)` with
    these arguments (its key order; the hyperparameters in `method`, the non-deprecated
    form; the ones not given are left to the gateway's "auto")."""
    hp: dict[str, Any] = {}
    for key, value in (("batch_size", batch_size), ("learning_rate_multiplier", lr_multiplier),
                       ("n_epochs", n_epochs)):  # fmt: skip
        if value is not None:
            hp[key] = value
    body: dict[str, Any] = {"model": model, "training_file": training_file}
    if metadata:
        body["metadata"] = metadata
    body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hp}}
    for key, value in (("seed", seed), ("suffix", suffix), ("validation_file", validation_file)):
        if value is not None:
            body[key] = value
    return body


_FLAGS = {
    "suffix": "--suffix",
    "seed": "--seed",
    "metadata": "--metadata",
    "model": "--model",
    "n_epochs": "--epochs",
    "batch_size": "--batch-size",
    "learning_rate_multiplier": "--lr-multiplier",
}


def check_body(body: dict[str, Any]) -> None:
    """The gateway's and the node's own check of a job request (heady_shared.ftlines), before
    anything is uploaded: a bad flag costs no upload. Raises CliError naming the flag."""
    try:
        ftlines.check_job_request(body)
    except ftlines.HyperparameterError as exc:
        # a hyperparameter's param is its path (method.supervised.hyperparameters.n_epochs)
        field = exc.param.rsplit(".", 1)[-1] if "hyperparameters." in exc.param else exc.param
        raise CliError(f"{_FLAGS.get(field, exc.param)}: {exc}") from None


def check_lines(lines: Iterable[bytes], param: str) -> ftlines.FileVerdict:
    """The structural check the node runs on a training (or validation) file: JSON, chat
    messages, roles, text content, weights, at least 10 training examples (1 validation
    example). Token counts need the base model's tokenizer: the node checks those."""
    minimum = ftlines.MIN_EXAMPLES if param == "training_file" else 1
    return ftlines.validate_file(lines, min_examples=minimum, param=param)


def file_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        yield from split_lines(iter(lambda: fh.read(CHUNK), b""))


def problems_text(path: Path, verdict: ftlines.FileVerdict) -> tuple[list[str], str]:
    """A refused file: the problems to list (stderr) and the one error line."""
    errors = verdict.errors
    shown = [f"  {path.name}: {e.message}" for e in errors[:SHOWN_PROBLEMS]]
    if len(errors) > SHOWN_PROBLEMS:
        more = len(errors) - SHOWN_PROBLEMS
        cap = "+" if len(errors) >= ftlines.MAX_ERRORS else ""
        shown.append(f"  ... and {more}{cap} more")
    what = "training" if errors[0].param == "training_file" else "validation"
    if len(errors) == 1:
        return [], f"{path}: {errors[0].message} (nothing was uploaded)"
    cap = "+" if len(errors) >= ftlines.MAX_ERRORS else ""
    return (
        shown,
        f"{path} is not a valid {what} file: {len(errors)}{cap} problems (nothing was uploaded)",
    )


# --- the HTTP shell ----------------------------------------------------------------------


def _job_path(job_id: str) -> str:
    return f"/fine_tuning/jobs/{checked_id(job_id, 'fine-tuning job')}"


def get_job(api: Api, job_id: str) -> JobView:
    return parse_job(api.request_json("GET", _job_path(job_id)))


def new_events(api: Api, job_id: str, last_shown: str | None) -> tuple[list[EventView], bool]:
    """The job's events after `last_shown`, oldest first, and whether older new ones were
    skipped. The API lists newest first (`after` = an id pages on to older ones): read pages
    until the last event shown; the first poll (nothing shown) reads one page, as context."""
    path = _job_path(job_id) + "/events"
    found: list[EventView] = []
    after: str | None = None
    for n in range(MAX_EVENT_PAGES if last_shown else 1):
        params: dict[str, Any] = {"after": after} if after else {}
        params["limit"] = EVENTS_FIRST if n == 0 else EVENTS_PAGE
        data = api.request_json("GET", path, params=params)
        page = [e for e in map(parse_event, data.get("data") or []) if e is not None]
        fresh, reached = unseen(page, last_shown)
        found += fresh
        if reached or not data.get("has_more") or not page or page[-1].id == after:
            return found[::-1], False
        after = page[-1].id
    return found[::-1], bool(last_shown)


class LiveDisplay(LiveBar):
    """A rich progress bar (step/total, losses, elapsed · rate · ETA) on a terminal, with the
    job's message events printed above it (stderr: stdout stays for ids and the model)."""

    def __init__(self, console: Console, job_id: str) -> None:
        super().__init__(console, TextColumn("{task.fields[loss]}"))
        self.job_id = job_id

    def _header(self) -> None:
        # Printed with the first thing to show (an event or the bar), not before: a watch
        # that fails at once (a 404) shows the error only.
        self.header(
            f"[bold]{escape(self.job_id)}[/] (Ctrl-C stops watching; the job keeps running)"
        )

    def event(self, line: str) -> None:
        self._header()
        self.progress.console.print(Text(line), soft_wrap=True)

    def show(
        self,
        job: JobView,
        p: TrainProgress,
        elapsed: float | None,
        rate: float | None,
        eta: float | None,
        note: str = "",
    ) -> None:
        loss = " · ".join(
            f"{k} {v:.4f}"
            for k, v in (("loss", p.train_loss), ("val", p.valid_loss))
            if v is not None
        )
        fields = {
            "status": escape(job.status),
            "loss": loss,
            "note": escape(note[:60]),
            **clock_fields(elapsed, rate, eta, job.terminal),
        }
        done = p.step or 0
        self._header()
        self.draw(job.id, p.total_steps, done, fields)


class LineDisplay(LineBase):
    """Not a terminal (CI, a log file): one plain line whenever something moved, and each
    message event as its own line."""

    def event(self, line: str) -> None:
        print(line, file=self.file, flush=True)

    def show(
        self,
        job: JobView,
        p: TrainProgress,
        elapsed: float | None,
        rate: float | None,
        eta: float | None,
        note: str = "",
    ) -> None:
        if self.moved((job.status, p.step, p.total_steps, p.train_loss, p.valid_loss, note)):
            parts = [job.id, job.status, step_text(p), loss_text(p)]
            parts.append(clock_text(elapsed, rate, eta, unit=" steps"))
            line = "  ".join([x for x in parts if x] + ([note] if note else []))
            print(line, file=self.file, flush=True)


def make_display(job_id: str) -> LiveDisplay | LineDisplay:
    console = stderr_console()
    return LiveDisplay(console, job_id) if console.is_terminal else LineDisplay(sys.stderr)


def watch(
    api: Api, job_id: str, display: LiveDisplay | LineDisplay
) -> tuple[JobView, TrainProgress]:
    """Poll the job, then its new events, until a final status. Transient failures
    (timeouts, 5xx, 429) are retried on the same backoff, up to MAX_TRANSIENT in a row;
    anything else ends the watch (exit 2). The events are read after the job, so a final
    job's last events are shown too."""
    progress = TrainProgress()
    last_shown: str | None = None
    interval, status, failures = POLL_MIN_S, None, 0
    job: JobView | None = None
    with display:
        while True:
            note = ""
            try:
                fresh = get_job(api, job_id)
                events, skipped = new_events(api, job_id, last_shown)
            except ApiError as exc:
                failures += 1
                if not exc.transient or failures >= MAX_TRANSIENT:
                    raise
                note = f"retrying: {exc}"
                if job is None:  # nothing to draw yet: say so once, on stderr
                    to_stderr(f"heady: {note}")
            else:
                job, failures = fresh, 0
                if skipped:
                    display.event(f"... earlier events skipped: heady ft events {job_id}")
                for e in events:
                    if e.type != "metrics":
                        display.event(event_line(e))
                if events:
                    last_shown = events[-1].id
                progress = fold_metrics(progress, events)
            if job is not None:
                now = api.server_now()
                rate = step_rate(progress, job.terminal, now)
                elapsed = job_elapsed(job, now)
                display.show(job, progress, elapsed, rate, job_eta(job, progress, rate), note)
                if job.terminal:
                    return job, progress
            _sleep(interval)
            changed = job is not None and job.status != status
            interval = next_interval(interval, changed, POLL_MAX_S)
            status = job.status if job is not None else None


def outcome(job: JobView, p: TrainProgress, server_now: float) -> tuple[list[str], list[str]]:
    """What an ended job prints: (stdout lines, stderr lines). stdout is the fine-tuned
    model's name only, so `model=$(heady ft watch ID)` works."""
    took = fmt_duration(job_elapsed(job, server_now))
    if job.status == "succeeded":
        tokens = f", {job.trained_tokens:,} trained tokens" if job.trained_tokens else ""
        losses = f", final {loss_text(p)}" if loss_text(p) else ""
        notes = [f"job {job.id} succeeded in {took}{tokens}{losses}"]
        if job.fine_tuned_model is None:
            return [], [*notes, "  the gateway named no fine_tuned_model"]
        notes.append(f"  checkpoints: heady ft checkpoints {job.id}")
        return [job.fine_tuned_model], notes
    if job.status == "failed":
        return [], [f"job {job.id} failed after {took}: {error_text(job)}"]
    return [], [f"job {job.id} {job.status} after {took}"]


def _watch_and_report(api: Api, job_id: str) -> int:
    try:
        job, progress = watch(api, job_id, make_display(job_id))
    except KeyboardInterrupt:
        to_stderr(
            f"heady: stopped watching; job {job_id} keeps running on the gateway.",
            f"  resume: heady ft watch {job_id}",
            f"  cancel: heady ft cancel {job_id}",
        )
        return EXIT_INTERRUPTED
    out, notes = outcome(job, progress, api.server_now())
    to_stderr(*notes)
    if out:
        print("\n".join(out), flush=True)
    return TERMINAL_EXIT[job.status]


def cmd_watch(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        return _watch_and_report(api, checked_id(args.id, "fine-tuning job"))
    finally:
        api.close()


# --- create ------------------------------------------------------------------------------


def _checked_file(name: str, param: str) -> tuple[Path, int]:
    path, size = input_file(name, "a fine-tuning file is JSONL, one chat example per line")
    try:
        verdict = check_lines(file_lines(path), param)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not verdict.ok:
        shown, line = problems_text(path, verdict)
        to_stderr(*shown)
        raise CliError(line)
    to_stderr(f"{path.name}: {verdict.examples:,} examples, structure ok")
    return path, size


def _body(args: argparse.Namespace, training: str, validation: str | None) -> dict[str, Any]:
    return job_body(
        args.model, training, validation, suffix=args.suffix, seed=args.seed,
        metadata=parse_metadata(args.metadata or []), n_epochs=args.epochs,
        batch_size=args.batch_size, lr_multiplier=args.lr_multiplier,
    )  # fmt: skip


def cmd_create(args: argparse.Namespace) -> int:
    check_body(_body(args, "file-local", "file-local" if args.validation else None))
    files = [("training_file", args.file)]
    if args.validation:
        files.append(("validation_file", args.validation))
    checked = [(param, *_checked_file(name, param)) for param, name in files]
    api = api_from_args(args)
    uploaded: list[str] = []
    try:
        try:
            for _param, path, size in checked:
                to_stderr(f"uploading {path.name} ({size:,} bytes) to {api.root}/files ...")
                uploaded.append(checked_id(api.upload(path, "fine-tune").get("id"), "file"))
            validation = uploaded[1] if len(uploaded) > 1 else None
            body = _body(args, uploaded[0], validation)
            job = parse_job(api.request_json("POST", "/fine_tuning/jobs", json=body))
        except CliError:
            drop_uploads(api, uploaded)  # the uploads were for this job only
            raise
        print(job.id, flush=True)
        to_stderr(f"job {job.id} created ({job.status}) for {job.model} from {uploaded[0]}")
        if args.watch:
            return _watch_and_report(api, job.id)
        to_stderr(f"  watch: heady ft watch {job.id}")
        return EXIT_OK
    finally:
        api.close()


# --- list / events / checkpoints / cancel ------------------------------------------------


def _print_table(table: Table) -> None:
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    Console(width=width, highlight=False).print(table)


def cmd_list(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        items = list(iter_list(api, "/fine_tuning/jobs", None if args.all else args.limit))
    finally:
        api.close()
    if args.json:
        print(json.dumps(items, indent=2))
        return EXIT_OK
    table = Table(title=f"Fine-tuning jobs ({len(items)})")
    for col in ("id", "status", "model", "fine-tuned model", "created", "finished", "tokens"):
        table.add_column(col, overflow="fold")
    for item in items:
        j = parse_job(item)
        result = j.fine_tuned_model or (f"[red]{escape(error_text(j))}[/]" if j.error else "-")
        tokens = f"{j.trained_tokens:,}" if j.trained_tokens is not None else "-"
        table.add_row(
            escape(j.id), escape(j.status), escape(j.model or "-"), result,
            fmt_when(j.created_at), fmt_when(j.finished_at), tokens,
        )  # fmt: skip
    _print_table(table)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        path = _job_path(args.id) + "/events"
        events = [e for e in map(parse_event, iter_list(api, path, args.limit)) if e]
    finally:
        api.close()
    for e in reversed(events):  # oldest first, as a log reads
        print(event_line(e, full_date=True))
    return EXIT_OK


def _loss(metrics: object, *keys: str) -> str:
    """The first of `keys` that the metrics hold as a finite number."""
    m = metrics if isinstance(metrics, dict) else {}
    v = next((x for x in map(_real, (m.get(k) for k in keys)) if x is not None), None)
    return "-" if v is None else f"{v:.4f}"


def cmd_checkpoints(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        items = list(iter_list(api, _job_path(args.id) + "/checkpoints", None))
    finally:
        api.close()
    table = Table(title=f"Checkpoints of {escape(args.id)} ({len(items)})")
    for col in ("step", "model (usable as `model`)", "train loss", "valid loss", "created"):
        table.add_column(col, overflow="fold")
    for c in items:
        step, m = _count(c.get("step_number")), c.get("metrics")
        table.add_row(
            "-" if step is None else str(step),
            escape(str(c.get("fine_tuned_model_checkpoint") or "-")),
            _loss(m, "train_loss"),
            _loss(m, "full_valid_loss", "valid_loss"),
            fmt_when(_ts(c.get("created_at"))),
        )
    _print_table(table)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        job = parse_job(api.request_json("POST", _job_path(args.id) + "/cancel"))
    finally:
        api.close()
    print(f"job {job.id} {job.status}; its listed checkpoints stay usable")
    return EXIT_OK


# --- argparse ----------------------------------------------------------------------------


def _lr(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not an integer >= 0: {text!r}")
    return int(text)


def add_parser(sub: Any) -> None:
    """`heady finetune ...` (alias `heady ft`): called once from heady_cli.main.build_parser."""
    common = common_options()
    f = sub.add_parser(
        "finetune", aliases=["ft"], help="OpenAI-compatible fine-tuning jobs (create, watch...)"
    )
    fs = f.add_subparsers(dest="ft_command", required=True)

    c = fs.add_parser("create", parents=[common], help="check, upload a file and start a job")
    c.add_argument("file", help="JSONL: one {messages: [...]} chat example per line")
    c.add_argument("--model", required=True, help="the base model to fine-tune")
    c.add_argument("--suffix", help="in the model's name: ft:<base>:heady:<suffix>:<id>")
    c.add_argument("--validation", metavar="FILE", help="a validation file (same format)")
    c.add_argument("--epochs", type=positive_int, help="n_epochs (default: auto)")
    c.add_argument("--batch-size", type=positive_int, help="batch_size (default: auto)")
    c.add_argument("--lr-multiplier", type=_lr, help="learning_rate_multiplier (default: auto)")
    c.add_argument("--seed", type=_seed, help="the job's seed (default: the gateway picks one)")
    c.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="repeatable")
    c.add_argument("--watch", action="store_true", help="then watch it until it ends")
    c.set_defaults(func=cmd_create)

    w = fs.add_parser("watch", parents=[common], help="live progress and events until it ends")
    w.add_argument("id")
    w.set_defaults(func=cmd_watch)

    ls = fs.add_parser("list", parents=[common], help="your jobs, newest first")
    ls.add_argument("--limit", type=positive_int, default=20, help="how many (20)")
    ls.add_argument("--all", action="store_true", help="every job (follows all pages)")
    ls.add_argument("--json", action="store_true", help="the job objects as JSON")
    ls.set_defaults(func=cmd_list)

    e = fs.add_parser("events", parents=[common], help="a job's latest events, oldest first")
    e.add_argument("id")
    e.add_argument("--limit", type=positive_int, default=20, help="how many (20)")
    e.set_defaults(func=cmd_events)

    k = fs.add_parser("checkpoints", parents=[common], help="a job's checkpoints (models)")
    k.add_argument("id")
    k.set_defaults(func=cmd_checkpoints)

    x = fs.add_parser("cancel", parents=[common], help="cancel a job")
    x.add_argument("id")
    x.set_defaults(func=cmd_cancel)
