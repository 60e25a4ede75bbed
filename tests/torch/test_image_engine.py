"""The image engine end to end on the CPU: the real server process (`python -m
heady_node.image_server --tiny`), the real diffusers pipelines (text-to-image, image-to-image,
inpainting) around a tiny randomly initialised model, real PNG/JPEG files decoded by Pillow."""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from heady_node.image_api import ImageJob
from heady_node.image_engine import DiffusersEngine, edit_mask, tiny_pipeline
from heady_shared import capabilities

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "image-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "HEADY_NODE_TOKEN": TOKEN,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "heady_node.image_server", "--tiny", "--port", str(port),
         "--served-model-name", "tiny-random-sd", "vision", "--max-waiting", "1"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "image server not healthy in 120 s"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def decode(item: dict) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"], validate=True)))
    img.load()
    return img


def test_generation_returns_real_pngs_of_the_asked_size(server: str) -> None:
    body = {"prompt": "a wireframe of a login page", "model": "vision", "n": 2,
            "size": "96x64", "response_format": "b64_json", "seed": 7}  # fmt: skip
    r = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert abs(out["created"] - time.time()) < 300
    assert out["output_format"] == "png" and out["size"] == "96x64"
    assert len(out["data"]) == 2
    for item in out["data"]:
        assert set(item) == {"b64_json"}
        assert base64.b64decode(item["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
        img = decode(item)
        assert img.format == "PNG" and img.size == (96, 64) and img.mode == "RGB"
    # Same seed, same request: the same pixels (reproducible on one machine).
    again = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=120)
    assert again.json()["data"][0]["b64_json"] == out["data"][0]["b64_json"]


def test_generation_defaults_and_jpeg(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/images/generations",
        json={"prompt": "x", "output_format": "jpeg", "output_compression": 50},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    img = decode(r.json()["data"][0])
    assert img.format == "JPEG" and img.size == (64, 64)  # the preset's native size


def test_refusals_are_openai_shaped(server: str) -> None:
    url = f"{server}/v1/images/generations"
    r = httpx.post(url, json={"prompt": "x", "response_format": "url"}, headers=AUTH)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["code"] == "unsupported_response_format"
    assert "b64_json" in err["message"] and err["type"] == "invalid_request_error"
    r = httpx.post(url, json={"prompt": "x", "model": "gpt-image-1"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(url, json={"prompt": "x", "size": "100x100"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_size"
    r = httpx.post(url, content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "x"})
    assert r.status_code == 401
    assert httpx.get(f"{server}/metrics").status_code == 401


def _png(size: tuple[int, int], mode: str = "RGB", colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_edits_image_to_image_and_inpaint(server: str) -> None:
    url = f"{server}/v1/images/edits"
    # No transparency: image-to-image; size "auto" keeps the upload's size.
    files = {"image": ("in.png", _png((128, 64)), "image/png")}
    r = httpx.post(url, data={"prompt": "make it blue", "n": "1"}, files=files, headers=AUTH,
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]).size == (128, 64)
    # A mask whose left half is transparent: inpainting, at the asked size.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    files = {
        "image[]": ("in.png", _png((64, 64)), "image/png"),
        "mask": ("mask.png", buf.getvalue(), "image/png"),
    }
    r = httpx.post(url, data={"prompt": "a door", "size": "64x64", "n": "2"}, files=files,
                   headers=AUTH, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    assert [decode(d).size for d in r.json()["data"]] == [(64, 64), (64, 64)]
    # A mask without alpha and a file that is no image: 400, not 500.
    files = {"image": ("in.png", _png((64, 64)), "image/png"),
             "mask": ("m.png", _png((64, 64), "L", 0), "image/png")}  # fmt: skip
    r = httpx.post(url, data={"prompt": "x"}, files=files, headers=AUTH, timeout=120)
    assert r.status_code == 400 and "alpha" in r.json()["error"]["message"]
    files = {"image": ("in.png", b"not an image", "image/png")}
    r = httpx.post(url, data={"prompt": "x"}, files=files, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_metrics_report_queue_gauges_and_capability(server: str) -> None:
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert 'heady_images:num_requests_running{model_name="tiny-random-sd"} 0' in text
    assert 'heady_images:num_requests_waiting{model_name="tiny-random-sd"} 0' in text
    assert capabilities.parse(text) == (capabilities.IMAGE_GENERATION,)


def test_one_at_a_time_and_429_past_the_queue(server: str) -> None:
    """--max-waiting 1: one runs, one waits, the rest are refused with Retry-After."""
    import concurrent.futures as cf

    body = {"prompt": "busy", "n": 4, "size": "256x256"}
    url = f"{server}/v1/images/generations"

    def post() -> httpx.Response:
        return httpx.post(url, json=body, headers=AUTH, timeout=300)

    with cf.ThreadPoolExecutor(6) as pool:
        first = pool.submit(post)
        seen_running = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = httpx.get(f"{server}/metrics", headers=AUTH).text
            if 'num_requests_running{model_name="tiny-random-sd"} 1' in text:
                seen_running = True
                break
            time.sleep(0.02)
        assert seen_running
        # Five more arrive at once while the first runs: one may wait, the rest are refused.
        # (Not one at a time: a first job that ends between two sends would leave room, and
        # a loaded CI run once saw exactly that.) Jobs take seconds, the sends milliseconds,
        # so at most two of the five can find room.
        rest = [f.result() for f in [pool.submit(post) for _ in range(5)]]
        assert first.result().status_code == 200
    refused = [r for r in rest if r.status_code == 429]
    assert len(refused) >= 3, [r.status_code for r in rest]
    assert all(r.status_code == 200 for r in rest if r.status_code != 429)
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert (
        f'heady_images:request_rejected_total{{model_name="tiny-random-sd"}} {len(refused)}' in text
    )


def test_engine_in_process_batches_and_masks() -> None:
    """The engine object directly: n split into batches, every image encoded."""
    engine = DiffusersEngine.around(tiny_pipeline(), "cpu", batch=2)
    job = ImageJob("x", 3, 64, 32, "webp", 80, 1, 0.0, 1, None)
    files = engine.generate(job)
    assert len(files) == 3
    for f in files:
        img = Image.open(io.BytesIO(f))
        assert img.format == "WEBP" and img.size == (64, 32)
    # OpenAI's mask rule: alpha 0 = re-draw (white for diffusers), opaque = keep (black).
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    assert edit_mask(rgba, None).tobytes() == bytes([255, 0, 0, 0])
    assert edit_mask(Image.new("RGB", (2, 2)), None) is None
