"""The image engine's pure parts: request checks, the queue, presets, capabilities."""

import asyncio
import threading
import time

import pytest

from heady_node import image_presets, presets
from heady_node.gpu import GPU_CLASSES
from heady_node.image_api import ApiError, ImageLimits, fit_size, images_response, parse_job
from heady_node.image_queue import JobQueue, QueueFull, moving_average, retry_after_s
from heady_shared import capabilities

LIMITS = ImageLimits(512, 768, 64, 4, 1, 4, 0.0)
SERVED = ("stabilityai/sd-turbo", "vision")


def job(**fields):
    return parse_job({"prompt": "a cat", **fields}, LIMITS, SERVED)


def test_defaults_follow_the_preset() -> None:
    j = job()
    assert (j.n, j.width, j.height, j.steps, j.guidance, j.output_format) == (
        1, 512, 512, 1, 0.0, "png",
    )  # fmt: skip
    assert j.size == "512x512" and j.seed is None and j.image is None
    j = job(model="vision", n=3, size="768x256", response_format="b64_json", seed=5,
            num_inference_steps=4, guidance_scale=1.5, output_format="webp",
            output_compression=70, quality="high", style="vivid", user="u")  # fmt: skip
    assert (j.n, j.width, j.height, j.seed, j.steps, j.guidance) == (3, 768, 256, 5, 4, 1.5)
    assert (j.output_format, j.compression) == ("webp", 70)
    assert job(size="auto").size == "512x512"
    # multipart fields arrive as text
    assert parse_job({"prompt": "x", "n": "2", "seed": "9"}, LIMITS, SERVED).n == 2


@pytest.mark.parametrize(
    ("fields", "param", "status"),
    [
        ({"response_format": "url"}, "response_format", 400),
        ({"response_format": "png"}, "response_format", 400),
        ({"model": "dall-e-3"}, "model", 404),
        ({"model": 3}, "model", 404),
        ({"n": 0}, "n", 400),
        ({"n": 5}, "n", 400),
        ({"n": True}, "n", 400),
        ({"n": 1.5}, "n", 400),
        ({"size": "100x100"}, "size", 400),
        ({"size": "1024x1024"}, "size", 400),
        ({"size": "512"}, "size", 400),
        ({"size": 512}, "size", 400),
        ({"size": "0x64"}, "size", 400),
        ({"stream": True}, "stream", 400),
        ({"background": "transparent"}, "background", 400),
        ({"output_format": "gif"}, "output_format", 400),
        ({"output_compression": 101}, "output_compression", 400),
        ({"num_inference_steps": 5}, "num_inference_steps", 400),
        ({"num_inference_steps": 0}, "num_inference_steps", 400),
        ({"guidance_scale": float("nan")}, "guidance_scale", 400),
        ({"guidance_scale": "x"}, "guidance_scale", 400),
        ({"seed": -1}, "seed", 400),
        ({"negative_prompt": 3}, "negative_prompt", 400),
        ({"prompt": ""}, "prompt", 400),
        ({"prompt": None}, "prompt", 400),
        ({"prompt": "x" * 32001}, "prompt", 400),
    ],
)
def test_refusals_name_the_parameter(fields, param, status) -> None:
    err = job(**fields)
    assert isinstance(err, ApiError), fields
    assert (err.status, err.param) == (status, param)
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_url_refusal_says_why_and_what_to_ask_instead() -> None:
    err = job(response_format="url")
    assert isinstance(err, ApiError) and err.code == "unsupported_response_format"
    assert "no files" in err.message and "b64_json" in err.message


def test_edits_take_the_upload_size_and_a_strength() -> None:
    j = parse_job({"prompt": "x"}, LIMITS, SERVED, image=b"img", default_size=(640, 320))
    assert (j.width, j.height, j.strength, j.image, j.mask) == (640, 320, 0.6, b"img", None)
    j = parse_job({"prompt": "x", "strength": "0.3"}, LIMITS, SERVED, image=b"i", mask=b"m")
    assert j.strength == 0.3 and j.mask == b"m" and j.size == "512x512"
    bad = parse_job({"prompt": "x", "strength": "0"}, LIMITS, SERVED, image=b"i")
    assert isinstance(bad, ApiError) and bad.param == "strength"


def test_fit_size_scales_down_and_snaps() -> None:
    assert fit_size(640, 320, LIMITS) == (640, 320)
    assert fit_size(1536, 1024, LIMITS) == (768, 512)
    assert fit_size(100, 30, LIMITS) == (64, 64)
    assert fit_size(4000, 10, LIMITS) == (768, 64)
    for w in range(1, 3000, 37):
        for h in (1, 63, 64, 700, 2999):
            fw, fh = fit_size(w, h, LIMITS)
            assert 64 <= fw <= 768 and 64 <= fh <= 768 and fw % 64 == fh % 64 == 0


