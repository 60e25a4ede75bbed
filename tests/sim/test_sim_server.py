"""Wire-level behaviour of sim.server, driven through raw sockets against a real node.

The node answers like vLLM (unknown paths are 404), so what the parser made of a request is
read from the node's own record of it (``fleet.requests``)."""

from __future__ import annotations

import json
import socket
import time

import httpx

from sim.fleet import Fleet
from sim.node import VLLM_VERSION
from tests.wire import HttpReader


def _connect(fleet: Fleet, n: int = 1) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", fleet.port(n)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Reader(HttpReader):
    """The shared raw reader, answering (status, headers, body) for a body that must be whole."""

    def response(self) -> tuple[int, dict[str, str], bytes]:  # type: ignore[override]
        status, headers, body, ended = super().response()
        assert ended == "complete", ended
        return status, headers, body


def test_keep_alive_and_pipelining(fleet: Fleet) -> None:
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert reader.response()[0] == 200
        # Three pipelined requests in one segment come back in order on the same connection.
        sock.sendall(
            b"GET /version HTTP/1.1\r\nhost: x\r\n\r\n"
            b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nxyz"
            b"GET /load?q=1 HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        answers = []
        for _ in range(3):
            status, headers, body = reader.response()
            assert headers["x-sim-node"] == "1"
            answers.append((status, json.loads(body)))
        assert answers == [
            (200, {"version": VLLM_VERSION}),
            (404, {"detail": "Not Found"}),
            (200, {"server_load": 0}),
        ]
    recs = fleet.requests(1)
    assert [(r.path, r.query, r.body) for r in recs] == [
        ("/health", "", b""),
        ("/version", "", b""),
        ("/b", "", b"xyz"),
        ("/load", "q=1", b""),
    ]


def test_request_split_across_many_segments(fleet: Fleet) -> None:
    raw = b"PUT /split?x=y HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n0123456789"
    with _connect(fleet) as sock:
        for i in range(len(raw)):
            sock.sendall(raw[i : i + 1])
            if i % 16 == 0:
                time.sleep(0.001)
        status, _, body = _Reader(sock).response()
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})
    rec = fleet.requests(1)[-1]
    assert (rec.method, rec.path, rec.query, rec.body) == ("PUT", "/split", "x=y", b"0123456789")
    assert (rec.declared, rec.received, rec.complete) == (10, 10, True)


def test_chunked_upload_with_extensions_and_trailers(fleet: Fleet) -> None:
    with _connect(fleet) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n"
            b"1\r\n \r\n"
        )
        time.sleep(0.02)  # the rest arrives later: the parser must resume mid-body
        sock.sendall(b"5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n")
        status, _, _ = _Reader(sock).response()
    assert status == 404
    rec = fleet.requests(1)[-1]
    assert (rec.body, rec.declared, rec.complete) == (b"hello world", None, True)


def test_connection_close_is_honoured(fleet: Fleet) -> None:
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        status, headers, _ = reader.response()
        assert status == 200
        assert headers["connection"] == "close"
        assert reader.closed()


def test_http10_closes_unless_keep_alive(fleet: Fleet) -> None:
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert reader.response()[0] == 200
        assert reader.closed()
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(b"GET /health HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        assert reader.response()[0] == 200
        sock.sendall(b"GET /health HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        assert reader.response()[0] == 200


def test_oversized_header_gets_431(fleet: Fleet) -> None:
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
        status, headers, _ = reader.response()
        assert status == 431
        assert headers["connection"] == "close"


def test_malformed_requests_get_400(fleet: Fleet) -> None:
    for raw in (
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nno-colon-here\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ):
        with _connect(fleet) as sock:
            sock.sendall(raw)
            assert _Reader(sock).response()[0] == 400, raw


def test_expect_100_continue(fleet: Fleet) -> None:
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(
            b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
        assert reader.response()[0] == 100
        sock.sendall(b"data")
        status, _, _ = reader.response()
    assert status == 404
    assert fleet.requests(1)[-1].body == b"data"


def test_head_has_no_body(fleet: Fleet) -> None:
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        head = reader._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 0" not in head
        # The next response follows immediately: no body bytes were sent for the HEAD.
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert reader.response()[0] == 200


def test_accepted_sockets_have_tcp_nodelay(fleet: Fleet) -> None:
    with _connect(fleet, 2) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        _Reader(sock).response()
        conns = list(fleet.node(2)._server.connections)
        assert conns
        for conn in conns:
            server_sock = conn._transport.get_extra_info("socket")
            assert server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_large_binary_body_round_trip(fleet: Fleet, client: httpx.Client) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, not valid UTF-8
    r = client.post(fleet.url(3) + "/blob", content=body)
    assert r.status_code == 404
    rec = fleet.requests(3)[-1]
    assert (rec.body, rec.declared, rec.received) == (body, len(body), len(body))


def test_pipelining_behind_async_handlers(fleet: Fleet) -> None:
    # The next request is dispatched from inside the finishing handler's task: order must hold.
    fleet.set(1, "sse", events=3, interval=0.01)
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(b"GET /s1 HTTP/1.1\r\nhost: x\r\n\r\nGET /s2 HTTP/1.1\r\nhost: x\r\n\r\n")
        bodies = [reader.response()[2] for _ in range(2)]
    assert all(b.count(b"data: ") == 4 and b.endswith(b"data: [DONE]\n\n") for b in bodies)
    fleet.set(1, "slow_headers", delay=0.05)
    with _connect(fleet) as sock:
        reader = _Reader(sock)
        sock.sendall(
            b"GET /version HTTP/1.1\r\nhost: x\r\n\r\nGET /load HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        bodies = [json.loads(reader.response()[2]) for _ in range(2)]
    assert bodies == [{"version": VLLM_VERSION}, {"server_load": 0}]
