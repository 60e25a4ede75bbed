"""Validate a batch input file line by line and cut it into shards (pure, stdlib only).

A node runs this over the file's data as it streams in (`split_lines` over the HTTP body's
chunks, `Validator.feed` per line), so a 100 MB file is never held whole, let alone twice: at any
time only the current line, the set of custom_ids (≤ 50,000 strings) and the shard plan live.

Rules (docs/batch.md "Lifecycle"; OpenAI's documented limits for a batch input file):
every non-blank line is a JSON object with a string `custom_id` unique in the file, `method`
"POST", `url` equal to the batch's endpoint and `body` an object naming a string `model`, the
same model on every line; at most MAX_LINES requests and MAX_BYTES bytes. Errors carry the
1-based physical line number (what an editor shows), a code, a message and the offending param.

Blank (whitespace-only) lines are not requests: they are skipped, but still counted in line
numbers, and their bytes belong to the shard they sit in, so the shards' byte ranges are
contiguous and cover the whole file exactly. A shard holds SHARD_LINES requests (the last one
fewer): `offset`/`length` are byte positions in the file's data, `first_line` the 0-based index
of the shard's first request among the batch's requests, `n_lines` its number of requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
SHARD_LINES = 100
MAX_ERRORS = 1_000  # the gateway keeps no more than this many


@dataclass(frozen=True)
class LineError:
    code: str
    line: int | None  # 1-based; None for errors about the whole file
    message: str
    param: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


@dataclass(frozen=True)
class Shard:
    offset: int
    length: int
    first_line: int  # 0-based index of the shard's first request
    n_lines: int

    def to_dict(self) -> dict[str, int]:
        return {
            "offset": self.offset,
            "length": self.length,
            "first_line": self.first_line,
            "n_lines": self.n_lines,
        }


@dataclass(frozen=True)
class Verdict:
    """The outcome of validating a whole file: `errors` empty means ok."""

    errors: tuple[LineError, ...]
    model: str | None
    total: int
    shards: tuple[Shard, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    def commit_body(self) -> dict[str, object]:
        """The validate commit of the node API, without the lease token."""
        if self.errors:
            return {"ok": False, "errors": [e.to_dict() for e in self.errors]}
        return {
            "ok": True,
            "model": self.model,
            "total": self.total,
            "shards": [s.to_dict() for s in self.shards],
        }


def is_blank(raw: bytes) -> bool:
    return not raw.strip()


@dataclass
class Validator:
    """Feed every line of the file, in order, with its line ending; then call `finish()`."""

    endpoint: str
    shard_lines: int = SHARD_LINES
    max_lines: int = MAX_LINES
    max_bytes: int = MAX_BYTES
    max_errors: int = MAX_ERRORS

    errors: list[LineError] = field(default_factory=list, init=False)
    model: str | None = field(default=None, init=False)
    line_no: int = field(default=0, init=False)  # physical lines seen
    requests: int = field(default=0, init=False)
    size: int = field(default=0, init=False)  # bytes seen
    exhausted: bool = field(default=False, init=False)  # further lines cannot change the verdict
    _model_line: int = field(default=0, init=False)
    _ids: set[str] = field(default_factory=set, init=False)
    _starts: list[int] = field(default_factory=list, init=False)  # byte offset of each shard

    def __post_init__(self) -> None:
        if self.shard_lines < 1:
            raise ValueError("shard_lines must be >= 1")

    def _error(self, code: str, line: int | None, message: str, param: str | None = None) -> None:
        if len(self.errors) < self.max_errors:
            self.errors.append(LineError(code, line, message, param))
        if len(self.errors) >= self.max_errors:
            self.exhausted = True

    def feed(self, raw: bytes) -> None:
        if self.exhausted:
            return
        start = self.size
        self.size += len(raw)
        self.line_no += 1
        if self.size > self.max_bytes:
            self._error(
                "file_too_large", None, f"the input file is larger than {self.max_bytes} bytes"
            )
            self.exhausted = True
            return
        if is_blank(raw):
            return
        self.requests += 1
        if self.requests > self.max_lines:
            self._error(
                "too_many_requests",
                self.line_no,
                f"the input file has more than {self.max_lines} requests",
            )
            self.exhausted = True
            return
        if (self.requests - 1) % self.shard_lines == 0:
            # The first shard also takes any blank lines before the first request.
            self._starts.append(0 if self.requests == 1 else start)
        self._check(raw, self.line_no)

    def _check(self, raw: bytes, n: int) -> None:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            self._error("invalid_json_line", n, "this line is not parseable as valid JSON")
            return
        if not isinstance(obj, dict):
            self._error("invalid_json_line", n, "this line is not a JSON object")
            return
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            self._error("invalid_custom_id", n, "custom_id must be a non-empty string", "custom_id")
        elif cid in self._ids:
            self._error(
                "duplicate_custom_id",
                n,
                f"the custom_id {cid[:64]!r} appears on an earlier line: "
                "custom_id must be unique in the batch",
                "custom_id",
            )
        else:
            self._ids.add(cid)
        if obj.get("method") != "POST":
            self._error("invalid_method", n, 'method must be "POST"', "method")
        url = obj.get("url")
        if url != self.endpoint:
            self._error(
                "invalid_url",
                n,
                f"url must be the batch's endpoint {self.endpoint!r}",
                "url",
            )
        body = obj.get("body")
        if not isinstance(body, dict):
            self._error("invalid_body", n, "body must be a JSON object", "body")
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            self._error("missing_model", n, "body.model must be a non-empty string", "body.model")
        elif self.model is None:
            self.model, self._model_line = model, n
        elif model != self.model:
            self._error(
                "mismatched_model",
                n,
                f"every request in a batch must use the same model: this line uses "
                f"{model[:128]!r}, line {self._model_line} uses {self.model[:128]!r}",
                "body.model",
            )

    def finish(self) -> Verdict:
        if not self.errors and self.requests == 0:
            self._error("empty_file", None, "the input file has no requests")
        if self.errors:
            return Verdict(tuple(self.errors), None, self.requests, ())
        return Verdict(
            (),
            self.model,
            self.requests,
            plan(self._starts, self.size, self.requests, self.shard_lines),
        )


def plan(starts: list[int], size: int, requests: int, shard_lines: int) -> tuple[Shard, ...]:
    """Shards from their start offsets: each ends where the next starts, the last at `size`."""
    ends = [*starts[1:], size]
    return tuple(
        Shard(s, e - s, k * shard_lines, min(shard_lines, requests - k * shard_lines))
        for k, (s, e) in enumerate(zip(starts, ends, strict=True))
    )


def validate(lines: Iterable[bytes], endpoint: str, **limits: int) -> Verdict:
    v = Validator(endpoint, **limits)
    for raw in lines:
        v.feed(raw)
        if v.exhausted:
            break
    return v.finish()


class LineSplitter:
    """Bytes in arbitrary chunks -> whole lines (each with its b"\\n"; the last maybe without).

    Only the unfinished line is kept, as a list of pieces joined once its end arrives, so a long
    line spread over many chunks costs linear time."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []

    def push(self, chunk: bytes) -> Iterator[bytes]:
        pos = 0
        while True:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                break
            piece = chunk[pos : nl + 1]
            if self._pending:
                self._pending.append(piece)
                piece = b"".join(self._pending)
                self._pending = []
            yield piece
            pos = nl + 1
        if pos < len(chunk):
            self._pending.append(chunk[pos:])

    def close(self) -> Iterator[bytes]:
        if self._pending:
            rest = b"".join(self._pending)
            self._pending = []
            yield rest


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    splitter = LineSplitter()
    for chunk in chunks:
        yield from splitter.push(chunk)
    yield from splitter.close()


async def asplit_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    splitter = LineSplitter()
    async for chunk in chunks:
        for line in splitter.push(chunk):
            yield line
    for line in splitter.close():
        yield line
