"""Capability-aware routing end to end: the gateway in workerd learns from the simulated
fleet's /metrics what each node serves (cron), sends images and vision chat only to nodes that
have them, answers no_capable_node when none is up, and still falls back for text chat.

Driven with the official `openai` SDK, as clients use it. The simulated vision nodes (5-6)
run the node's own image checks and queue; nodes 1-4 serve chat only.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from bench.probes import cpu_seconds, find_workerd
from harness.gateway import Gateway, build_config
from heady_shared import capabilities as caps
from sim.fleet import Fleet
from sim.node.images import image_sim_for, png, png_size
from tests.e2e.conftest import API_KEY, fleet_bindings

VISION_URL = "/api/heavy/vision/v1"


@pytest.fixture(scope="module")
def big_gateway(fleet: Fleet) -> Iterator[Gateway]:
    """The suite's fleet behind a gateway that accepts bodies of a real image's size."""
    bindings = fleet_bindings(fleet, MAX_BODY_BYTES=str(16 * 1024 * 1024), ATTEMPT_TIMEOUT_S="20")
    with Gateway(build_config(bindings=bindings)) as gw:
        yield gw


@pytest.fixture
def gw(big_gateway: Gateway, fleet: Fleet) -> Iterator[Gateway]:
    fleet.reset()
    big_gateway.reset()
    for n in range(1, 9):
        fleet.clear_requests(n)
    yield big_gateway
    fleet.reset()


def sdk(gw: Gateway, role: str = "vision") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/api/heavy/{role}/v1", api_key=API_KEY, max_retries=0)


def learn(gw: Gateway) -> dict:
    """One cron tick, then what /api/status says each node serves."""
    gw.scheduled()
    status = httpx.get(f"{gw.url}/api/status", headers={"authorization": f"Bearer {API_KEY}"})
    return {n["node"]: n["capabilities"] for n in status.json()["nodes"]}


def reached(fleet: Fleet, path_part: str) -> dict[int, int]:
    return {
        n: sum(1 for r in fleet.requests(n) if path_part in r.path)
        for n in range(1, 9)
        if any(path_part in r.path for r in fleet.requests(n))
    }


def image_chat(b64: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "what is on this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
    ]}]  # fmt: skip


def test_the_cron_learns_capabilities_and_status_shows_them(gw: Gateway) -> None:
    before = httpx.get(f"{gw.url}/api/status", headers={"authorization": f"Bearer {API_KEY}"})
    assert {n["capabilities"] for n in before.json()["nodes"] if n["node"] == 5} == {None}
    learned = learn(gw)
    assert learned[1] == learned[2] == learned[3] == learned[4] == [caps.CHAT]
    assert learned[5] == learned[6] == [caps.CHAT, caps.IMAGE_INPUT, caps.IMAGE_GENERATION]


def test_images_through_the_gateway_with_the_sdk(gw: Gateway, fleet: Fleet) -> None:
    learn(gw)
    r = sdk(gw).images.generate(
        model="vision", prompt="a wireframe of a login page", n=2, size="512x512",
        response_format="b64_json",
    )  # fmt: skip
    assert [png_size(base64.b64decode(d.b64_json)) for d in r.data] == [(512, 512)] * 2
    edit = sdk(gw).images.edit(image=("a.png", png(128, 128, 1), "image/png"), prompt="x")
    assert png_size(base64.b64decode(edit.data[0].b64_json)) == (128, 128)
    with pytest.raises(openai.BadRequestError) as e:
        sdk(gw).images.generate(model="vision", prompt="x", response_format="url")
    assert "b64_json" in e.value.message
    assert set(reached(fleet, "/v1/images/")) <= {5, 6}


def test_image_and_vision_requests_never_reach_nodes_without_the_capability(
    gw: Gateway, fleet: Fleet
) -> None:
    learn(gw)
    fleet.set(5, "status", status=503)  # busy: the gateway fails over within the pair
    small = base64.b64encode(png(16, 16, 2)).decode()
    for _ in range(3):
        sdk(gw).images.generate(model="vision", prompt="x")
        answer = sdk(gw).chat.completions.create(model="vision", messages=image_chat(small))
        assert answer.choices[0].message.content
    # Node 5 was asked and failed over; nodes 1-2 (the fallback chain) were never asked.
    assert set(reached(fleet, "/v1/images/")) == {5, 6}
    assert set(reached(fleet, "/v1/chat/completions")) <= {5, 6}
    served = [r for r in fleet.requests(6) if r.path.endswith("/chat/completions")]
    assert len(served) == 3


def test_no_capable_node_when_the_vision_pair_is_down(gw: Gateway, fleet: Fleet) -> None:
    learn(gw)
    fleet.set(5, "refuse")
    fleet.set(6, "refuse")
    learn(gw)  # the cron sees the pair down
    with pytest.raises(openai.InternalServerError) as e:
        sdk(gw).images.generate(model="vision", prompt="x")
    assert e.value.status_code == 503
    err = e.value.body
    assert err["type"] == "no_capable_node" and err["capability"] == caps.IMAGE_GENERATION
    assert err["nodes"] == [5, 6] and "image generation" in err["message"]
    assert int(e.value.response.headers["retry-after"]) >= 1
    small = base64.b64encode(png(16, 16, 3)).decode()
    with pytest.raises(openai.InternalServerError) as e:
        sdk(gw).chat.completions.create(model="vision", messages=image_chat(small))
    assert e.value.body["capability"] == caps.IMAGE_INPUT
    assert reached(fleet, "/v1/images/") == {} and 1 not in reached(fleet, "/v1/chat/")
    # Text chat on the vision role still falls back to nodes 1-2.
    text = sdk(gw).chat.completions.with_raw_response.create(
        model="vision", messages=[{"role": "user", "content": "hello"}]
    )
    assert text.headers["x-heady-node"] in ("1", "2")
    assert text.headers["x-heady-fallback"] == "true"


def test_pair_down_before_any_probe_still_says_no_capable_node(gw: Gateway, fleet: Fleet) -> None:
    """The first request finds the pair down itself (no cron yet after the failure)."""
    learn(gw)
    fleet.set(5, "refuse")
    fleet.set(6, "refuse")
    r = httpx.post(
        f"{gw.url}{VISION_URL}/images/generations",
        json={"prompt": "x"},
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 503 and r.json()["error"]["type"] == "no_capable_node"
    assert [a["node"] for a in r.json()["error"]["attempts"]] in ([5, 6], [6, 5])


def test_unknown_capabilities_are_tried_as_today(gw: Gateway, fleet: Fleet) -> None:
    # No cron yet: nothing known, so a vision chat goes where the plan says (the pair first).
    small = base64.b64encode(png(16, 16, 4)).decode()
    r = sdk(gw).chat.completions.with_raw_response.create(
        model="vision", messages=image_chat(small)
    )
    assert r.headers["x-heady-node"] in ("5", "6")


def _workerd_cpu(gw: Gateway, fleet: Fleet, sends: dict, count: int, reps: int) -> dict:
    """Median workerd CPU ms per request of each kind, the kinds interleaved over `reps`
    rounds of `count` requests (the machine is shared: interleaving spreads its noise)."""
    pid = find_workerd(gw.proc.pid)
    assert pid is not None
    samples: dict[str, list[float]] = {k: [] for k in sends}
    for _ in range(reps):
        for kind, send in sends.items():
            cpu0 = cpu_seconds(pid)
            for _ in range(count):
                send()
            samples[kind].append((cpu_seconds(pid) - cpu0) / count * 1000)
            fleet.clear_requests()  # the simulated nodes keep every body they got
    return {k: statistics.median(v) for k, v in samples.items()}


@pytest.mark.timeout(300)
def test_cost_of_finding_an_image_part_and_of_an_8mb_answer(gw: Gateway, fleet: Fleet, capsys):
    """workerd CPU per request (from /proc, 10 ms ticks, so many requests per reading):
    a 5 MB chat body with its image part first, the same size of text (searched to the end),
    and the same body sent to /v1/completions (never searched). Then a 4 x 1024x1024 b64_json
    answer (~8 MB) relayed with its Content-Length, natively."""
    learn(gw)
    b64 = base64.b64encode(bytes(range(256)) * (5 * 1024 * 1024 // 256 * 3 // 4)).decode()
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    bodies = {
        "image chat": json.dumps({"model": "vision", "messages": image_chat(b64)}),
        "text chat": json.dumps(
            {"model": "vision", "messages": [{"role": "user", "content": b64}]}
        ),
    }
    prompt = json.dumps({"model": "vision", "prompt": b64})
    client = httpx.Client(timeout=60)

    def post(path: str, body: str):
        def go() -> None:
            r = client.post(f"{gw.url}{VISION_URL}{path}", content=body, headers=headers)
            assert r.status_code == 200, r.text[:300]

        return go

    sends = {
        "image chat": post("/chat/completions", bodies["image chat"]),
        "text chat": post("/chat/completions", bodies["text chat"]),
        "completions": post("/completions", prompt),
    }
    cpu = _workerd_cpu(gw, fleet, sends, 4, 5)
    # The 8 MB answer: 1024x1024 is an A100-class preset's size (a T4 or L4 stops at 768);
    # the vision pair stands in for A100 nodes here and draws at once (reset() restores both).
    for n in (5, 6):
        fleet.node(n).set_capabilities(
            [caps.CHAT, caps.IMAGE_INPUT], images=image_sim_for("a100-40", 0.0)
        )
    big = json.dumps({"model": "vision", "prompt": "x", "n": 4, "size": "1024x1024"})
    direct = httpx.post(f"{fleet.url(5)}/v1/images/generations", content=big,
                        headers={"authorization": "Bearer node-token-abcdef-secret",
                                 "content-type": "application/json"}, timeout=60)  # fmt: skip
    size = len(direct.content)
    assert size > 7_000_000, direct.text[:300]

    def image() -> None:
        r = client.post(f"{gw.url}{VISION_URL}/images/generations", content=big, headers=headers)
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
        assert len(r.content) > 7_000_000

    try:
        cpu.update(_workerd_cpu(gw, fleet, {"8 MB image answer": image}, 4, 3))
        started = time.monotonic()
        image()
        wall = time.monotonic() - started
    finally:
        client.close()
    with capsys.disabled():
        print()
        for k, v in cpu.items():
            print(f"  workerd CPU per request, {k:18s} {v:7.2f} ms")
        print(f"  8 MB answer ({size} bytes) through the gateway: {wall * 1000:.0f} ms wall")
    # Searching 5 MB (to the end) stays small next to reading and sending the same body,
    # which every request of that size pays (the third line): tens of ms at most.
    assert cpu["text chat"] - cpu["completions"] < 60, cpu
    assert cpu["image chat"] - cpu["completions"] < 60, cpu
    # The 8 MB answer is pumped natively: `image()` checked that it keeps the node's
    # Content-Length, which only the untouched pass-through does (a relayed body is chunked).
    # Its CPU is printed above beside the others; since request bodies are read natively too,
    # the two are of one order, so no ratio between them is asserted.
