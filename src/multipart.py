"""Where an upload's file data lies inside a raw multipart/form-data body, from its first and
last bytes only.

The shell streams the whole body into R2 untouched, then reads a prefix and a suffix (each
<= 64 KiB). The small text fields (`purpose`, `expires_after[...]`) sit before the file part
(the openai SDK / httpx order) or after it (curl -F order); the file's data is everything
between its part headers and the next delimiter. A boundary never occurs inside a part
(RFC 2046 §5.1.1), so the first delimiter after the file's data start is its end. No Python
runs per chunk of the file and memory stays flat whatever its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

MAX_FIELD_BYTES = 4096  # a text field larger than this is not one we read
TAIL_MARGIN = MAX_FIELD_BYTES + 1024  # see _tail: more than a field with its headers
FILE_FIELD = "file"


class MultipartError(ValueError):
    """The body is not a multipart form we can read; the message is for the client."""


@dataclass(frozen=True, slots=True)
class Envelope:
    fields: dict[str, str]  # the small text fields, by name
    filename: str
    data_offset: int  # the file's data: body[data_offset : data_offset + data_length]
    data_length: int


@dataclass(frozen=True, slots=True)
class _Part:
    name: str
    filename: str | None
    start: int  # data start, in the buffer parsed
    end: int | None  # data end (None: runs past the buffer)


def boundary_of(content_type: str | None) -> str | None:
    """The boundary of a `multipart/form-data` Content-Type, or None."""
    if not content_type:
        return None
    kind, _, rest = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    params = _params(rest)
    boundary = params.get("boundary")
    # RFC 2046: 1..70 characters; no CR/LF (they could never match a delimiter line).
    if not boundary or len(boundary) > 70 or any(c in boundary for c in "\r\n"):
        return None
    return boundary


def locate(content_type: str | None, prefix: bytes, suffix: bytes, total: int) -> Envelope:
    """The envelope of a body of `total` bytes whose first bytes are `prefix` and last bytes
    are `suffix` (the two reads may overlap when the body is small). Raises MultipartError."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise MultipartError("Content-Type must be multipart/form-data with a boundary")
    if len(prefix) > total or len(suffix) > total:
        raise MultipartError("the body is shorter than its reads")
    dash = b"--" + boundary.encode("latin-1")
    if len(prefix) + len(suffix) >= total:
        body = prefix + suffix[len(prefix) + len(suffix) - total :]
        parts, closed = _parse(body, _first_delimiter(body, dash), dash)
        if not closed:
            raise MultipartError("the multipart body has no closing boundary")
        return _envelope(parts, body)
    head, _ = _parse(prefix, _first_delimiter(prefix, dash), dash)
    if not head or head[-1].end is not None:
        # Everything before the big middle must be small fields, the file part last.
        raise MultipartError(
            "the file part must start within the first 64 KiB of the body, "
            "and no other form field may be that large"
        )
    tail_at, tail = _tail(suffix, dash, total - len(suffix))
    open_part = head[-1]
    if open_part.name != FILE_FIELD or tail_at < open_part.start:
        raise MultipartError("only the file part may be larger than 64 KiB")
    file = _Part(open_part.name, open_part.filename, open_part.start, tail_at)
    return _envelope([*head[:-1], file, *tail], prefix, suffix, total - len(suffix))


def _first_delimiter(buf: bytes, dash: bytes) -> int:
    """Index of the first boundary line's `--boundary` (a preamble may precede it)."""
    if buf.startswith(dash):
        return 0
    at = buf.find(b"\r\n" + dash)
    if at < 0:
        raise MultipartError("the body does not start with its multipart boundary")
    return at + 2


def _parse(buf: bytes, at: int, dash: bytes) -> tuple[list[_Part], bool]:
    """The parts of `buf` from a delimiter at `at`, and whether the close delimiter was seen.
    The last part's end is None when no delimiter follows it within `buf`."""
    parts: list[_Part] = []
    delimiter = b"\r\n" + dash
    while True:
        after = at + len(dash)
        if buf[after : after + 2] == b"--":
            return parts, True
        line_end = buf.find(b"\r\n", after)
        if line_end < 0 or buf[after:line_end].strip(b" \t"):
            raise MultipartError("malformed multipart boundary line")
        head_end = buf.find(b"\r\n\r\n", line_end)
        if head_end < 0:
            raise MultipartError("a multipart part's headers are too long or cut off")
        start = head_end + 4
        name, filename = _disposition(buf[line_end + 2 : head_end])
        end = buf.find(delimiter, start)
        if end < 0:
            parts.append(_Part(name, filename, start, None))
            return parts, False
        parts.append(_Part(name, filename, start, end))
        at = end + 2