def test_images_response_shape() -> None:
    j = job(n=2, output_format="jpeg")
    out = images_response(j, ["AAA", "BBB"], 1700000000)
    assert out == {
        "created": 1700000000,
        "data": [{"b64_json": "AAA"}, {"b64_json": "BBB"}],
        "output_format": "jpeg",
        "size": "512x512",
    }


def test_retry_after_is_bounded_whole_seconds() -> None:
    assert retry_after_s(0, 0, 0.5) == 1
    assert retry_after_s(1, 3, 0.5) == 2
    assert retry_after_s(1, 3, 2.2) == 9
    assert retry_after_s(1, 100, 100.0) == 600
    assert retry_after_s(1, 1, -3) == 1
    assert moving_average(0.0, 3.0) == 3.0
    assert moving_average(1.0, 2.0) == pytest.approx(1.2)


def test_queue_runs_one_at_a_time_bounds_the_wait_and_frees_cancelled_places() -> None:
    async def scenario() -> None:
        q = JobQueue(max_waiting=1, seconds_per_job=1.0)
        gate = threading.Event()
        concurrent, peak = 0, 0
        lock = threading.Lock()

        def work() -> str:
            nonlocal concurrent, peak
            with lock:
                concurrent += 1
                peak = max(peak, concurrent)
            gate.wait(5)
            with lock:
                concurrent -= 1
            return "done"

        first = asyncio.ensure_future(q.run(work))
        await asyncio.sleep(0.05)
        assert (q.running, q.waiting) == (1, 0)
        second = asyncio.ensure_future(q.run(work))
        await asyncio.sleep(0.05)
        assert (q.running, q.waiting) == (1, 1)
        with pytest.raises(QueueFull) as full:
            await q.run(work)
        assert full.value.retry_after == 2 and q.rejected == 1
        second.cancel()  # its client left while it waited: the place is free again
        await asyncio.sleep(0.05)
        assert q.waiting == 0
        third = asyncio.ensure_future(q.run(work, cost=2))
        await asyncio.sleep(0.05)
        # Cancelling the running job's caller cannot stop the thread: the GPU stays busy.
        first.cancel()
        await asyncio.sleep(0.05)
        assert q.running == 1 and q.waiting == 1
        gate.set()
        assert await third == "done"
        assert peak == 1 and q.done == 2 and q.running == 0
        text = q.metrics("m", ready=True)
        assert 'heady_images:num_requests_running{model_name="m"} 0' in text
        assert 'heady_images:request_rejected_total{model_name="m"} 1' in text
        assert capabilities.parse(text) == (capabilities.IMAGE_GENERATION,)
        assert capabilities.parse(q.metrics("m", ready=False)) is None

    asyncio.run(scenario())


def test_failures_are_counted_and_release_the_gpu() -> None:
    async def scenario() -> None:
        q = JobQueue(max_waiting=2, seconds_per_job=1.0)

        def boom() -> None:
            raise RuntimeError("CUDA out of memory")

        with pytest.raises(RuntimeError):
            await q.run(boom)
        assert q.failed == 1 and q.running == 0
        assert await q.run(lambda: 7) == 7

    asyncio.run(scenario())


def test_every_gpu_class_fits_vision_model_and_image_model_together() -> None:
    for gpu in GPU_CLASSES.values():
        vision = presets.preset_for("vision", gpu)
        img = image_presets.image_preset(gpu)
        assert image_presets.joint_problems(vision, img) == [], gpu.key
        # vLLM's own memory rule still holds with its lowered share.
        assert presets.memory_estimate(vision.model, vision.max_model_len) <= img.vllm_budget_gib()
        limits = img.limits()
        assert limits.default_side <= limits.max_side and limits.max_side % limits.side_step == 0
        assert img.model.steps <= img.model.max_steps
        assert img.seconds_per_image > 0


def test_joint_rule_catches_what_does_not_fit() -> None:
    t4 = GPU_CLASSES["t4"]
    vision = presets.preset_for("vision", t4)
    sdxl = image_presets.image_preset(t4, "stabilityai/stable-diffusion-xl-base-1.0")
    problems = image_presets.joint_problems(vision, sdxl)
    assert problems and "0.95" in problems[-1]
    # The 7B VLM in fp16 cannot share a T4 at all.
    big = presets.preset_for("vision", GPU_CLASSES["a100-40"])
    big_on_t4 = presets.Preset("vision", t4, big.model, big.max_model_len, 16, False)
    assert any("needs" in p for p in image_presets.joint_problems(big_on_t4, sdxl))
    with pytest.raises(presets.PresetError):
        image_presets.image_preset(t4, "no/such-model")


