"""A small, fast HTTP/1.1 server on asyncio Protocols.

Built for the simulated GPU fleet: keep-alive, pipelining, Content-Length and chunked request
bodies, fixed-length or chunked (streamed) responses, ``Expect: 100-continue``, TCP_NODELAY on
every accepted socket, and the ability to close and re-bind the same listening port at run time.
http.server is thread-per-connection and far too slow to stand in for an upstream in benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus

__all__ = ["HTTPConnection", "HTTPServer", "Handler", "Request", "Response"]

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
# Pause reading a pipelining client once this much is queued behind a busy handler.
MAX_PENDING_BYTES = 1024 * 1024

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        reason = _REASONS.get(status, "Unknown")
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
    return line


class HTTPError(Exception):
    """A protocol error answered with ``status`` and a closed connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Request:
    """One request; header names are lower-cased, values kept verbatim.

    Created when its head has arrived (``arrived``); ``body`` is filled in and ``complete`` set
    once the whole body is in. A request whose connection dies mid-body never becomes complete:
    ``received`` then says how much of the ``declared`` length (None: chunked) arrived.
    """

    __slots__ = (
        "arrived",
        "body",
        "complete",
        "declared",
        "headers",
        "keep_alive",
        "meta",
        "method",
        "path",
        "query",
        "received",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
        declared: int | None = 0,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.arrived = time.monotonic()
        self.declared = declared
        self.received = len(body)
        self.complete = False
        self.meta: object = None  # for the server's user (the simulated node's record)

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


class Response:
    """Answer to one request: ``send`` once, or ``start`` then ``write``... then ``end``."""

    __slots__ = ("_chunked", "_conn", "_head_only", "_http10", "close", "finished", "started")

    def __init__(self, conn: HTTPConnection, request: Request, http10: bool) -> None:
        self._conn = conn
        self._head_only = request.method == "HEAD"
        self._http10 = http10
        self._chunked = False
        self.close = not request.keep_alive
        self.started = False
        self.finished = False

    @property
    def connection(self) -> HTTPConnection:
        return self._conn

    def _head(self, status: int, headers: Iterable[tuple[str, str]], framing: str) -> bytes:
        parts = [_status_line(status)]
        for name, value in headers:
            if name.lower() == "connection" and value.lower() == "close":
                self.close = True
                continue
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        parts.append(framing.encode("latin-1"))
        parts.append(b"connection: close\r\n\r\n" if self.close else b"\r\n")
        return b"".join(parts)

    def send(self, status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
        """Send a complete response with Content-Length."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        no_body = status < 200 or status in (204, 304)
        framing = "" if no_body else f"content-length: {len(body)}\r\n"
        head = self._head(status, headers, framing)
        self._conn.write(head if self._head_only or no_body else head + body)
        self._conn.response_done(self)

    def start(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Send the head of a streamed response (chunked; close-delimited for HTTP/1.0)."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        if self._http10:
            self.close = True  # no chunked encoding in 1.0: the body ends when we close
            framing = ""
        else:
            self._chunked = True
            framing = "transfer-encoding: chunked\r\n"
        self._conn.write(self._head(status, headers, framing))

    def start_fixed(self, status: int, headers: Iterable[tuple[str, str]], length: int) -> None:
        """Send the head of a response whose ``length`` bytes follow through ``write``."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self._conn.write(self._head(status, headers, f"content-length: {length}\r\n"))

    async def write(self, data: bytes) -> None:
        """Write one chunk and flush it (each call is its own chunk on the wire)."""
        if not self.started or self.finished:
            raise RuntimeError("write() outside of start()/end()")
        if data and not self._head_only:
            if self._chunked:
                self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                self._conn.write(data)
        await self._conn.drain()

    async def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._chunked and not self._head_only:
            self._conn.write(b"0\r\n\r\n")
        self._conn.response_done(self)
        await self._conn.drain()


Handler = Callable[[Request, Response], Awaitable[None]]

# Phases of the per-connection parser.
_HEAD, _BODY_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER = range(6)


class HTTPConnection(asyncio.Protocol):
    """Server side of one TCP connection; requests are handled one at a time, in order."""

    def __init__(self, server: HTTPServer) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._phase = _HEAD
        self._busy = False  # a handler is running for this connection
        self._in_process = False
        self._closed = False
        self._closing = False
        self._paused_reading = False
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Request under construction.
        self._method = ""
        self._target = ""
        self._http10 = False
        self._headers: list[tuple[str, str]] = []
        self._keep_alive = True
        self._remaining = 0
        self._body = bytearray()
        self._current: Request | None = None  # head parsed, body still arriving
        self._seen: deque[Request] = deque(maxlen=64)  # told to on_close with the close time

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without it, small writes after a small write stall ~40 ms on delayed ACKs.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        current = self._current
        if current is not None:  # died mid-body: how much of it made it?
            current.received = (
                min(len(self._buf), self._remaining)
                if self._phase == _BODY_LENGTH
                else len(self._body)
            )
        if self._server.on_close is not None:
            self._server.on_close(list(self._seen))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # e.g. a hung or streaming handler whose client went away
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiter = None

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        waiter = self._drain_waiter
        self._drain_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._buf += data
        if self._busy:
            if len(self._buf) > MAX_PENDING_BYTES and not self._paused_reading:
                self._paused_reading = True
                self._transport.pause_reading()  # type: ignore[union-attr]
            return
        self._process()

    # -- used by Response -------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        if not self._closed:
            self._transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection lost")
        if self._paused_writing:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    def response_done(self, response: Response) -> None:
        if response.close:
            self.close()

    def close(self) -> None:
        """Close after flushing what was written."""
        self._closing = True
        if self._transport is not None and not self._closed:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once (RST-like); a running handler is cancelled."""
        self._closing = True
        if self._transport is not None and not self._closed:
            self._transport.abort()

    def reset(self) -> None:
        """Send a TCP RST (SO_LINGER 0, then close), as a crashed or killed server does: the
        peer sees ECONNRESET, never a clean end of stream."""
        sock = None if self._transport is None else self._transport.get_extra_info("socket")
        if sock is not None and not self._closed:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    @property
    def write_buffer_size(self) -> int:
        if self._transport is None or self._closed:
            return 0
        return self._transport.get_write_buffer_size()

    # -- parsing ------------------------------------------------------------------------------
    def _process(self) -> None:
        if self._in_process:
            return  # the outer loop picks up the next pipelined request
        self._in_process = True
        try:
            while not self._busy and not self._closing:
                try:
                    request = self._parse()
                except HTTPError as e:
                    self._fail(e.status, str(e))
                    return
                if request is None:
                    break
                self._dispatch(request)
            if self._paused_reading and not self._busy and not self._closing:
                self._paused_reading = False
                self._transport.resume_reading()  # type: ignore[union-attr]
        finally:
            self._in_process = False

    def _parse(self) -> Request | None:
        buf = self._buf
        while True:
            phase = self._phase
            if phase == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise HTTPError(431, "request header too large")
                    if buf[:2] == b"\r\n":  # tolerate stray CRLF between requests (RFC 9112)
                        del buf[:2]
                        continue
                    return None
                if end > MAX_HEADER_BYTES:
                    raise HTTPError(431, "request header too large")
                head = bytes(buf[:end])
                del buf[: end + 4]
                if not head:
                    continue
                self._parse_head(head)
            elif phase == _BODY_LENGTH:
                if len(buf) < self._remaining:
                    return None
                n = self._remaining
                body = bytes(buf[:n])
                del buf[:n]
                return self._finish_request(body)
            elif phase == _CHUNK_SIZE:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > 4096:
                        raise HTTPError(400, "chunk size line too long")
                    return None
                size_text = bytes(buf[:eol]).split(b";", 1)[0].strip()
                del buf[: eol + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HTTPError(400, "bad chunk size") from None
                if size < 0:
                    raise HTTPError(400, "bad chunk size")
                if size == 0:
                    self._phase = _TRAILER
                else:
                    if len(self._body) + size > MAX_BODY_BYTES:
                        raise HTTPError(413, "request body too large")
                    self._remaining = size
                    self._phase = _CHUNK_DATA
            elif phase == _CHUNK_DATA:
                n = min(len(buf), self._remaining)
                if n == 0:
                    return None
                self._body += buf[:n]
                del buf[:n]
                self._remaining -= n
                if self._remaining:
                    return None
                self._phase = _CHUNK_CRLF
            elif phase == _CHUNK_CRLF:
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise HTTPError(400, "missing CRLF after chunk")
                del buf[:2]
                self._phase = _CHUNK_SIZE
            else:  # _TRAILER: skip trailer fields up to the empty line
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise HTTPError(431, "trailer too large")
                    return None
                del buf[: eol + 2]
                if eol == 0:
                    body = bytes(self._body)
                    self._body = bytearray()
                    return self._finish_request(body)

    def _parse_head(self, head: bytes) -> None:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
            raise HTTPError(400, "bad request head") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise HTTPError(400, "bad request line")
        method, target, version = parts
        if version == "HTTP/1.1":
            http10 = False
        elif version == "HTTP/1.0":
            http10 = True
        else:
            raise HTTPError(505, "HTTP version not supported")
        headers: list[tuple[str, str]] = []
        length: str | None = None
        chunked = False
        conn_tokens = ""
        expect = False
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t":
                raise HTTPError(400, "bad header line")
            name = name.lower()
            value = value.strip(" \t")
            headers.append((name, value))
            if name == "content-length":
                if length is not None and length != value:
                    raise HTTPError(400, "conflicting content-length")
                length = value
            elif name == "transfer-encoding":
                codings = [c.strip().lower() for c in value.split(",")]
                if codings[-1] != "chunked":
                    raise HTTPError(501, "unsupported transfer-encoding")
                chunked = True
            elif name == "connection":
                conn_tokens += "," + value.lower()
            elif name == "expect" and value.lower() == "100-continue":
                expect = True
        tokens = {t.strip() for t in conn_tokens.split(",")}
        keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens
        self._method = method
        self._target = target
        self._http10 = http10
        self._headers = headers
        self._keep_alive = keep_alive
        if chunked:
            self._phase = _CHUNK_SIZE
            self._body = bytearray()
            if length is not None:
                self._keep_alive = False  # ambiguous framing: never reuse (RFC 9112 6.3)
        elif length is not None:
            if not length.isdigit():
                raise HTTPError(400, "bad content-length")
            self._remaining = int(length)
            if self._remaining > MAX_BODY_BYTES:
                raise HTTPError(413, "request body too large")
            self._phase = _BODY_LENGTH
        else:
            self._remaining = 0
            self._phase = _BODY_LENGTH
        declared = None if chunked else self._remaining
        request = Request(method, target, headers, b"", self._keep_alive, declared)
        self._current = request
        self._seen.append(request)
        if self._server.on_head is not None:
            self._server.on_head(request)
        body_pending = chunked or self._remaining > len(self._buf)
        if expect and body_pending and not http10:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _finish_request(self, body: bytes) -> Request:
        self._phase = _HEAD
        request = self._current
        assert request is not None
        self._current = None
        request.body = body
        request.received = len(body)
        request.complete = True
        return request

    def _fail(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.write(
            _status_line(status)
            + b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
            + b"connection: close\r\n\r\n"
            + body
        )
        self.close()

    # -- running handlers ---------------------------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        self._busy = True
        response = Response(self, request, self._http10)
        # Eager start: handlers that finish without awaiting cost no loop iteration.
        self._task = asyncio.eager_task_factory(self._loop, self._run(request, response))

    async def _run(self, request: Request, response: Response) -> None:
        try:
            await self._server.handler(request, response)
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception as exc:
            if not response.started and not self._closed:
                response.close = True
                response.send(500, [("content-type", "text/plain")], b"internal error")
            else:
                self.abort()  # half-sent response: the client must see a broken stream
            self._loop.call_exception_handler({"message": "sim handler failed", "exception": exc})
        else:
            if not response.finished:
                if not response.started:
                    response.send(500, [("content-type", "text/plain")], b"no response")
                else:
                    await response.end()
        finally:
            self._task = None
            self._busy = False
        if not self._closing and not self._closed:
            if self._in_process:
                return
            self._process()


class HTTPServer:
    """Listening socket + its connections; ``start``/``close_listener`` may alternate."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_head: Callable[[Request], None] | None = None,
        on_close: Callable[[list[Request]], None] | None = None,
    ) -> None:
        """``on_head(request)`` runs as soon as a request's head is parsed (before its body);
        ``on_close(requests)`` when a connection closes, with the requests it carried (the
        last 64)."""
        self.handler = handler
        self.on_head = on_head
        self.on_close = on_close
        self.host = host
        self.port = port
        self.connections: set[HTTPConnection] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Bind and listen; the first bind fixes the port so later re-binds reuse it."""
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        # Bind one socket ourselves: with port 0 and a name like "localhost", create_server
        # would bind each address family to a different random port.
        family, type_, proto, _, addr = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._server = await self._loop.create_server(lambda: HTTPConnection(self), sock=sock)

    def close_listener(self) -> None:
        """Stop accepting: new connections are refused (the socket is closed at once)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def abort_connections(self, only: Callable[[HTTPConnection], bool] | None = None) -> None:
        for conn in list(self.connections):
            if only is None or only(conn):
                conn.abort()

    async def stop(self) -> None:
        self.close_listener()
        self.abort_connections()
        await asyncio.sleep(0)  # let connection_lost run and cancel handlers
