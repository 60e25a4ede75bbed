"""The simulator's vision nodes answer the Images API the way a Heady vision node does (the
node's own request checks and queue, heady_node.image_api / image_queue), through the OpenAI
SDK; every node reports its capabilities in /metrics as the node guard does."""

import base64
import concurrent.futures as cf
import io
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import openai
import pytest

from heady_shared import capabilities
from sim.fleet import Fleet
from sim.node.images import png, png_size

KEY = "sim-node-key"


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(count=6, api_key=KEY, image_s=0.0) as f:
        yield f


@pytest.fixture(autouse=True)
def _reset(fleet: Fleet) -> Iterator[None]:
    fleet.reset()
    yield
    fleet.reset()


def sdk(fleet: Fleet, n: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.url(n)}/v1", api_key=KEY, max_retries=0)


def decode_png(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64, validate=True)
    size = png_size(data)
    assert size is not None
    # The pixel data inflates to exactly one filter byte + 3 bytes per pixel per row.
    idat_len = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41 : 41 + idat_len])
    assert len(raw) == size[1] * (1 + 3 * size[0])
    return size


def test_the_issue_snippet_works_against_a_vision_node(fleet: Fleet) -> None:
    r = sdk(fleet, 5).images.generate(
        model="vision", prompt="a wireframe of a login page", n=2, size="512x512",
        response_format="b64_json",
    )  # fmt: skip
    assert len(r.data) == 2 and r.created > 0
    assert [decode_png(d.b64_json) for d in r.data] == [(512, 512), (512, 512)]
    assert r.output_format == "png" and r.size == "512x512"
    # The L4 node serves another model with another native size (SDXL-Turbo, also 512).
    r6 = sdk(fleet, 6).images.generate(model="vision", prompt="x")
    assert decode_png(r6.data[0].b64_json) == (512, 512)


def test_refusals_match_the_node(fleet: Fleet) -> None:
    c = sdk(fleet, 5)
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model="vision", prompt="x", response_format="url")
    assert "b64_json" in e.value.message and e.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError):
        c.images.generate(model="reasoning", prompt="x")
    # Nodes without an image engine: vLLM's own 404 for an unknown route.
    r = httpx.post(f"{fleet.url(3)}/v1/images/generations", json={"prompt": "x"},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert (
        httpx.post(f"{fleet.url(5)}/v1/images/generations", json={"prompt": "x"}).status_code == 401
    )


def test_edits_through_the_sdk(fleet: Fleet) -> None:
    r = sdk(fleet, 5).images.edit(
        model="vision", image=("in.png", png(320, 200, 1), "image/png"), prompt="bluer", n=1
    )
    assert decode_png(r.data[0].b64_json) == (320, 192)  # the upload's size, snapped to 64
    r = sdk(fleet, 5).images.edit(
        image=[("a.png", png(64, 64, 2), "image/png")],
        mask=("m.png", png(64, 64, 3), "image/png"),
        prompt="door",
        size="256x256",
    )
    assert decode_png(r.data[0].b64_json) == (256, 256)
    with pytest.raises(openai.BadRequestError):
        sdk(fleet, 5).images.edit(image=("a.txt", b"hello", "text/plain"), prompt="x")


def test_capabilities_in_metrics_and_state(fleet: Fleet) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    got = {
        n: capabilities.parse(httpx.get(f"{fleet.url(n)}/metrics", headers=auth).text)
        for n in range(1, 7)
    }
    assert got[1] == got[2] == got[3] == got[4] == ("chat",)
    assert got[5] == got[6] == ("chat", "image_input", "image_generation")
    text = httpx.get(f"{fleet.url(5)}/metrics").text
    assert 'heady_images:num_requests_waiting{model_name="stabilityai/sd-turbo"} 0' in text
    assert text.count("# TYPE heady:node_capability gauge") == 1
    fleet.set_capabilities(5, ["chat", "image_input"])  # the image engine stopped
    assert fleet.state()["5"]["capabilities"] == ["chat", "image_input"]
    r = httpx.post(f"{fleet.url(5)}/v1/images/generations", json={"prompt": "x"}, headers=auth)
    assert r.status_code == 404
    fleet.reset()
    assert fleet.state()["5"]["capabilities"] == ["chat", "image_input", "image_generation"]


def test_vision_chat_is_refused_by_a_text_only_node(fleet: Fleet) -> None:
    image = "data:image/png;base64," + base64.b64encode(png(8, 8, 1)).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        sdk(fleet, 1).chat.completions.create(model="reasoning", messages=messages)
    assert "is not a multimodal model" in e.value.message
    ok = sdk(fleet, 5).chat.completions.create(model="vision", messages=messages)
    assert ok.choices[0].message.content


def test_one_image_job_at_a_time_then_429(fleet: Fleet) -> None:
    node = fleet.node(5)
    assert node.images is not None
    node.images.seconds_per_image = 0.3
    node.images.queue.seconds_per_job = 0.3
    node.images.queue.max_waiting = 1
    url = f"{fleet.url(5)}/v1/images/generations"
    auth = {"Authorization": f"Bearer {KEY}"}

    def post() -> httpx.Response:
        return httpx.post(url, json={"prompt": "x", "n": 2}, headers=auth, timeout=30)

    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post)
        time.sleep(0.1)
        second = pool.submit(post)
        time.sleep(0.1)
        third = post()
        assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
        assert third.json()["error"]["code"] == "rate_limit_exceeded"
        started = time.monotonic()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert time.monotonic() - started >= 0.5  # the second waited for the first (2 x 0.3 s)


def test_large_answers_have_realistic_size() -> None:
    one = png(1024, 1024, 7)
    assert 1_300_000 < len(one) < 1_800_000  # like a real diffusion PNG at 1024x1024
    assert png_size(one) == (1024, 1024)
    assert png(64, 32, 1) == png(64, 32, 1)  # same seed, same file
    assert png_size(b"not a png") is None
    assert io.BytesIO(one).read(8) == b"\x89PNG\r\n\x1a\n"
