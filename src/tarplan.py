"""Some files of a tar stored in R2, served as a tar of their own without copying anything.

Why: a training checkpoint is uploaded as one tar holding the adapter as vLLM loads it
(adapter_config.json, adapter_model.safetensors) and the trainer's state.json; a node's LoRA
resolver must get the adapter files only (it refuses any other member). A tar is a sequence of
members (a 512-byte header, then the data padded to 512) ended by two zero blocks, so the byte
ranges of the wanted members followed by the archive's own end blocks are a valid tar of just
those members: a stream plan of ranges of the same object, no new object, no body in Python.

`member_ranges` walks the headers with small ranged reads (one per header, plus a pax
extended header's records), up to MAX_HEADERS. Understood: POSIX ustar and pax (`x` headers
whose `path`/`size` records override the next member's; they travel with that member), GNU
long names (`L`). Refused as `TarError`: a global pax header (`g`, it would apply to members
served without it), a wanted name that is not a regular file or appears twice, a missing
wanted name, a checksum mismatch, sizes past the object, no end blocks. Pure but for `read`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

BLOCK = 512
ZERO = bytes(BLOCK)
MAX_HEADERS = 32  # an adapter checkpoint has 3 members (6 headers with pax ones)
MAX_EXTENDED = 64 * 1024  # a pax or long-name header's data (a few records)
_REGULAR = ("0", "\0", "7")  # regular file; old tars' NUL; contiguous file (read as regular)

# (offset, length) -> up to `length` bytes of the object from `offset`.
Read = Callable[[int, int], Awaitable[bytes | None]]


class TarError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    size: int
    kind: str  # the typeflag: "0" regular, "x" pax, "L" GNU long name, ...


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise TarError(f"{what} in base-256 is not supported")
    text = field.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"{what} is not an octal number: {text[:16]!r}") from None


def parse_header(block: bytes) -> Header:
    """One 512-byte ustar header (POSIX `ustar\\0` or GNU `ustar  ` magic), checksum checked."""
    if len(block) != BLOCK:
        raise TarError("a header is cut short")
    magic = block[257:265]
    if magic not in (b"ustar\x0000", b"ustar  \x00"):
        raise TarError("not a ustar header")
    stored = _number(block[148:156], "the checksum")
    summed = block[:148] + b" " * 8 + block[156:]
    signed = sum(b - 256 if b > 127 else b for b in summed)
    if stored not in (sum(summed), signed):
        raise TarError("a header's checksum does not match")
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if magic.startswith(b"ustar\x00") and prefix:  # POSIX only: GNU keeps other fields there
        name = prefix + b"/" + name
    kind = chr(block[156])
    return Header(name.decode("utf-8", "replace"), _number(block[124:136], "a size"), kind)


def parse_pax(data: bytes) -> dict[str, str]:
    """A pax extended header's records: `<length> <key>=<value>\\n`, length counting all."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        if space < 0:
            raise TarError("a pax record has no length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError("a pax record's length is not a number") from None
        record = data[space + 1 : pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n"):
            raise TarError("a pax record is malformed")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise TarError("a pax record has no '='")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


async def _read(read: Read, offset: int, length: int) -> bytes:
    got = await read(offset, length)
    if got is None or len(got) != length:
        raise TarError("the archive ends inside a member")
    return got


async def member_ranges(read: Read, size: int, wanted: Collection[str]) -> list[tuple[int, int]]:
    """(offset, length) ranges of the archive (`size` bytes, read through `read`) that make a
    tar of exactly the `wanted` members, in archive order, ended by the archive's own two
    zero blocks. Raises TarError when the archive does not hold each wanted name once as a
    regular file, or is not a tar this module understands."""
    found: dict[str, tuple[int, int]] = {}
    offset, start = 0, None
    pax: dict[str, str] = {}
    long_name: str | None = None
    for _ in range(MAX_HEADERS):
        if offset + 2 * BLOCK > size:
            raise TarError("the archive has no end-of-archive blocks")
        block = await _read(read, offset, BLOCK)
        if block == ZERO:
            if start is not None:
                raise TarError("an extended header is not followed by a member")
            if await _read(read, offset + BLOCK, BLOCK) != ZERO:
                raise TarError("a lone zero block inside the archive")
            missing = sorted(set(wanted) - set(found))
            if missing:
                raise TarError(f"the archive holds no {', '.join(missing)}")
            return [*found.values(), (offset, 2 * BLOCK)]
        h = parse_header(block)
        here = offset if start is None else start
        data_at = offset + BLOCK
        if h.kind in ("x", "L"):
            if h.size > MAX_EXTENDED:
                raise TarError("an extended header is too large")
            data = await _read(read, data_at, h.size)
            if h.kind == "x":
                pax.update(parse_pax(data))
            else:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            start, offset = here, data_at + padded(h.size)
            continue
        if h.kind == "g":
            raise TarError("global pax headers are not supported")
        name = pax.get("path", long_name if long_name is not None else h.name)
        try:
            length = int(pax["size"]) if "size" in pax else h.size
        except ValueError:
            raise TarError("a pax size is not a number") from None
        end = data_at + padded(length)
        if length < 0 or end > size:
            raise TarError(f"member {name[:64]} runs past the archive")
        if name in wanted:
            if h.kind not in _REGULAR:
                raise TarError(f"{name} is not a regular file")
            if name in found:
                raise TarError(f"{name} appears twice")
            found[name] = (here, end - here)
        offset, start, pax, long_name = end, None, {}, None
    raise TarError(f"the archive has more than {MAX_HEADERS} headers")
