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

Also here, for the gateway as much as the node: `check_job_request` (a jobs.create body:
model, files, suffix, seed, method/hyperparameters, metadata -> JobRequest or an error naming
the field), `parse_requested` (OpenAI's hyperparameters, values or "auto"), `seed_for` (a job's
seed when it names none), and the `ft:` model names with their safe slugs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from heady_shared import ftnames
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


# -- the job request (jobs.create), shared by the gateway and the node -----------------------
AUTO = "auto"
MAX_EPOCHS = 50
MAX_BATCH = 256
MAX_SEED = 2_147_483_647
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512  # OpenAI's metadata limits
# Longer than these is no name we could hold (our file ids are 29 characters).
MAX_MODEL, MAX_FILE_ID = 256, 128
_MISSING = "missing_required_parameter"


class HyperparameterError(ValueError):
    """An OpenAI-shaped invalid_request_error: `param` names the field, `code` says what is
    wrong with it (the gateway answers 400 with both)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Requested:
    """The job's hyperparameters as the user gave them (values or "auto")."""

    n_epochs: int | str = AUTO
    batch_size: int | str = AUTO
    learning_rate_multiplier: float | str = AUTO

    def values(self) -> dict[str, object]:
        """As the job object echoes them (`hyperparameters`, `method.supervised`)."""
        return {"batch_size": self.batch_size, "learning_rate_multiplier":
                self.learning_rate_multiplier, "n_epochs": self.n_epochs}  # fmt: skip


HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
_HP_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "n_epochs": (lambda v: _int(v) and 1 <= v <= MAX_EPOCHS, f"an integer 1-{MAX_EPOCHS}"),  # type: ignore[operator]
    "batch_size": (lambda v: _int(v) and 1 <= v <= MAX_BATCH, f"an integer 1-{MAX_BATCH}"),  # type: ignore[operator]
    "learning_rate_multiplier": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf,
        "a number > 0",
    ),
}


def parse_requested(hp: object, where: str = "hyperparameters", auto: bool = True) -> Requested:
    """Check OpenAI's `hyperparameters` object (method.supervised.hyperparameters or the
    deprecated top-level one: `where`); raises HyperparameterError naming the field. With
    `auto` False every value must be given (what a node reports it trained with)."""
    if hp is None:
        hp = {}
    if not isinstance(hp, Mapping):
        raise HyperparameterError(where, f"{where} must be an object")
    unknown = sorted(set(hp) - set(HYPERPARAMETERS))
    if unknown:
        name = str(unknown[0])[:64]
        raise HyperparameterError(f"{where}.{name}", f"unknown hyperparameter {name!r}")
    got: dict[str, object] = {}
    for key in HYPERPARAMETERS:
        v = hp.get(key, AUTO)
        ok, expected = _HP_RULES[key]
        if not ((v == AUTO and auto) or ok(v)):
            either = "'auto' or " if auto else ""
            raise HyperparameterError(f"{where}.{key}", f"{key} must be {either}{expected}")
        got[key] = v
    return Requested(**got)  # type: ignore[arg-type]


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name(v: object, limit: int) -> bool:
    """A model name or file id: a non-blank string of at most `limit` characters."""
    return isinstance(v, str) and bool(v.strip()) and len(v) <= limit


def seed_for(job_id: str) -> int:
    """A job's seed when it names none: stable for the job (a resumed job keeps it)."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big") % 2**31


@dataclass(frozen=True)
class JobRequest:
    """A checked `POST /v1/fine_tuning/jobs` body."""

    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int | None  # None: the gateway derives one from the job id (seed_for) and reports it
    hyperparameters: Requested
    metadata: dict[str, str] | None

    def method(self) -> dict[str, object]:
        """The job object's `method` (OpenAI echoes the hyperparameters as requested)."""
        return {
            "type": "supervised",
            "supervised": {"hyperparameters": self.hyperparameters.values()},
        }


