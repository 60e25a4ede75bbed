"""The node guard inside a real FastAPI app mounted the way vLLM mounts its API server."""

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from heady_node import guard
from tests.node.vllm_shape import build_app

TOKEN = "node-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def guarded(monkeypatch) -> Iterator[tuple[str, threading.Event]]:
    monkeypatch.setenv(guard.TOKEN_ENV, TOKEN)
    gate = threading.Event()
    app = build_app([MODEL, "code"], TOKEN, [guard.IMPORT_PATH], gate=gate)
    with serve(app) as base:
        yield base, gate
    gate.set()


def test_decide_is_an_allow_list() -> None:
    digest = guard.token_digest(TOKEN)
    ok = f"Bearer {TOKEN}"
    assert guard.decide("/health", None, digest) is None
    assert guard.decide("/v1/models", ok, digest) is None
    assert guard.decide("/v1/chat/completions", f"bearer {TOKEN}", digest) is None
    assert guard.decide("/metrics", ok, digest) is None
    for path in ("/v1/models", "/metrics"):
        assert guard.decide(path, None, digest) == guard.NO_TOKEN
        assert guard.decide(path, "Bearer wrong", digest) == guard.NO_TOKEN
        assert guard.decide(path, f"Basic {TOKEN}", digest) == guard.NO_TOKEN
        assert guard.decide(path, TOKEN, digest) == guard.NO_TOKEN
    hidden = (
        "/invocations", "/pause", "/tokenize", "/version", "/load", "/v1", "/v2/models",
        "/metricsx", "/metrics/extra", "/healthz", "/", "/docs", "/openapi.json",
        "/v1/../pause", "/v1/./models", "/sleep", "/collective_rpc",
    )  # fmt: skip
    for path in hidden:
        assert guard.decide(path, ok, digest) == guard.NOT_EXPOSED, path


def test_guard_refuses_to_start_without_a_token(monkeypatch) -> None:
    monkeypatch.delenv(guard.TOKEN_ENV, raising=False)
    with pytest.raises(RuntimeError, match=guard.TOKEN_ENV):
        guard.NodeGuard(build_app(["m"], None, []))
    monkeypatch.setenv(guard.TOKEN_ENV, "   ")
    with pytest.raises(RuntimeError, match=guard.TOKEN_ENV):
        guard.NodeGuard(build_app(["m"], None, []))


def test_only_the_api_is_reachable_and_only_with_the_token(guarded) -> None:
    base, _ = guarded
    with httpx.Client(base_url=base, timeout=10) as c:
        assert c.get("/health").status_code == 200  # public: tunnels and the gateway probe it
        assert c.get("/v1/models", headers=AUTH).json()["data"][1]["id"] == "code"
        assert "vllm:num_requests_running" in c.get("/metrics", headers=AUTH).text
        body = {"model": "code", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 200

        for path in ("/v1/models", "/metrics"):
            for headers in ({}, {"Authorization": "Bearer nope"}):
                r = c.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "unauthorized"
                assert r.headers[guard.MARK_HEADER] == "1"
                assert r.headers["www-authenticate"] == "Bearer"

        # Reachable on the bare app, hidden by the guard even with the right token.
        for method, path in (
            ("POST", "/invocations"), ("POST", "/pause"), ("POST", "/tokenize"),
            ("GET", "/version"), ("GET", "/load"), ("GET", "/docs"), ("GET", "/metricsx"),
        ):  # fmt: skip
            r = c.request(method, path, headers=AUTH)
            assert r.status_code == 404, (method, path)
            assert r.json() == {"error": {"message": "not found", "type": "not_found", "code": 404}}
            assert r.headers[guard.MARK_HEADER] == "1"


def test_the_same_app_without_the_guard_is_open() -> None:
    # The baseline the guard fixes: vLLM's own key check leaves these open.
    with serve(build_app([MODEL], TOKEN, [])) as base, httpx.Client(base_url=base) as c:
        assert c.post("/invocations").status_code == 200
        assert c.post("/pause").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 401  # only /v1 was ever protected


def _first_event_delay(base: str, gate: threading.Event) -> tuple[float, bool, str]:
    """Seconds until the first SSE event arrived, whether the gate was still closed then (the
    app had not yet produced the rest), and the whole body."""
    body = {"model": MODEL, "messages": [], "stream": True}
    start = time.monotonic()
    with (
        httpx.Client(base_url=base, timeout=20) as c,
        c.stream("POST", "/v1/chat/completions", headers=AUTH, json=body) as r,
    ):
        assert r.status_code == 200
        chunks = r.iter_raw()
        first = next(chunks)
        delay, still_closed = time.monotonic() - start, not gate.is_set()
        gate.set()
        text = first.decode() + b"".join(chunks).decode()
    return delay, still_closed, text


def test_streams_pass_through_unbuffered(guarded) -> None:
    base, gate = guarded
    delay, still_closed, text = _first_event_delay(base, gate)
    assert still_closed and delay < 5, f"first event only after {delay:.1f}s"
    assert text.index("first") < text.index("second") < text.index("[DONE]")


class _Buffering:
    """What the guard must not be: a middleware that collects the body before sending it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[dict] = []

        async def hold(message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        for message in held:
            await send(message)


def test_the_stream_check_catches_a_buffering_middleware(monkeypatch) -> None:
    monkeypatch.setenv(guard.TOKEN_ENV, TOKEN)
    gate = threading.Event()
    app = build_app([MODEL], TOKEN, [guard.IMPORT_PATH], gate=gate)
    app.add_middleware(_Buffering)
    threading.Timer(1.5, gate.set).start()  # the buffered stream can only finish after this
    with serve(app) as base:
        delay, still_closed, _ = _first_event_delay(base, gate)
    assert delay >= 1.4 and not still_closed


def test_websocket_to_a_hidden_path_is_closed_before_accept() -> None:
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        raise AssertionError("the app must not see it")

    async def send(message) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    g = guard.NodeGuard(app, token=TOKEN)
    scope = {
        "type": "websocket",
        "path": "/pause",
        "headers": [(b"authorization", AUTH["Authorization"].encode())],
    }
    asyncio.run(g(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