def _tail(suffix: bytes, dash: bytes, base: int) -> tuple[int, list[_Part]]:
    """Where the file's data ends (absolute offset) and the parts after it, from the suffix
    read starting at absolute offset `base`: the first delimiter in the read ends the file.

    That holds only if the read starts inside the file's data. So the first delimiter must lie
    at least TAIL_MARGIN bytes into the read: a part we did not see would have to be larger
    than that, and no field we accept is (its start, a delimiter, would be in the read)."""
    delimiter = b"\r\n" + dash
    at = suffix.find(delimiter)
    if at < 0:
        raise MultipartError("the multipart body has no closing boundary")
    if at < TAIL_MARGIN:
        raise MultipartError(
            "the form fields after the file part are too large; send them before the file"
        )
    parts, closed = _parse(suffix, at + 2, dash)
    if not closed or any(p.end is None for p in parts):
        raise MultipartError("the multipart body has no closing boundary")
    return base + at, [_shift(p, base) for p in parts]


def _shift(part: _Part, by: int) -> _Part:
    end = None if part.end is None else part.end + by
    return _Part(part.name, part.filename, part.start + by, end)


def _envelope(
    parts: list[_Part], prefix: bytes, suffix: bytes = b"", suffix_at: int = 0
) -> Envelope:
    """Fields and file from parsed parts whose offsets are absolute in the body; a field's
    bytes are in the prefix or (when after the file) in the suffix read."""
    fields: dict[str, str] = {}
    file: _Part | None = None
    for part in parts:
        if part.end is None:
            raise MultipartError("the multipart body has no closing boundary")
        if part.name == FILE_FIELD:
            if file is not None:
                raise MultipartError("more than one 'file' part")
            file = part
            continue
        if part.filename is not None:
            raise MultipartError(f"unexpected file in form field {part.name!r}")
        if part.end - part.start > MAX_FIELD_BYTES:
            raise MultipartError(f"form field {part.name!r} is too large")
        if part.name in fields:
            raise MultipartError(f"form field {part.name!r} given twice")
        if part.start >= suffix_at and suffix:
            raw = suffix[part.start - suffix_at : part.end - suffix_at]
        else:
            raw = prefix[part.start : part.end]
        try:
            fields[part.name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"form field {part.name!r} is not UTF-8") from None
    if file is None:
        raise MultipartError("the form has no 'file' part")
    assert file.end is not None
    return Envelope(fields, file.filename or "", file.start, file.end - file.start)


def _disposition(head: bytes) -> tuple[str, str | None]:
    """(name, filename) from a part's headers; the Content-Disposition must be form-data."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError("a part's headers are not UTF-8") from None
    for line in text.split("\r\n"):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "content-disposition":
            kind, _, rest = value.partition(";")
            if kind.strip().lower() != "form-data":
                break
            params = _params(rest)
            name = params.get("name")
            if name is None:
                break
            return name, params.get("filename")
    raise MultipartError("a part has no 'Content-Disposition: form-data; name=...' header")


def _params(text: str) -> dict[str, str]:
    """`; a=b; c="d \\" e"` -> {a: b, c: 'd " e'}; names lower-cased. `filename*` (RFC 5987,
    UTF-8) wins over `filename`. Quoted values undo both backslash escapes and the HTML5
    percent escapes that browsers and httpx use for '"' and control characters."""
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t;":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().lower()
        i = eq + 1
        if i < n and text[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            i += 1
            value = _unpercent_html5("".join(chars))
        else:
            semi = text.find(";", i)
            semi = n if semi < 0 else semi
            value = text[i:semi].strip()
            i = semi
        if key.endswith("*"):
            decoded = _rfc5987(value)
            if decoded is not None:
                out[key[:-1]] = decoded
            continue
        out.setdefault(key, value)
    return out


def _unpercent_html5(value: str) -> str:
    if "%" not in value:
        return value
    for code in [0x22, *range(0x20)]:
        value = value.replace(f"%{code:02X}", chr(code))
    return value


def _rfc5987(value: str) -> str | None:
    charset, sep, rest = value.partition("'")
    _lang, sep2, encoded = rest.partition("'")
    if not (sep and sep2) or charset.lower() not in ("utf-8", "us-ascii"):
        return None
    try:
        return unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        return None