def _hyperparameters_of(body: Mapping) -> tuple[object, str]:
    """Where the job's hyperparameters are (method.supervised.hyperparameters, or the
    deprecated top-level `hyperparameters`; not both), and that field's name."""
    method, top = body.get("method"), body.get("hyperparameters")
    if method is None:
        return top, "hyperparameters"
    if not isinstance(method, Mapping) or not isinstance(method.get("type"), str):
        raise HyperparameterError(
            "method", "method must be {type: 'supervised', supervised: {...}}"
        )
    if method["type"] != "supervised":
        raise HyperparameterError(
            "method.type",
            f"method type {str(method['type'])[:32]!r} is not supported here: only 'supervised'",
            "unsupported_value",
        )
    sup = method.get("supervised")
    if sup is not None and not isinstance(sup, Mapping):
        raise HyperparameterError("method.supervised", "method.supervised must be an object")
    inner = (sup or {}).get("hyperparameters")
    if inner is None:
        return top, "hyperparameters"
    if top is not None:
        raise HyperparameterError(
            "hyperparameters",
            "give hyperparameters in method.supervised.hyperparameters or in the deprecated"
            " top-level hyperparameters, not both",
        )
    return inner, "method.supervised.hyperparameters"


def check_job_request(body: object) -> JobRequest:
    """Validate a jobs.create body: the one rule set of the gateway (which answers 400 with
    the error's param and code), the node and the CLI (which checks before uploading).
    Raises HyperparameterError on the first problem. Which models this cluster trains, and
    whether the files exist and belong to the caller, is the gateway's own check."""
    if not isinstance(body, Mapping):
        raise HyperparameterError("body", "the request body must be a JSON object",
                                  "invalid_request")  # fmt: skip
    model = body.get("model")
    if not _name(model, MAX_MODEL):
        raise HyperparameterError("model", "'model' is required (the base model)", _MISSING)
    if ":" in model:  # an `ft:` name (base model names have no colon)
        raise HyperparameterError(
            "model",
            "fine-tuning an 'ft:' model is not supported: give its base model",
            "model_not_available",
        )
    training = body.get("training_file")
    if not _name(training, MAX_FILE_ID):
        raise HyperparameterError("training_file", "'training_file' must be a file id", _MISSING)
    validation = body.get("validation_file")
    if validation is not None and not _name(validation, MAX_FILE_ID):
        raise HyperparameterError("validation_file", "'validation_file' must be a file id")
    suffix = body.get("suffix")
    if suffix is not None and not (isinstance(suffix, str) and ftnames.SUFFIX.match(suffix)):
        raise HyperparameterError("suffix", ftnames.SUFFIX_RULE)
    seed = body.get("seed")
    if seed is not None and not (_int(seed) and 0 <= seed <= MAX_SEED):  # type: ignore[operator]
        raise HyperparameterError("seed", f"seed must be an integer 0-{MAX_SEED}")
    requested = parse_requested(*_hyperparameters_of(body))
    if body.get("integrations") not in (None, []):
        raise HyperparameterError("integrations", "integrations are not supported here",
                                  "unsupported_value")  # fmt: skip
    metadata = body.get("metadata")
    if metadata is not None:
        ok = isinstance(metadata, Mapping) and len(metadata) <= METADATA_PAIRS and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY
            and len(v) <= METADATA_VALUE for k, v in metadata.items()
        )  # fmt: skip
        if not ok:
            raise HyperparameterError(
                "metadata",
                f"metadata must be at most {METADATA_PAIRS} string pairs (keys up to "
                f"{METADATA_KEY}, values up to {METADATA_VALUE} characters)",
            )
    return JobRequest(
        model=str(model),
        training_file=str(training),
        validation_file=validation,
        suffix=suffix,
        seed=seed,
        hyperparameters=requested,
        metadata=dict(metadata) if metadata is not None else None,
    )
