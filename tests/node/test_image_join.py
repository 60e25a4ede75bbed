"""One tunnel, one guard, two engines: the node guard inside a vLLM-shaped app sends
/v1/images/* to the image engine and everything else to vLLM, adds the image engine's gauges
and the node's capabilities to /metrics, and does not slow a streamed chat answer down.

The image engine here is the real heady_node.image_server (queue, checks, answers) drawing with
the simulator's stand-in (sim.node.images.png) instead of diffusers: tests/torch runs the real
drawing. The delay measurement uses the simulated node (`python -m sim.node --sim-images`) in
its own process, as the image engine is on a real node.
"""

import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.responses import StreamingResponse

from heady_node import guard
from heady_node.image_api import ImageJob, ImageLimits
from heady_node.image_queue import JobQueue
from heady_node.image_server import ImageService, build_app
from heady_shared import capabilities
from sim.node.images import png, png_size
from tests.node.test_guard import AUTH, TOKEN, free_port, serve
from tests.node.vllm_shape import build_app as vllm_app

ROOT = Path(__file__).resolve().parents[2]
MODEL = "Qwen/Qwen2-VL-2B-Instruct"


class SimDrawing:
    """The simulator's drawing (right size, realistic bytes) in place of a diffusion model."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def generate(self, job: ImageJob) -> list[bytes]:
        time.sleep(self.seconds * job.n)
        return [png(job.width, job.height, i) for i in range(job.n)]


@contextmanager
def image_engine(seconds: float = 0.0, max_waiting: int = 4) -> Iterator[tuple[str, ImageService]]:
    service = ImageService(
        ImageLimits(512, 1024, 64, 4, 1, 4, 0.0),
        ("stabilityai/sd-turbo", "vision"),
        TOKEN,
        JobQueue(max_waiting=max_waiting, seconds_per_job=max(seconds, 0.1)),
        engine=SimDrawing(seconds),
    )
    with serve(build_app(service)) as base:
        yield base, service


@contextmanager
def joined_node(images_url: str | None, caps: str = "chat,image_input") -> Iterator[str]:
    os.environ[guard.TOKEN_ENV] = TOKEN
    os.environ[guard.CAPABILITIES_ENV] = caps
    if images_url:
        os.environ[guard.IMAGES_URL_ENV] = images_url
    try:
        app = vllm_app([MODEL, "vision"], TOKEN, [guard.IMPORT_PATH])
        with serve(app) as base:
            yield base
    finally:
        for name in (guard.TOKEN_ENV, guard.CAPABILITIES_ENV, guard.IMAGES_URL_ENV):
            os.environ.pop(name, None)


def test_images_go_to_the_image_engine_and_chat_to_vllm() -> None:
    with (
        image_engine() as (engine, service),
        joined_node(engine) as node,
        httpx.Client(base_url=node, timeout=30) as c,
    ):
        body = {"model": "vision", "prompt": "a login page", "n": 2, "size": "1024x1024",
                "response_format": "b64_json"}  # fmt: skip
        r = c.post("/v1/images/generations", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        sizes = [png_size(base64.b64decode(d["b64_json"])) for d in r.json()["data"]]
        assert sizes == [(1024, 1024), (1024, 1024)]
        assert service.queue.done == 1
        # The guard's rules hold for both engines: no token, no image.
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 401 and r.headers[guard.MARK_HEADER] == "1"
        assert service.queue.done == 1
        # Chat still reaches vLLM, /v1/models is vLLM's.
        chat = {"model": "vision", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=chat, headers=AUTH).status_code == 200
        assert [m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]] == [
            MODEL,
            "vision",
        ]
        # Errors and 429s pass through as the engine wrote them.
        r = c.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"},
                   headers=AUTH)  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        # A chunked upload (no Content-Length) is relayed too.
        r = c.post(
            "/v1/images/generations",
            content=iter([b'{"prompt": "chunked", ', b'"size": "64x64"}']),
            headers={**AUTH, "content-type": "application/json"},
        )
        assert r.status_code == 200 and r.json()["size"] == "64x64"


def test_metrics_carry_vllm_the_image_queue_and_capabilities() -> None:
    with image_engine() as (engine, _), joined_node(engine) as node:
        # Asked for gzip, as a Workers fetch asks: the guard still adds its lines.
        r = httpx.get(f"{node}/metrics", headers={**AUTH, "accept-encoding": "gzip"})
        assert r.status_code == 200
        text = r.text
        assert "vllm:num_requests_running" in text
        assert 'heady_images:num_requests_waiting{model_name="stabilityai/sd-turbo"} 0' in text
        assert capabilities.parse(text) == ("chat", "image_input", "image_generation")
        assert int(r.headers["content-length"]) == len(r.content)
        assert httpx.get(f"{node}/metrics").status_code == 401


def test_engine_down_means_no_image_capability_and_a_clean_503() -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with joined_node(gone) as node, httpx.Client(base_url=node, timeout=10) as c:
        r = c.post("/v1/images/generations", json={"prompt": "x"}, headers=AUTH)
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "the image engine is not running on this node"
        assert "127.0.0.1" not in r.text
        text = c.get("/metrics", headers=AUTH).text
        assert capabilities.parse(text) == ("chat", "image_input")
        assert "heady_images" not in text


def test_a_node_without_images_keeps_the_old_paths() -> None:
    with joined_node(None, caps="chat") as node:
        r = httpx.post(f"{node}/v1/images/generations", json={"prompt": "x"}, headers=AUTH)
        assert r.status_code == 404  # vLLM's own: no such route
        assert capabilities.parse(httpx.get(f"{node}/metrics", headers=AUTH).text) == ("chat",)


def test_a_client_that_leaves_gives_its_queue_place_up() -> None:
    with image_engine(seconds=0.5, max_waiting=4) as (engine, service), joined_node(engine) as node:
        body = json.dumps({"prompt": "x", "n": 2, "size": "64x64"}).encode()
        first = threading.Thread(
            target=lambda: httpx.post(
                f"{node}/v1/images/generations", content=body, headers=AUTH, timeout=30
            )
        )
        first.start()
        deadline = time.monotonic() + 5
        while service.queue.running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # A raw client that sends a request, waits until it is queued, then hangs up.
        port = int(node.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\n"
                + f"authorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\n".encode()
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 5
            while service.queue.waiting == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while service.queue.waiting:  # the guard let go of the engine, which freed the place
            assert time.monotonic() < deadline, "the queued request outlived its client"
            time.sleep(0.01)
        first.join(10)
        assert service.queue.done == 1


def test_chat_requests_keep_their_send_untouched() -> None:
    """The join adds no layer to the chat path: vLLM's app gets the server's own `send`."""
    seen = []

    async def inner(scope, receive, send) -> None:
        seen.append(send)

    async def run() -> None:
        g = guard.NodeGuard(inner, TOKEN, "http://127.0.0.1:9", "chat,image_input")

        async def send(message) -> None:
            pass

        scope = {"type": "http", "path": "/v1/chat/completions", "headers": [
            (b"authorization", f"Bearer {TOKEN}".encode())]}  # fmt: skip
        await g(scope, None, send)
        assert seen == [send]

    asyncio.run(run())


# -- the per-event delay of a streamed chat answer, with and without the join ------------------

EVENTS = 150
INTERVAL_S = 0.004


def _with_stream_route(app) -> None:
    """A chat-like stream whose events carry the server's send time (same process, same
    clock as the client's), one every INTERVAL_S, on a fixed schedule."""

    async def stream() -> StreamingResponse:
        async def events():
            start = time.monotonic()
            for i in range(EVENTS):
                await asyncio.sleep(max(0.0, start + i * INTERVAL_S - time.monotonic()))
                yield f"data: {time.monotonic():.9f}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_api_route("/v1/test/stream", stream, methods=["POST"])


