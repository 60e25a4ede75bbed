"""The simulated node's LoRA semantics (sim.node.lora, mirroring vLLM's `_check_model` and
`resolve_lora`): adapters load on first use through resolvers, /v1/models lists them with their
parent, unknown names get vLLM's 404; the gateway resolver runs heady_node's real fetch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from heady_node.finetune.adapter import pack_dir
from heady_shared import ftnames
from sim.node import Node
from sim.node.lora import LoraRegistry, gateway_resolver, static_resolver
from tests.node.test_finetune_pure import write_adapter

BASE = "Qwen/Qwen2.5-3B-Instruct"
CRED = "hn1.7.0123456789abcdef0123456789abcdef"
FT = ftnames.ft_model_name(BASE, "heady", "0123abcd")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class _Gateway(ThreadingHTTPServer):
    adapters: dict[str, bytes]
    hits: int


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:
        srv: _Gateway = self.server  # type: ignore[assignment]
        srv.hits += 1
        slug = self.path.removeprefix("/api/nodes/v1/adapters/")
        ok = self.headers.get("authorization") == f"Bearer {CRED}"
        body = srv.adapters.get(slug) if ok else None
        self.send_response(200 if body is not None else 404)
        self.send_header("content-length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[_Gateway]:
    srv = _Gateway(("127.0.0.1", 0), _Handler)
    srv.hits = 0
    srv.adapters = {ftnames.slug(FT): pack_dir(write_adapter(tmp_path / "adapter"))}
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


async def _with_node(loras: LoraRegistry | None, check) -> None:
    node = Node(7, model=BASE, served_names=[BASE, "batch"], loras=loras)
    await node.start()
    try:
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as c:
            await check(c)
    finally:
        await node.stop()


def ids(models: dict) -> list[tuple[str, object]]:
    return [(m["id"], m["parent"]) for m in models["data"]]


def test_a_resolved_adapter_is_served_and_listed_after_first_use(gateway, tmp_path) -> None:
    url = f"http://127.0.0.1:{gateway.server_port}"
    loras = LoraRegistry(BASE, [gateway_resolver(url, CRED, tmp_path / "cache")])

    async def check(c: httpx.AsyncClient) -> None:
        assert ids((await c.get("/v1/models")).json()) == [(BASE, None), ("batch", None)]
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": FT})
        assert r.status_code == 200 and r.json()["model"] == FT
        models = (await c.get("/v1/models")).json()
        assert ids(models) == [(BASE, None), ("batch", None), (FT, BASE)]
        card = models["data"][2]
        assert card["root"] == str(tmp_path / "cache" / ftnames.slug(FT))
        assert (Path(card["root"]) / "adapter_config.json").is_file()
        r = await c.post("/v1/completions", json={"prompt": "x", "model": FT})
        assert r.status_code == 200 and gateway.hits == 1  # loaded once, then served from memory
        other = FT.replace("0123abcd", "ffffeeee")
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": other})
        assert r.status_code == 404
        assert r.json()["error"] == {
            "message": f"The model `{other}` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
        assert gateway.hits == 2

    asyncio.run(_with_node(loras, check))


def test_without_runtime_updating_or_lora_nothing_resolves(gateway, tmp_path) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": FT})
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]

    url = f"http://127.0.0.1:{gateway.server_port}"
    off = LoraRegistry(BASE, [gateway_resolver(url, CRED, tmp_path / "c")], runtime_updating=False)
    asyncio.run(_with_node(off, check))
    asyncio.run(_with_node(None, check))
    assert gateway.hits == 0


def test_an_adapter_of_another_base_is_not_served(gateway, tmp_path) -> None:
    url = f"http://127.0.0.1:{gateway.server_port}"

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": FT})
        assert r.status_code == 404

    other = LoraRegistry("Qwen/Qwen2.5-7B-Instruct", [gateway_resolver(url, CRED, tmp_path / "c")])
    asyncio.run(_with_node(other, check))


def test_static_resolver_and_the_cli(tmp_path) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": FT})
        assert r.status_code == 200
        assert ids((await c.get("/v1/models")).json())[-1] == (FT, BASE)

    asyncio.run(_with_node(LoraRegistry(BASE, [static_resolver([FT])]), check))

    # python -m sim.node --enable-lora --sim-lora-resolve NAME, with vLLM's env switch.
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sim.node",
            "serve",
            BASE,
            "--port",
            "0",
            "--enable-lora",
            "--sim-lora-resolve",
            FT,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stderr.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "model": FT}
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 200 and json.loads(r.text)["model"] == FT
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
