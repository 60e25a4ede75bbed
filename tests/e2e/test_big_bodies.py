"""Request bodies of megabytes in the real offline runtime: read whole before any node is
contacted, by BYOB reads in growing steps (body.next_read_size), under the upload deadline.

- a declared 3 MiB body and a chunked one reach the node byte-exact;
- a chunked body over MAX_BODY_BYTES is 413 and no node sees it;
- an upload that stops half-way is given up at UPLOAD_TIMEOUT_S (408) and no node sees it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from harness.gateway import Gateway, build_config
from tests.e2e.conftest import API_KEY, fleet_bindings

LIMIT = 4 * 1024 * 1024
UPLOAD_S = 2.0
PATH = "/api/heavy/code/v1/completions"


@pytest.fixture(scope="module")
def big(fleet) -> Iterator[Gateway]:
    bindings = fleet_bindings(fleet, MAX_BODY_BYTES=str(LIMIT), UPLOAD_TIMEOUT_S=str(UPLOAD_S))
    with Gateway(build_config(bindings=bindings)) as gw:
        yield gw


@pytest.fixture
def nodes(fleet, big) -> Iterator[object]:
    fleet.reset()
    big.reset()
    yield fleet
    fleet.reset()


def _completion(size: int) -> bytes:
    head, tail = b'{"model":"code","max_tokens":1,"prompt":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _post(gw: Gateway, content) -> httpx.Response:
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    return httpx.post(gw.url + PATH, content=content, headers=headers, timeout=30)


def _seen(fleet) -> list:
    return [q for n in (3, 4) for q in fleet.requests(n) if q.path == "/v1/completions"]


@pytest.mark.parametrize("size", [64 * 1024 + 1, 3 * 1024 * 1024 + 7, LIMIT])
def test_a_declared_big_body_reaches_the_node_byte_exact(big, nodes, size):
    body = _completion(size)
    r = _post(big, body)
    assert r.status_code == 200, r.text
    (got,) = _seen(nodes)
    assert got.complete and got.declared == size and got.body == body


def test_a_chunked_big_body_reaches_the_node_whole(big, nodes):
    body = _completion(3 * 1024 * 1024)

    def chunks():
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    r = _post(big, chunks())
    assert r.status_code == 200, r.text
    (got,) = _seen(nodes)
    assert got.complete and got.body == body


def test_a_chunked_body_over_the_limit_is_413_and_reaches_no_node(big, nodes):
    def chunks():
        for _ in range(LIMIT // 100_000 + 2):
            yield b"x" * 100_000

    r = _post(big, chunks())
    assert r.status_code == 413
    assert json.loads(r.text)["error"]["type"] == "payload_too_large"
    assert not _seen(nodes)


def test_a_big_upload_that_stops_is_given_up_at_the_deadline(big, nodes):
    host, port = big.url.split("//")[1].rsplit(":", 1)
    body = _completion(3 * 1024 * 1024)
    head = (
        f"POST {PATH} HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {API_KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=UPLOAD_S + 10) as s:
        t0 = time.monotonic()
        s.sendall(head + body[: len(body) // 2])  # half, then nothing
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert UPLOAD_S - 0.1 <= took <= UPLOAD_S + 2, took
    assert not _seen(nodes)