def _delays(base: str) -> list[float]:
    out = []
    with (
        httpx.Client(base_url=base, timeout=30) as c,
        c.stream("POST", "/v1/test/stream", headers=AUTH) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(time.monotonic() - float(line[6:]))
    assert len(out) == EVENTS
    return out


@contextmanager
def _node(images_url: str | None) -> Iterator[str]:
    if images_url:
        os.environ[guard.IMAGES_URL_ENV] = images_url
        os.environ[guard.CAPABILITIES_ENV] = "chat,image_input"
    os.environ[guard.TOKEN_ENV] = TOKEN
    try:
        app = vllm_app([MODEL, "vision"], TOKEN, [guard.IMPORT_PATH] if images_url else [])
        _with_stream_route(app)
        with serve(app) as base:
            yield base
    finally:
        for name in (guard.TOKEN_ENV, guard.CAPABILITIES_ENV, guard.IMAGES_URL_ENV):
            os.environ.pop(name, None)


@contextmanager
def _sim_image_engine() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.node", "--node", "5", "--port", str(port), "--api-key",
         TOKEN, "--served-model-name", "stabilityai/sd-turbo", "vision", "--sim-images", "a100-40",
         "--sim-image-s", "0.05"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def _image_load(node: str) -> Iterator[list[int]]:
    """Another process asks for 4 x 1024x1024 images (~8 MB of JSON) through the node, over and
    over, while the stream runs: the relay works in vLLM's event loop meanwhile."""
    script = (
        "import httpx,sys\n"
        "n=0\n"
        "while True:\n"
        f"    r=httpx.post('{node}/v1/images/generations',json={{'prompt':'x','n':4,"
        "'size':'1024x1024'},"
        f"headers={{'Authorization':'Bearer {TOKEN}'}},timeout=60)\n"
        "    n+=len(r.content); print(r.status_code,len(r.content),flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    sizes: list[int] = []
    try:
        first = proc.stdout.readline().split()  # one answer relayed before measuring
        assert first and first[0] == "200", first
        sizes.append(int(first[1]))
        yield sizes
        proc.terminate()
        rest = proc.stdout.read().split("\n")  # the answers relayed while the stream ran
        sizes += [int(line.split()[1]) for line in rest if line.startswith("200 ")]
    finally:
        proc.terminate()
        proc.wait(10)


def _summary(delays: list[float]) -> tuple[float, float, float]:
    ms = sorted(d * 1000 for d in delays)
    return statistics.median(ms), ms[int(len(ms) * 0.95)], ms[-1]


@pytest.mark.timeout(180)
def test_join_streams_chat_while_image_answers_are_relayed(capsys) -> None:
    """A 150-event chat stream arrives whole through vLLM alone, through the joined guard, and
    through the joined guard while ~8 MB image answers are relayed back to back. The per-event
    delays (server write -> client read) are printed, not asserted: on a shared 2-core machine
    they move with the load (docs/images.md keeps the measured ranges)."""
    rounds: dict[str, list[float]] = {"alone": [], "joined": [], "joined+images": []}
    with _sim_image_engine() as engine:
        with _node(None) as alone:
            _delays(alone)  # warm-up
            for _ in range(3):
                rounds["alone"] += _delays(alone)
        with _node(engine) as joined:
            _delays(joined)
            for _ in range(3):
                rounds["joined"] += _delays(joined)
            with _image_load(joined) as sizes:
                for _ in range(3):
                    rounds["joined+images"] += _delays(joined)
            relayed_during = len(sizes) - 1  # answers after the first (read when the load stops)
    assert sizes[0] > 7_000_000  # 4 x 1024x1024 PNGs as b64_json: ~8 MB
    assert relayed_during >= 1  # image answers really crossed the join while chat streamed
    assert all(len(v) == 3 * EVENTS for v in rounds.values())  # every event of every round
    stats = {k: _summary(v) for k, v in rounds.items()}
    with capsys.disabled():
        print()
        for k, (p50, p95, top) in stats.items():
            print(f"  chat event delay {k:14s} p50 {p50:6.3f} ms  p95 {p95:6.3f}  max {top:6.2f}")
