"""A hand-rolled HTTP/1.1 response reader for tests that must see the wire itself: how a body
ended (terminal chunk, close or reset), what a keep-alive connection does next."""

from __future__ import annotations

import socket


class HttpReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            self._fill()
        out, self.buf = self.buf[:i], self.buf[i + len(sep) :]
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> tuple[int, dict[str, str], bytes, str]:
        """(status, headers, body, how the body ended: "complete" or the error's name)."""
        lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        body = b""
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int(self._until(b"\r\n").split(b";")[0], 16):
                    body += self._exactly(size)
                    self._until(b"\r\n")
                self._until(b"\r\n")
            else:
                body = self._exactly(int(headers.get("content-length", "0")))
        except (OSError, EOFError) as e:
            return status, headers, body, type(e).__name__
        return status, headers, body, "complete"

    def closed(self) -> bool:
        try:
            self._fill()
        except EOFError:
            return True
        return False
