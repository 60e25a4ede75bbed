"""Validate a fine-tuning training (or validation) file line by line (pure, stdlib only).

Shared by the gateway (a cheap check at upload) and the node (the full check before any GPU
time). The format is OpenAI's supervised chat format (openai-python `FineTuneChatRequestInput`,
research node-apis.md §2): one JSON object per line,

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...],
     "tools"?: [...], "parallel_tool_calls"?: bool}

where an assistant message may carry `"weight": 0|1` (1, the default, trains on that turn).

Rules checked here, each failing with an OpenAI-shaped error naming the 1-based line:
  * the line is a JSON object with a non-empty `messages` list of objects;
  * every role is one of ROLES; `content` is a string or a list of text parts
    (`{"type": "text", "text": str}`) — an assistant turn may have `content: null` when it carries
    `tool_calls`; images/audio are not trained on by our text LoRA trainer, so they are refused;
  * assistant `weight` is 0 or 1 (not true/false), and at least one assistant turn has weight 1
    (an example with nothing to learn only costs time);
  * the file has at least `min_examples` examples (OpenAI's minimum is 10) and at most
    MAX_EXAMPLES;
  * when a token counter is given (the node has the base model's tokenizer), an example's tokens
    (chat template applied) fit in `max_tokens` (the base model's context).

Blank lines are skipped but counted in line numbers (what an editor shows), as in batchlines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from heady_shared.batchlines import LineError, is_blank

ROLES = frozenset({"system", "user", "assistant", "tool"})
MIN_EXAMPLES = 10  # OpenAI's documented minimum
MAX_EXAMPLES = 100_000
MAX_ERRORS = 100  # enough to fix a file; a job error names the first
CODE = "invalid_training_file"
PARAM = "training_file"

# An example (the parsed JSON object) -> its token count with the chat template applied.
TokenCounter = Callable[[Mapping[str, object]], int]


@dataclass(frozen=True)
class FileVerdict:
    errors: tuple[LineError, ...]
    examples: int

    @property
    def ok(self) -> bool:
        return not self.errors

    def job_error(self) -> dict[str, object] | None:
        """The fine-tuning job's `error` ({code, message, param}) for the first problem."""
        if not self.errors:
            return None
        first = self.errors[0]
        more = len(self.errors) - 1
        tail = f" ({more} more problem{'s' if more != 1 else ''} in the file)" if more else ""
        return {"code": first.code, "message": first.message + tail, "param": first.param}


def check_example(obj: object) -> str | None:
    """Why a parsed line is not a valid training example, or None."""
    if not isinstance(obj, dict):
        return "is not a JSON object"
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return "has no `messages` list (expected a non-empty list of chat messages)"
    trainable = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            return f"{where} is not an object"
        role = msg.get("role")
        if role not in ROLES:
            return f"{where}.role is {role!r}; expected one of {', '.join(sorted(ROLES))}"
        problem = _check_content(msg, role)
        if problem:
            return f"{where}.{problem}"
        if "weight" in msg:
            if role != "assistant":
                return f"{where}.weight is only allowed on assistant messages"
            w = msg["weight"]
            if isinstance(w, bool) or w not in (0, 1):
                return f"{where}.weight is {w!r}; expected 0 or 1"
        if role == "assistant" and msg.get("weight", 1) == 1:
            trainable += 1
    if not trainable:
        return "has no assistant message with weight 1 (nothing to train on)"
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        return "`tools` is not a list"
    return None


def _check_content(msg: Mapping[str, object], role: object) -> str | None:
    content = msg.get("content")
    if isinstance(content, str):
        return None
    if content is None:
        if role == "assistant" and msg.get("tool_calls"):
            return None
        return "content is missing"
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                return f"content[{j}] is not a text part (only text is trained on)"
        return None
    return "content must be a string or a list of text parts"


