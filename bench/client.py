"""A minimal HTTP/1.1 client on asyncio streams, precise enough to time single events.

Benchmarks need what general clients hide: when the first byte and each SSE event arrived,
whether a body ended cleanly, was cut, or ended with an error event. Requests are written by
hand (no library between the socket and the clock).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.parse
from dataclasses import dataclass, field

from bench.common import API_KEY


def split(url: str) -> tuple[str, int, str]:
    u = urllib.parse.urlsplit(url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return u.hostname or "127.0.0.1", u.port or 80, target


def request_bytes(
    host: str, port: int, path: str, method: str, body: bytes, auth: bool, close: bool
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    if body or method not in ("GET", "HEAD"):
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    if auth:
        lines.append(f"authorization: Bearer {API_KEY}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One whole response; a body cut short raises `asyncio.IncompleteReadError`."""
    status, headers = await read_head(reader)
    return status, headers, await read_body(reader, headers)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    return _parse_head(await reader.readuntil(b"\r\n\r\n"))


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return body


async def one_request(
    url: str, method: str = "GET", body: bytes = b"", auth: bool = False, timeout: float = 60.0
) -> tuple[int, dict[str, str], bytes, float]:
    """One request on a fresh connection: (status, headers, body, seconds)."""
    host, port, path = split(url)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request_bytes(host, port, path, method, body, auth, True))
        status, headers, data = await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()
    return status, headers, data, time.perf_counter() - t0


def request(
    url: str, method: str = "GET", body: bytes = b"", auth: bool = False, timeout: float = 60.0
) -> tuple[int, dict[str, str], bytes, float]:
    return asyncio.run(one_request(url, method, body, auth, timeout))


class Dechunker:
    """Incremental chunked-body decoder: feed raw bytes after the head, get body bytes;
    `done` once the terminating zero-size chunk arrived."""

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.raw = b""
        self.left = 0  # bytes left in the current chunk
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not self.chunked:
            return data
        self.raw += data
        out = []
        while self.raw and not self.done:
            if self.left == 0:
                nl = self.raw.find(b"\r\n")
                if nl < 0:
                    break
                line = self.raw[:nl].split(b";")[0].strip()
                self.raw = self.raw[nl + 2 :]
                if not line:
                    continue  # the CRLF that ends the previous chunk
                size = int(line, 16)
                if size == 0:
                    self.done = True
                    break
                self.left = size
            take = self.raw[: self.left]
            out.append(take)
            self.raw = self.raw[len(take) :]
            self.left -= len(take)
        return b"".join(out)


@dataclass
class Stream:
    """One SSE exchange as the client saw it.

    `ending` says how it ended: `done` (`data: [DONE]`), `error_event` (a data event whose JSON
    has an `error` key, as the gateway sends when the node fails mid-stream), `clean_eof` (the
    body ended properly without either: complete for servers that never send [DONE], silently
    truncated otherwise), `cut` (the connection closed or reset mid-body), `timeout`, or
    `no_head` (no response head at all)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # a non-SSE (error) answer's body
    events: int = 0
    ending: str = "no_head"
    error_type: str | None = None
    ttfb_ms: float | None = None
    first_event_ms: float | None = None
    gaps: list[float] = field(default_factory=list)  # ms between consecutive events
    transit: list[float] = field(default_factory=list)  # ms from the node's stamp to arrival


def _event_error(data: bytes) -> str | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return str(obj["error"].get("type") or "error")
    return None


async def stream(
    url: str, *, auth: bool, method: str = "GET", body: bytes = b"", timeout: float = 30.0
) -> Stream:
    """Read one SSE answer event by event, timing each arrival. Events that carry the node's
    `time.monotonic()` stamp as `"t"` (sim `sse` mode) give a transit time (same host clock)."""
    host, port, path = split(url)
    out = Stream()
    t_send = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return out
    writer.write(request_bytes(host, port, path, method, body, auth, True))
    t0_mono, t0_perf = time.monotonic(), time.perf_counter()
    head, buf = b"", b""
    decoder: Dechunker | None = None
    arrivals: list[float] = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            now = time.perf_counter()
            if not chunk:
                if out.error_type is not None:
                    out.ending = "error_event"
                elif decoder is not None:
                    unframed = not decoder.chunked and "content-length" not in out.headers
                    out.ending = "clean_eof" if unframed else "cut"
                break
            if out.ttfb_ms is None:
                out.ttfb_ms = (now - t_send) * 1000
            if decoder is None:
                head += chunk
                if b"\r\n\r\n" not in head:
                    continue
                head, _, chunk = head.partition(b"\r\n\r\n")
                out.status, out.headers = _parse_head(head)
                chunked = "chunked" in out.headers.get("transfer-encoding", "").lower()
                decoder = Dechunker(chunked)
                out.ending = "cut"
            buf += decoder.feed(chunk)
            if "event-stream" not in out.headers.get("content-type", ""):
                out.body = buf
                length = out.headers.get("content-length")
                if decoder.done or (length is not None and len(buf) >= int(length)):
                    out.ending = "clean_eof"
                    break
                continue
            while (j := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:j], buf[j + 2 :]
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    out.ending = "done"
                    break
                if (kind := _event_error(data)) is not None:
                    out.ending, out.error_type = "error_event", kind
                    continue
                out.events += 1
                arrivals.append(now)
                try:
                    stamp = json.loads(data)["t"]
                    out.transit.append((t0_mono + (now - t0_perf) - stamp) * 1000)
                except (ValueError, KeyError, TypeError):
                    pass
            if out.ending == "done":
                break
            if decoder.done:
                out.ending = "error_event" if out.error_type else "clean_eof"
                break
    except TimeoutError:
        out.ending = "timeout"
    except (ConnectionError, OSError):
        out.ending = "cut" if decoder is not None else "no_head"
    finally:
        writer.close()
    if arrivals:
        out.first_event_ms = (arrivals[0] - t_send) * 1000
    out.gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return out
