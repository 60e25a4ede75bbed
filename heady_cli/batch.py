"""`heady batch submit | watch | results | list | cancel`: the operator side of the gateway's
OpenAI-compatible Files + Batches API, over httpx with the client key.

Decisions (progress, rate and ETA, polling interval, error lines, exit codes) are pure functions
over the Batch JSON; the httpx/rich shell around them stays thin. Exit codes: 0 done (watch: the
batch completed), 1 the batch ended failed/expired/cancelled, 2 an error (one line, no traceback),
130 Ctrl-C (the batch keeps running on the gateway)."""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Self

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Column, Table
from rich.text import Text

from heady_cli.config import CliError, resolve_gateway
from heady_shared.routes import valid_role_name

EXIT_OK, EXIT_ENDED_BADLY, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
TERMINAL_EXIT = {"completed": EXIT_OK, "failed": 1, "expired": 1, "cancelled": 1}
POLL_MIN_S, POLL_BACKOFF, POLL_MAX_S = 1.0, 1.5, 10.0
RATE_WINDOW_S = 60.0  # once the watch has seen this long: the rate over the last 2x this
RATE_MIN_SPAN_S = 5.0  # no rate from less time than this
TRANSIENT = frozenset({408, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
MAX_TRANSIENT = 6  # consecutive failed polls before `watch` gives up (about 40 s of backoff)
CHUNK = 1 << 16
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # ids go into URL paths: nothing else passes
_sleep = time.sleep  # the tests replace these three with one fake clock
_monotonic = time.monotonic
_now = time.time


# --- pure core ---------------------------------------------------------------------------


class ApiError(CliError):
    """The gateway answered an error: one line `<message> (request id ...)`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT


def error_line(status: int, content_type: str, body: bytes, header_rid: str | None) -> str:
    """The OpenAI error shape `{"error": {message, type, code, request_id}}` as one line; any
    other answer (an edge's HTML page, an empty body) as its status and content type."""
    message, rid = "", header_rid
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        message = str(err.get("message") or err.get("code") or err.get("type") or "")
        rid = str(err.get("request_id") or rid or "") or None
    elif isinstance(err, str):
        message = err
    if not message:
        kind = content_type.split(";")[0].strip() or "no content-type"
        message = f"gateway answered HTTP {status} ({kind})"
    message = " ".join(message.split())[:400]
    return f"{message} (request id {rid})" if rid else message


def checked_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise CliError(f"not a valid {what} id: {str(value)[:60]!r}")
    return value


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _ts(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None  # type: ignore[arg-type]


@dataclass(frozen=True)
class BatchView:
    """What the CLI needs of an OpenAI Batch object, parsed tolerantly."""

    id: str
    status: str
    endpoint: str = ""
    model: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    created_at: float | None = None
    in_progress_at: float | None = None
    ended_at: float | None = None  # the timestamp of its terminal status
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: tuple[dict[str, Any], ...] = ()

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_EXIT


def parse_batch(data: object) -> BatchView:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise CliError("gateway answer is not a Batch object (no id): is this the Heady gateway?")
    status = data.get("status")
    if not isinstance(status, str) or not status:
        raise CliError(f"batch {data['id'][:60]} has no status in the gateway's answer")
    counts = data.get("request_counts") if isinstance(data.get("request_counts"), dict) else {}
    errors = data.get("errors") if isinstance(data.get("errors"), dict) else {}
    listed = errors.get("data") if isinstance(errors.get("data"), list) else []
    return BatchView(
        id=data["id"],
        status=status,
        endpoint=str(data.get("endpoint") or ""),
        model=data["model"] if isinstance(data.get("model"), str) else None,
        total=_int(counts.get("total")),
        completed=_int(counts.get("completed")),
        failed=_int(counts.get("failed")),
        created_at=_ts(data.get("created_at")),
        in_progress_at=_ts(data.get("in_progress_at")),
        ended_at=_ts(data.get(f"{status}_at")) if status in TERMINAL_EXIT else None,
        output_file_id=data.get("output_file_id") or None,
        error_file_id=data.get("error_file_id") or None,
        errors=tuple(e for e in listed if isinstance(e, dict)),
    )


def elapsed_s(view: BatchView, server_now: float) -> float | None:
    """Seconds since the batch was created: to its end once it ended, else to now."""
    if view.created_at is None:
        return None
    return max(0.0, (view.ended_at or server_now) - view.created_at)


def line_rate(
    samples: Sequence[tuple[float, int]], in_progress_at: float | None, now: float
) -> float | None:
    """Lines per second. `samples` are (server time, done) as polled, oldest first. Progress
    arrives in shard-sized steps, so a short window is noise: the run's average (from the
    gateway's in_progress_at) until the watch has seen RATE_WINDOW_S, then the recent window
    (which follows a node dying or joining)."""
    if not samples:
        return None
    t_last, d_last = samples[-1]
    recent = [(t, d) for t, d in samples if t >= now - RATE_WINDOW_S * 2]
    if recent and t_last - recent[0][0] >= RATE_WINDOW_S:
        t0, d0 = recent[0]
        return max(0.0, (d_last - d0) / (t_last - t0))
    # Gateway timestamps are whole seconds (and the clock offset too): a rate over less than
    # RATE_MIN_SPAN_S would be mostly rounding (2 lines in 0.01 s is not 200 lines/s).
    if in_progress_at is not None and t_last - in_progress_at >= RATE_MIN_SPAN_S and d_last > 0:
        return d_last / (t_last - in_progress_at)
    t0, d0 = samples[0]
    return (d_last - d0) / (t_last - t0) if t_last - t0 >= RATE_MIN_SPAN_S and d_last > d0 else None


def batch_rate(view: BatchView, samples: Sequence[tuple[float, int]], now: float) -> float | None:
    """An ended batch's rate is its own (done over its run), not the watch's late poll's."""
    if not view.terminal:
        return line_rate(samples, view.in_progress_at, now)
    start, end = view.in_progress_at, view.ended_at
    return view.done / (end - start) if start and end and end > start and view.done else None


def eta_s(view: BatchView, rate: float | None) -> float | None:
    if view.terminal or view.status == "finalizing":
        return 0.0
    if view.status != "in_progress" or not rate or view.total <= 0:
        return None
    return max(0, view.total - view.done) / rate


def next_interval(current: float, status_changed: bool, max_s: float = POLL_MAX_S) -> float:
    """1 s, then backing off to `max_s` (each poll is a Worker request on the daily plan);
    back to 1 s when the status moves, since the next step (finalizing -> completed) is near."""
    return POLL_MIN_S if status_changed else min(max_s, current * POLL_BACKOFF)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds + 0.5)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def fmt_rate(rate: float | None, unit: str = " lines") -> str:
    if rate is None:
        return f"-{unit}/s"
    return f"{rate:.1f}{unit}/s" if rate >= 0.1 else f"{rate * 60:.1f}{unit}/min"


def clock_text(
    elapsed: float | None,
    rate: float | None,
    eta: float | None,
    compact: bool = False,
    unit: str = " lines",
) -> str:
    """`elapsed 0:20 · 4.0 lines/s · ETA 0:15`; compact (the live bar on 80 columns):
    `0:20 elapsed · 4.0/s · ETA 0:15`."""
    if compact:
        return f"{fmt_duration(elapsed)} elapsed · {fmt_rate(rate, '')} · ETA {fmt_duration(eta)}"
    return f"elapsed {fmt_duration(elapsed)} · {fmt_rate(rate, unit)} · ETA {fmt_duration(eta)}"


def progress_text(view: BatchView) -> str:
    total = str(view.total) if view.total else "?"
    failed = f" ({view.failed} failed)" if view.failed else ""
    return f"{view.done}/{total}{failed}"


def summary(view: BatchView) -> list[str]:
    """The lines printed when a batch has ended (or when asked about an ended batch)."""
    head = f"batch {view.id} {view.status}: {view.completed} ok, {view.failed} failed"
    lines = [f"{head} of {view.total or '?'} lines"]
    for e in view.errors[:20]:
        where = f"line {e['line']}: " if isinstance(e.get("line"), int) else ""
        code = f"[{e['code']}] " if e.get("code") else ""
        lines.append(f"  {where}{code}{' '.join(str(e.get('message', '')).split())[:200]}")
    if len(view.errors) > 20:
        lines.append(f"  ... and {len(view.errors) - 20} more errors")
    if view.output_file_id or view.error_file_id:
        lines.append(f"  results: heady batch results {view.id} -o out.jsonl --errors err.jsonl")
    return lines


# --- the HTTP shell ----------------------------------------------------------------------


@dataclass
class Api:
    """The Files + Batches API under `<gateway>/api/heavy/<role>/v1`."""

    base: str
    key: str
    role: str
    timeout: float
    clock_offset: float = 0.0  # server clock - local clock, from the Date header
    _http: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not valid_role_name(self.role):  # the gateway's own rule for ROUTES
            raise CliError(f"not a role name (a-z, 0-9, -): {self.role[:40]!r}")
        self.root = f"{self.base}/api/heavy/{self.role}/v1"
        headers = {"authorization": f"Bearer {self.key}", "user-agent": "heady-cli"}
        self._http = httpx.Client(headers=headers, timeout=self.timeout)

    def close(self) -> None:
        self._http.close()

    def server_now(self) -> float:
        return _now() + self.clock_offset

    def _check(self, resp: httpx.Response) -> httpx.Response:
        date = resp.headers.get("date")
        if date:
            with contextlib.suppress(TypeError, ValueError):
                server = email.utils.parsedate_to_datetime(date).timestamp()
                self.clock_offset = server - _now()
        if not 200 <= resp.status_code < 300:
            body = resp.read()
            ctype = resp.headers.get("content-type", "")
            line = error_line(resp.status_code, ctype, body, resp.headers.get("x-request-id"))
            raise ApiError(resp.status_code, line)
        return resp

    def _wrap(self, exc: httpx.HTTPError) -> CliError:
        """A network failure, as an ApiError with the status that classes it as transient."""
        if isinstance(exc, httpx.TimeoutException):
            return ApiError(408, f"gateway at {self.base} did not answer within {self.timeout:g}s")
        if isinstance(exc, httpx.ConnectError):
            return ApiError(503, f"cannot reach gateway at {self.base}: {type(exc).__name__}")
        return ApiError(503, f"connection to gateway at {self.base} broke: {type(exc).__name__}")

    def request_json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            resp = self._check(self._http.request(method, self.root + path, **kw))
        except httpx.HTTPError as exc:
            raise self._wrap(exc) from None
        try:
            data = resp.json()
        except ValueError:
            raise CliError(f"gateway answered non-JSON to {method} {path.split('?')[0]}") from None
        if not isinstance(data, dict):
            raise CliError(f"gateway answered a JSON {type(data).__name__}, not an object")
        return data

    def upload(self, path: Path, purpose: str = "batch") -> dict[str, Any]:
        """multipart/form-data as the openai SDK sends it: `purpose` then `file` (the file part
        last, octet-stream); httpx streams the file from disk with a Content-Length."""
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 120.0))
        with path.open("rb") as fh:
            files = {"file": (path.name, fh, "application/octet-stream")}
            return self.request_json(
                "POST", "/files", data={"purpose": purpose}, files=files, timeout=timeout
            )

    def batch(self, batch_id: str) -> BatchView:
        return parse_batch(self.request_json("GET", f"/batches/{checked_id(batch_id, 'batch')}"))

    def download(self, file_id: str, sink: BinaryIO) -> tuple[int, int]:
        """Stream a file's content into `sink` chunk by chunk: (bytes, lines)."""
        url = f"{self.root}/files/{checked_id(file_id, 'file')}/content"
        n = lines = 0
        try:
            with self._http.stream("GET", url) as resp:
                self._check(resp)
                for chunk in resp.iter_bytes(CHUNK):
                    sink.write(chunk)
                    n += len(chunk)
                    lines += chunk.count(b"\n")
        except httpx.HTTPError as exc:
            raise self._wrap(exc) from None
        return n, lines


def api_from_args(args: argparse.Namespace) -> Api:
    base, key = resolve_gateway(args.gateway, args.key, args.dev_vars)
    return Api(base, key, args.role, args.timeout)


def to_stderr(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


# --- watch -------------------------------------------------------------------------------


def clock_fields(
    elapsed: float | None, rate: float | None, eta: float | None, ended: bool
) -> dict[str, Any]:
    """The task fields ClockColumn reads: the last poll's numbers and when they were polled."""
    return {"elapsed": elapsed, "rate": rate, "eta": eta, "polled": _monotonic(), "ended": ended}


class ClockColumn(ProgressColumn):
    """elapsed · rate · ETA, ticking between polls from the last poll's numbers."""

    def render(self, task: Any) -> Text:
        f = task.fields
        dt = 0.0 if f.get("ended") else _monotonic() - f.get("polled", _monotonic())
        elapsed = None if f.get("elapsed") is None else f["elapsed"] + dt
        eta = None if f.get("eta") is None else max(0.0, f["eta"] - dt)
        return Text(clock_text(elapsed, f.get("rate"), eta, compact=True), style="cyan")


class LiveBar:
    """The rich progress bar both watches draw on a terminal (stderr, so stdout stays for ids
    and data): status, bar, n/m, one column of the watch's own, the clock, a note."""

    def __init__(self, console: Console, own: ProgressColumn) -> None:
        # The id goes in a header line: on 80 columns the bar row keeps only what moves.
        self.progress = Progress(
            TextColumn("[bold]{task.fields[status]}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            own,
            ClockColumn(table_column=Column(no_wrap=True)),
            TextColumn("[yellow]{task.fields[note]}"),
            console=console,
            expand=True,
        )
        self.task: Any = None
        self.headed = False

    def __enter__(self) -> Self:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def header(self, markup: str) -> None:
        """The header line, printed once: with the first thing shown, not before."""
        if not self.headed:
            self.headed = True
            self.progress.console.print(markup)

    def draw(self, name: str, total: int | None, completed: int, fields: dict[str, Any]) -> None:
        if self.task is None:
            self.task = self.progress.add_task(name, total=total, completed=completed, **fields)
        else:
            self.progress.update(self.task, total=total, completed=completed, **fields)
        self.progress.refresh()


class LineBase:
    """Not a terminal (CI, a log file): a watch prints one plain line whenever something moved."""

    def __init__(self, file: Any) -> None:
        self.file, self.last = file, None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def moved(self, key: object) -> bool:
        """Whether `key` (what the line would show) differs from the last line's."""
        if key == self.last:
            return False
        self.last = key
        return True


class LiveDisplay(LiveBar):
    """`heady batch watch`'s bar: failed lines in red."""

    def __init__(self, console: Console) -> None:
        super().__init__(console, TextColumn("[red]{task.fields[failed]}"))

    def show(
        self,
        view: BatchView,
        elapsed: float | None,
        rate: float | None,
        eta: float | None,
        note: str = "",
    ) -> None:
        fields = {
            "status": view.status,
            "failed": f"{view.failed} failed" if view.failed else "",
            "note": note[:60],
            **clock_fields(elapsed, rate, eta, view.terminal),
        }
        total = view.total or None  # None: a pulsing bar while validating
        self.header(f"[bold]{view.id}[/] (Ctrl-C stops watching; the batch keeps running)")
        self.draw(view.id, total, view.done, fields)


class LineDisplay(LineBase):
    def show(
        self,
        view: BatchView,
        elapsed: float | None,
        rate: float | None,
        eta: float | None,
        note: str = "",
    ) -> None:
        if self.moved((view.status, view.done, view.total, note)):
            parts = [view.id, view.status, progress_text(view), clock_text(elapsed, rate, eta)]
            print("  ".join(parts + ([note] if note else [])), file=self.file, flush=True)


def stderr_console() -> Console:
    width = None if sys.stderr.isatty() else max(shutil.get_terminal_size((140, 24)).columns, 140)
    return Console(file=sys.stderr, width=width, highlight=False)


def make_display() -> LiveDisplay | LineDisplay:
    console = stderr_console()
    return LiveDisplay(console) if console.is_terminal else LineDisplay(sys.stderr)


def watch(api: Api, batch_id: str, display: LiveDisplay | LineDisplay) -> BatchView:
    """Poll until a terminal status. Transient failures (timeouts, 5xx, 429) are retried with
    the same backoff, up to MAX_TRANSIENT in a row; anything else ends the watch (exit 2)."""
    samples: list[tuple[float, int]] = []
    interval, status, failures = POLL_MIN_S, None, 0
    view: BatchView | None = None
    with display:
        while True:
            try:
                view, note, failures = api.batch(batch_id), "", 0
            except ApiError as exc:
                failures += 1
                if not exc.transient or failures >= MAX_TRANSIENT:
                    raise
                note = f"retrying: {exc}"
                if view is None:  # nothing to draw yet: say so once, on stderr
                    to_stderr(f"heady: {note}")
            if view is not None:
                now = api.server_now()
                if not note:
                    samples = [*samples, (now, view.done)][-200:]
                rate = batch_rate(view, samples, now)
                display.show(view, elapsed_s(view, now), rate, eta_s(view, rate), note)
                if view.terminal:
                    return view
            _sleep(interval)
            changed = view is not None and view.status != status
            interval = next_interval(interval, changed)
            status = view.status if view is not None else None


def _watch_and_report(api: Api, batch_id: str) -> int:
    try:
        view = watch(api, batch_id, make_display())
    except KeyboardInterrupt:
        to_stderr(
            f"heady: stopped watching; batch {batch_id} keeps running on the gateway.",
            f"  resume: heady batch watch {batch_id}",
            f"  cancel: heady batch cancel {batch_id}",
        )
        return EXIT_INTERRUPTED
    print("\n".join(summary(view)))
    return TERMINAL_EXIT[view.status]


def cmd_watch(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        return _watch_and_report(api, checked_id(args.id, "batch"))
    finally:
        api.close()


# --- submit / results / list / cancel ----------------------------------------------------


def parse_metadata(pairs: Sequence[str]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k or len(k) > 64 or len(v) > 512:
            raise CliError(f"--metadata wants KEY=VALUE (key ≤ 64, value ≤ 512 chars): {pair!r}")
        out[k] = v
    if len(out) > 16:
        raise CliError("--metadata: at most 16 pairs")
    return out or None


def input_file(name: str, what: str) -> tuple[Path, int]:
    """A local JSONL file to upload and its size; `what` says what its lines should be."""
    path = Path(name)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise CliError(f"{path} is not a file")
    if size == 0:
        raise CliError(f"{path} is empty: {what}")
    return path, size


def cmd_submit(args: argparse.Namespace) -> int:
    path, size = input_file(args.file, "a batch input is JSONL, one request per line")
    metadata = parse_metadata(args.metadata or [])
    api = api_from_args(args)
    try:
        to_stderr(f"uploading {path.name} ({size:,} bytes) to {api.root}/files ...")
        file_id = checked_id(api.upload(path).get("id"), "file")
        body: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": args.endpoint,
            "completion_window": "24h",
        }
        if metadata:
            body["metadata"] = metadata
        try:
            view = parse_batch(api.request_json("POST", "/batches", json=body))
        except CliError:
            drop_uploads(api, [file_id])  # the upload was for this batch only
            raise
        print(view.id, flush=True)
        to_stderr(f"batch {view.id} created ({view.status}) from {file_id}")
        if args.watch:
            return _watch_and_report(api, view.id)
        to_stderr(f"  watch: heady batch watch {view.id}")
        return EXIT_OK
    finally:
        api.close()


def drop_uploads(api: Api, file_ids: Iterable[str]) -> None:
    """Files uploaded for a create that failed: deleted, not left behind (best effort; a
    note says which were kept)."""
    for file_id in file_ids:
        try:
            api.request_json("DELETE", f"/files/{file_id}")
        except CliError:
            to_stderr(f"heady: note: uploaded file {file_id} was kept")


def _to_file(target: str, fetch: Callable[[BinaryIO], tuple[int, int]]) -> tuple[int, int]:
    """Write to TARGET.part and rename it only when complete, so an interrupted download never
    looks like a finished one. `-` or a non-regular file (/dev/stdout) is written directly."""
    path = Path(target)
    if target == "-":
        result = fetch(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return result
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a file name")
    if path.exists() and not path.is_file():
        try:
            with path.open("wb") as fh:
                return fetch(fh)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    part = path.with_name(path.name + ".part")
    try:
        with part.open("wb") as fh:
            result = fetch(fh)
        os.replace(part, path)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return result


def cmd_results(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        view = api.batch(checked_id(args.id, "batch"))
        if not view.terminal:
            raise CliError(
                f"batch {view.id} is {view.status} ({progress_text(view)}): no results yet; "
                f"wait with `heady batch watch {view.id}`"
            )
        if view.status == "failed" and not view.output_file_id:
            print("\n".join(summary(view)), file=sys.stderr)
            return TERMINAL_EXIT["failed"]
        same = args.output and args.errors and args.output != "-"
        if same and Path(args.output).resolve() == Path(args.errors).resolve():
            raise CliError("-o and --errors name the same file")
        jobs = [("output", view.output_file_id, args.output)]
        if args.errors:
            jobs.append(("errors", view.error_file_id, args.errors))
        for kind, file_id, target in jobs:
            where = target or "stdout"
            if file_id is None:
                if target and target != "-":
                    _to_file(target, lambda _fh: (0, 0))
                to_stderr(f"batch {view.id} has no {kind} file ({view.status}); {where} left empty")
                continue
            if target:
                n, lines = _to_file(target, lambda fh, fid=file_id: api.download(fid, fh))
            else:
                n, lines = api.download(file_id, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            to_stderr(f"{kind}: {lines:,} lines, {n:,} bytes from {file_id} -> {where}")
        if view.error_file_id and not args.errors:
            to_stderr(f"{view.failed} failed lines are in {view.error_file_id}: add --errors FILE")
        return EXIT_OK
    finally:
        api.close()


def iter_list(api: Api, path: str, limit: int | None) -> Iterable[dict[str, Any]]:
    """Every item of a list endpoint (`/batches`, `/fine_tuning/jobs`, a job's events...),
    newest first, following the cursor (`after` = the last id, until `has_more` is false) as
    the SDK's SyncCursorPage does; at most `limit` when given."""
    after: str | None = None
    seen = 0
    while limit is None or seen < limit:
        page = 100 if limit is None else min(100, limit - seen)
        # The SDK's order (`after`, then `limit`), so the URL is the one it sends.
        params: dict[str, Any] = {"after": after} if after else {}
        params["limit"] = page
        data = api.request_json("GET", path, params=params)
        items = [b for b in data.get("data") or [] if isinstance(b, dict)]
        for item in items[: None if limit is None else limit - seen]:
            seen += 1
            yield item
        last = items[-1].get("id") if items else None
        if not data.get("has_more") or not isinstance(last, str):
            return
        if last == after:
            raise CliError("gateway pagination did not advance (the same page twice)")
        after = last


def fmt_when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_list(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        items = list(iter_list(api, "/batches", None if args.all else args.limit))
    finally:
        api.close()
    if args.json:
        print(json.dumps(items, indent=2))
        return EXIT_OK
    table = Table(title=f"Batches ({len(items)})")
    for col in ("id", "status", "progress", "endpoint", "model", "created", "output", "errors"):
        table.add_column(col, overflow="fold")
    for item in items:
        v = parse_batch(item)
        table.add_row(
            v.id, v.status, progress_text(v), v.endpoint or "-", v.model or "-",
            fmt_when(v.created_at), v.output_file_id or "-", v.error_file_id or "-",
        )  # fmt: skip
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    Console(width=width, highlight=False).print(table)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    try:
        path = f"/batches/{checked_id(args.id, 'batch')}/cancel"
        view = parse_batch(api.request_json("POST", path))
    finally:
        api.close()
    print(f"batch {view.id} {view.status} ({progress_text(view)} done); partial output is kept")
    if not view.terminal:
        to_stderr(f"  follow it: heady batch watch {view.id}")
    return EXIT_OK


# --- argparse ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def common_options() -> argparse.ArgumentParser:
    """The gateway options every `heady batch` / `heady ft` command takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gateway", help="gateway base URL (or HEADY_GATEWAY_URL)")
    common.add_argument("--key", help="client key (prefer GATEWAY_API_KEY in the environment)")
    common.add_argument("--dev-vars", help="file with HEADY_GATEWAY_URL / GATEWAY_API_KEY")
    common.add_argument("--role", default="batch", help="the gateway pool: /api/heavy/<role>/v1")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30)")
    return common


def add_parser(sub: Any) -> None:
    """`heady batch ...`: called once from heady_cli.main.build_parser."""
    common = common_options()

    b = sub.add_parser("batch", help="OpenAI-compatible batches on the gateway (submit, watch...)")
    bs = b.add_subparsers(dest="batch_command", required=True)

    s = bs.add_parser("submit", parents=[common], help="upload a JSONL file and start a batch")
    s.add_argument("file", help="JSONL: one {custom_id, method, url, body} per line")
    s.add_argument(
        "--endpoint", default="/v1/chat/completions", help="every line's url (%(default)s)"
    )
    s.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="repeatable")
    s.add_argument("--watch", action="store_true", help="then watch it until it ends")
    s.set_defaults(func=cmd_submit)

    w = bs.add_parser("watch", parents=[common], help="progress bar until the batch ends")
    w.add_argument("id")
    w.set_defaults(func=cmd_watch)

    r = bs.add_parser("results", parents=[common], help="stream the output (and error) file")
    r.add_argument("id")
    r.add_argument("-o", "--output", help="write the output file here (default stdout)")
    r.add_argument("--errors", metavar="FILE", help="write the error file (failed lines) here")
    r.set_defaults(func=cmd_results)

    ls = bs.add_parser("list", parents=[common], help="your batches, newest first")
    ls.add_argument("--limit", type=positive_int, default=20, help="how many (20)")
    ls.add_argument("--all", action="store_true", help="every batch (follows all pages)")
    ls.add_argument("--json", action="store_true", help="the Batch objects as JSON")
    ls.set_defaults(func=cmd_list)

    c = bs.add_parser("cancel", parents=[common], help="cancel; finished lines are kept")
    c.add_argument("id")
    c.set_defaults(func=cmd_cancel)