def test_vllm_argv_and_env_carry_the_share_and_what_the_guard_reports() -> None:
    import dataclasses

    from heady_node import guard

    vision = presets.preset_for("vision", GPU_CLASSES["l4"])
    img = image_presets.image_preset(GPU_CLASSES["l4"])
    lowered = dataclasses.replace(vision, gpu_memory_utilization=img.vllm_utilization)
    argv = presets.engine_argv(lowered, port=8000, engine=["vllm", "serve"])
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.57"
    env = presets.engine_env(lowered, "tok", "http://127.0.0.1:8001")
    assert env[guard.CAPABILITIES_ENV] == "chat,image_input"
    assert env[guard.IMAGES_URL_ENV] == "http://127.0.0.1:8001"
    code = presets.preset_for("code", GPU_CLASSES["l4"])
    env = presets.engine_env(code, "tok")
    # Text presets serve LoRA adapters too (presets.LORA_ROLES); no image engine.
    assert env[guard.CAPABILITIES_ENV] == "chat,lora" and guard.IMAGES_URL_ENV not in env


def test_capabilities_round_trip_and_unknown_is_not_none() -> None:
    text = capabilities.exposition(("image_generation", "chat"))
    assert text.startswith("# HELP heady:node_capability")
    assert capabilities.parse(text) == ("chat", "image_generation")
    assert capabilities.parse("vllm:num_requests_running 0\n") is None
    assert capabilities.parse('heady:node_capability{capability="chat"} 0\n') == ()
    hostile = 'heady:node_capability{capability="root_shell"} 1\n' * 3
    assert capabilities.parse(hostile) == ()
    assert capabilities.exposition(()) == ""
    assert "# HELP" not in capabilities.exposition(("chat",), header=False)


def test_guard_settings_fail_closed() -> None:
    from heady_node import guard

    assert guard.parse_images_url(None) is None
    assert guard.parse_images_url("http://127.0.0.1:8001") == ("127.0.0.1", 8001)
    for bad in ("127.0.0.1:8001", "https://127.0.0.1:8001", "http://h", "http://h:x",
                "http://h:1/path"):  # fmt: skip
        with pytest.raises(RuntimeError):
            guard.parse_images_url(bad)
    assert guard.parse_capabilities("image_input, chat") == ("chat", "image_input")
    with pytest.raises(RuntimeError):
        guard.parse_capabilities("chat,teleport")


def test_session_plans_images_on_vision_nodes_only(tmp_path) -> None:
    from heady_node.session import NodeSession

    def session(node: int, gpu: str, **kw):
        lines: list[str] = []
        s = NodeSession(
            node=node,
            tunnel_kind="none",
            gpu_runner=lambda argv: gpu,
            secret=lambda name: "tok" if name == "NODE_TOKEN" else "",
            out=lines.append,
            log_dir=tmp_path,
            **kw,
        )
        s.preflight()
        return s, lines

    s, lines = session(5, "Tesla T4, 15360 MiB, 7.5, 550.54.15")
    assert s.image_preset is not None and s.preset.gpu_memory_utilization == 0.68
    assert any(ln.startswith("Images: stabilityai/sd-turbo") for ln in lines)
    argv = s.image_argv()
    assert argv[argv.index("--gpu") + 1] == "t4"
    names = argv[argv.index("--served-model-name") + 1 :]
    assert names == ["stabilityai/sd-turbo", "vision"]
    s, _ = session(5, "Tesla T4, 15360 MiB, 7.5, 550.54.15", images=False)
    assert s.image_preset is None and s.preset.gpu_memory_utilization == 0.90
    s, _ = session(3, "NVIDIA L4, 23034 MiB, 8.9, 550.54.15")
    assert s.image_preset is None and s.images_url is None
    started = time.monotonic()
    with pytest.raises(presets.PresetError, match="--no-images"):
        session(
            5,
            "Tesla T4, 15360 MiB, 7.5, 550.54.15",
            image_model="stabilityai/stable-diffusion-xl-base-1.0",
        )
    assert time.monotonic() - started < 5  # refused in preflight, before anything starts


def test_status_line_shows_the_image_queue_on_vision_nodes_only() -> None:
    from heady_node import status

    vision = status.snapshot(
        {"vllm:num_requests_running": 1, "heady_images:num_requests_running": 1,
         "heady_images:num_requests_waiting": 2}
    )  # fmt: skip
    line = status.status_line("12:00", 5, "vision", vision)
    assert line.endswith("| queue ? | images running 1 queue 2")
    plain = status.status_line(
        "12:00", 3, "code", status.snapshot({"vllm:num_requests_running": 1})
    )
    assert "images" not in plain
