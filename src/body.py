"""The client's request body, judged before anything reaches a node. Pure.

- `content_length`: the declared length per RFC 9110 §8.6 (`Content-Length = 1*DIGIT`), told
  apart as absent, valid, invalid (400) or too large (413).
- `read_fault` / `short_body_fault`: a body that could not be read, or arrived shorter than it
  said, is the client's fault; the shell answers 400 `bad_request_body` (or nothing, if the
  client is gone) and never marks a node down or replays it elsewhere.

What the Workers runtime reports for each client fault is measured in docs/client-faults.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BAD_BODY = "bad_request_body"
# The first read of a body waits for this much (or the declared length, if less); each later
# one for as much as has already come (bench/README.md, "big bodies").
FIRST_READ_BYTES = 64 * 1024
TOO_LARGE = "payload_too_large"

# Why a body is the client's fault (for the log; the client always sees bad_request_body).
Fault = Literal["truncated", "malformed", "client_gone", "unreadable"]


@dataclass(frozen=True, slots=True)
class BodyError:
    """An answer to give the client instead of forwarding its request."""

    status: int  # 400 or 413
    type: str  # BAD_BODY or TOO_LARGE
    message: str


def content_length(raw: str | None, limit: int) -> int | BodyError | None:
    """The declared body length: None when absent, else an int in 0..limit, else an error.

    Only `1*DIGIT` is valid: a sign (`-1`, `+21`), blanks inside, a list (`1,1`, the way
    duplicated fields arrive once joined), hex or non-ASCII digits are 400, never 413. Leading
    and trailing blanks are field whitespace (RFC 9110 §5.5) and are ignored.
    """
    if raw is None:
        return None
    text = raw.strip(" \t")
    if not text or not (text.isascii() and text.isdigit()):
        # str.isdigit() alone accepts "²" or Arabic-Indic digits; isascii() keeps it to 0-9.
        return BodyError(400, BAD_BODY, "invalid Content-Length: must be digits only")
    digits = text.lstrip("0") or "0"
    # Compared by length before int(): a 5,000-digit value must not reach int(), which
    # refuses more than 4,300 digits (sys.int_info.str_digits_check_threshold).
    if len(digits) > len(str(limit)) or int(digits) > limit:
        return BodyError(413, TOO_LARGE, f"request body exceeds the {limit} byte limit")
    return int(digits)


# Texts the runtime gives (as the JsException's str) when reading the client's body fails;
# measured on workerd 1.20241106.2 and read in workerd's source, see docs/client-faults.md.
_FAULT_TEXTS: tuple[tuple[str, Fault], ...] = (
    # The client closed (or half-closed) before sending all it declared, or mid-chunk.
    ("network connection lost", "truncated"),
    # kj's "invalid HTTP chunk size" (bad hex, chunk extensions) surfaces as this.
    ("internal error", "malformed"),
    ("because client disconnected", "client_gone"),
)
# Texts that mean the gateway misused the stream: its own bug, never the client's.
_OWN_TEXTS = (
    "after response has been sent",
    "after responding with an exception",
    "disturbed",
    "locked",
)


def next_read_size(total: int, declared: int | None, limit: int) -> int:
    """How many bytes the next read of a body should wait for, `total` having come (0: stop).

    A declared length is read up to itself (the HTTP layer delivers no byte past it); an
    undeclared one (chunked) up to one byte past `limit`, which tells an oversized upload
    apart. Each read waits for `FIRST_READ_BYTES`, then for as much as has already come, so a
    10 MiB body takes ~9 reads (one runtime call each, not one per network chunk) and what a
    read allocates ahead of the bytes is never more than what was actually sent (a declared
    but unsent length costs nothing)."""
    end = declared if declared is not None else limit + 1
    left = end - total
    if left <= 0:
        return 0
    return min(left, max(FIRST_READ_BYTES, total))


def read_fault(message: str) -> Fault | None:
    """A failure while reading the client's body (the exception's text): whose fault?

    Returns why it is the client's, or None for the gateway's own misuse of the stream (which
    stays a logged internal error). Call it only for errors raised by reading the *request*
    body: the same "Network connection lost." also means a refused node on a fetch, which is
    why a fetch error alone never decides (see `short_body_fault`).
    """
    lowered = message.lower()
    if any(text in lowered for text in _OWN_TEXTS):
        return None
    for text, fault in _FAULT_TEXTS:
        if text in lowered:
            return fault
    return "unreadable"


def short_body_fault(declared: int | None, received: int) -> Fault | None:
    """Did the body read arrive whole? A body cut short by the client can read back as the
    bytes that came, without an error (measured: docs/client-faults.md), so the length is the
    only witness: other than declared means the client's upload was truncated."""
    if declared is not None and received != declared:
        return "truncated"
    return None


def body_error(fault: Fault) -> BodyError:
    """The client's answer for a body fault (if it is still there to read it)."""
    text = {
        "truncated": "request body ended before its declared length",
        "malformed": "request body framing is invalid (chunked encoding)",
        "client_gone": "client disconnected while sending the request body",
        "unreadable": "request body could not be read",
    }[fault]
    return BodyError(400, BAD_BODY, text)