@dataclass
class FileValidator:
    """Feed raw lines (bytes, without or with their newline) in order; `finish()` gives the
    verdict. Holds only counters and the errors, never the file."""

    min_examples: int = MIN_EXAMPLES
    max_examples: int = MAX_EXAMPLES
    count_tokens: TokenCounter | None = None
    max_tokens: int | None = None
    param: str = PARAM
    errors: list[LineError] = field(default_factory=list)
    examples: int = 0
    line: int = 0

    def _error(self, line: int | None, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            where = f"Line {line}: " if line is not None else ""
            self.errors.append(LineError(CODE, line, where + message, self.param))

    @property
    def exhausted(self) -> bool:
        return len(self.errors) >= MAX_ERRORS

    def feed(self, raw: bytes) -> None:
        self.line += 1
        if is_blank(raw):
            return
        n = self.line
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._error(n, "is not valid JSON")
            return
        problem = check_example(obj)
        if problem:
            self._error(n, f"example {problem}")
            return
        self.examples += 1
        if self.examples == self.max_examples + 1:
            self._error(n, f"the file has more than {self.max_examples} examples")
        if self.count_tokens is not None and self.max_tokens is not None:
            try:
                tokens = self.count_tokens(obj)
            except ValueError as exc:  # e.g. the chat template refuses the conversation
                self._error(
                    n, f"example cannot be rendered with the base model's chat template: {exc}"
                )
                return
            if tokens > self.max_tokens:
                self._error(
                    n,
                    f"example is {tokens} tokens long; the base model's context is "
                    f"{self.max_tokens} tokens",
                )

    def finish(self) -> FileVerdict:
        if self.examples < self.min_examples and not self.errors:
            self._error(
                None,
                f"the file has {self.examples} valid example{'s' if self.examples != 1 else ''};"
                f" at least {self.min_examples} are required",
            )
        return FileVerdict(tuple(self.errors), self.examples)


def validate_file(lines: Iterable[bytes], **options: object) -> FileVerdict:
    """Validate a whole file given as raw lines (`batchlines.split_lines` over its chunks)."""
    checker = FileValidator(**options)  # type: ignore[arg-type]
    for raw in lines:
        checker.feed(raw)
        if checker.exhausted:
            break
    return checker.finish()


def parse_examples(lines: Iterable[bytes]) -> list[dict[str, object]]:
    """The examples of an already validated file, in order (blank lines skipped)."""
    return [json.loads(raw) for raw in lines if not is_blank(raw)]


# -- fine-tuned model names ------------------------------------------------------------------
FT_PREFIX = "ft:"
_SLUG_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
SLUG_READABLE = 60


def ft_model_name(base: str, org: str, suffix: str, job_id: str) -> str:
    """OpenAI's naming: `ft:<base>:<org>:<suffix>:<id>` (empty suffix -> `::`)."""
    return f"{FT_PREFIX}{base}:{org}:{suffix}:{job_id}"


def ft_base(name: str) -> str | None:
    """The base model of an `ft:` name (base ids may hold `/` but never `:`), or None."""
    if not name.startswith(FT_PREFIX):
        return None
    parts = name[len(FT_PREFIX) :].split(":")
    if len(parts) == 5 and parts[4].startswith("ckpt-step-"):
        parts = parts[:4]
    return parts[0] if len(parts) == 4 and parts[0] and parts[3] else None


def adapter_slug(name: str) -> str | None:
    """A safe, stable directory and URL segment for a fine-tuned model name: its readable
    characters (others -> `_`), then 16 hex of its SHA-256 so two names never share a slug.
    One path segment, no leading dot: it can never be `..` or climb out of a cache dir.
    None for a name that is not an `ft:` name."""
    if ft_base(name) is None:
        return None
    readable = "".join(c if c in _SLUG_SAFE else "_" for c in name)[:SLUG_READABLE]
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{readable.lstrip('.')}-{digest}"


def is_slug(text: str) -> bool:
    return (
        0 < len(text) <= SLUG_READABLE + 17
        and not text.startswith(".")
        and all(c in _SLUG_SAFE for c in text)
    )
