"""A minimal HTTP/1.1 relay for the node guard: one ASGI request to a loopback upstream.

The guard runs inside vLLM's API server and sends `/v1/images/*` to the image engine's port
with this. Standard library only (asyncio streams), like the guard, so vLLM's environment needs
nothing extra. Bodies stream both ways in pieces; nothing is parsed or buffered whole. One
connection per request (`Connection: close`): image requests are few and long, so keep-alive
would save nothing worth its bookkeeping.

If the client goes away while the upstream is still working, the upstream connection is closed,
so the image engine sees the disconnect too and gives the request's place in its queue up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PIECE = 64 * 1024
MAX_HEAD = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
# Hop-by-hop headers (RFC 9110 section 7.6.1) and the ones this relay sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
        b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"host",
    }
)  # fmt: skip


class UpstreamError(Exception):
    """The upstream could not be reached or broke the protocol before its answer began."""


def request_head(scope: Scope, host: str, port: int) -> tuple[bytes, bool]:
    """The upstream request head, and whether the body must be sent chunked (the client sent
    no Content-Length)."""
    path = scope.get("raw_path") or scope["path"].encode("latin-1")
    query = scope.get("query_string") or b""
    target = path + (b"?" + query if query else b"")
    headers = [(k.lower(), v) for k, v in scope.get("headers") or ()]
    has_length = any(k == b"content-length" for k, _ in headers)
    lines = [scope["method"].encode("ascii") + b" " + target + b" HTTP/1.1"]
    lines.append(b"host: " + f"{host}:{port}".encode())
    lines += [k + b": " + v for k, v in headers if k not in HOP_BY_HOP]
    chunked = not has_length and scope["method"] not in ("GET", "HEAD")
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n", chunked


def parse_response_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(status, headers with lower-cased names) from a response head ending in CRLF CRLF."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError("malformed status line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise UpstreamError("malformed header line")
        headers.append((name.lower(), value.strip()))
    return int(parts[1]), headers


def framing(headers: list[tuple[bytes, bytes]]) -> tuple[str, int | None]:
    """How the response body is delimited: ('length', n), ('chunked', None) or ('close', None)."""
    for k, v in headers:
        if k == b"transfer-encoding" and b"chunked" in v.lower():
            return "chunked", None
    for k, v in headers:
        if k == b"content-length":
            if not v.isdigit():
                raise UpstreamError("bad content-length")
            return "length", int(v)
    return "close", None


async def _send_body(writer: asyncio.StreamWriter, receive: Receive, chunked: bool) -> bool:
    """Copy the client's body upstream; False if the client disconnected meanwhile."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        body = message.get("body") or b""
        if body:
            writer.write(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
            await writer.drain()
        if not message.get("more_body"):
            break
    if chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    return True


async def _body_pieces(reader: asyncio.StreamReader, kind: str, length: int | None):
    if kind == "length":
        left = length or 0
        while left:
            piece = await reader.read(min(PIECE, left))
            if not piece:
                raise UpstreamError("upstream closed before the whole body")
            left -= len(piece)
            yield piece
    elif kind == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # (no trailers from our upstreams)
                return
            left = size
            while left:
                piece = await reader.read(min(PIECE, left))
                if not piece:
                    raise UpstreamError("upstream closed inside a chunk")
                left -= len(piece)
                yield piece
            await reader.readexactly(2)
    else:
        while piece := await reader.read(PIECE):
            yield piece


async def relay(
    scope: Scope, receive: Receive, send: Send, host: str, port: int, *, what: str
) -> None:
    """Answer one HTTP request by asking host:port. A refused connection or a broken answer
    head becomes a 502/503 JSON error naming `what`, never the address."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=MAX_HEAD), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError):
        await send_error(send, 503, f"the {what} is not running on this node", "unavailable")
        return
    try:
        head, chunked = request_head(scope, host, port)
        writer.write(head)
        if not await _send_body(writer, receive, chunked):
            return
        # Wait for the answer, but let go of the upstream if the client leaves first.
        head_task = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        await asyncio.wait({head_task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not head_task.done():
            head_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await head_task
            return  # finally closes the upstream connection: the engine sees it
        gone.cancel()
        try:
            status, headers = parse_response_head(head_task.result())
            kind, length = framing(headers)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, UpstreamError):
            await send_error(send, 502, f"the {what} gave a malformed answer", "bad_gateway")
            return
        out = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        if kind != "length":
            out = [(k, v) for k, v in out if k != b"content-length"]
        await send({"type": "http.response.start", "status": status, "headers": out})
        async for piece in _body_pieces(reader, kind, length):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_error(send: Send, status: int, message: str, kind: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def fetch_text(
    host: str, port: int, path: str, authorization: bytes | None, timeout: float
) -> str | None:
    """GET a small text answer (the image engine's /metrics); None on any failure or non-200."""

    async def go() -> str | None:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
        try:
            lines = [f"GET {path} HTTP/1.1".encode(), f"host: {host}:{port}".encode()]
            if authorization:
                lines.append(b"authorization: " + authorization)
            lines.append(b"connection: close")
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
            await writer.drain()
            status, headers = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
            kind, length = framing(headers)
            body = b"".join([p async for p in _body_pieces(reader, kind, length)])
            return body.decode("utf-8", "replace") if status == 200 else None
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except (OSError, TimeoutError, UpstreamError, asyncio.IncompleteReadError, ValueError):
        return None
    except asyncio.LimitOverrunError:
        return None
