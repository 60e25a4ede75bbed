"""Every role x GPU preset obeys the documented memory rule and yields sane vLLM arguments."""

import pytest

from heady_node import presets
from heady_node.gpu import GPU_CLASSES, GpuError, classify, detect_gpu, parse_nvidia_smi
from heady_node.roles import ROLES, nodes_for_role, role_for_node

COMBOS = [(r, g) for r in ROLES for g in GPU_CLASSES]


def test_roles_follow_node_numbers() -> None:
    assert [role_for_node(n) for n in range(1, 9)] == [
        "reasoning", "reasoning", "code", "code", "vision", "vision", "batch", "batch",
    ]  # fmt: skip
    assert nodes_for_role("vision") == (5, 6)
    for bad in (0, 9, -1, True, "1"):
        with pytest.raises(ValueError):
            role_for_node(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("role", "gpu_key"), COMBOS)
def test_every_preset_fits_its_gpu(role: str, gpu_key: str) -> None:
    gpu = GPU_CLASSES[gpu_key]
    p = presets.preset_for(role, gpu)
    # The rule: weights + KV for 2 full sequences + overhead <= 0.90 x GPU memory.
    kv = p.model.kv_bytes_per_token * p.max_model_len * presets.FULL_SEQS / presets.GIB
    overhead = presets.OVERHEAD_GIB + (presets.VISION_OVERHEAD_GIB if p.model.vision else 0)
    need = p.model.weights_gib + kv + overhead
    assert need == pytest.approx(presets.memory_estimate(p.model, p.max_model_len))
    assert need <= 0.90 * gpu.memory_gib, f"{p.model.repo} on {gpu.label}: {need:.1f} GiB"
    assert presets.kernels_supported(p.model, gpu)
    assert p.model.vision == (role == "vision"), "vision role needs a multimodal model"
    assert p.max_model_len >= 8192


@pytest.mark.parametrize(("role", "gpu_key"), COMBOS)
def test_engine_argv_is_vllm_serve(role: str, gpu_key: str) -> None:
    gpu = GPU_CLASSES[gpu_key]
    p = presets.preset_for(role, gpu)
    argv = presets.engine_argv(p, port=8000, api_key="tok", engine=["vllm", "serve"])
    assert argv[:3] == ["vllm", "serve", p.model.repo]
    opts = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert opts["--api-key"] == "tok"
    assert opts["--port"] == "8000"
    assert opts["--host"] == "127.0.0.1"  # only the tunnel is public
    assert int(opts["--max-model-len"]) == p.max_model_len
    assert opts["--dtype"] == ("auto" if gpu.bf16 else "half")
    assert opts.get("--quantization") == p.quantization
    assert "tok" not in presets.redact_argv(argv)


def test_rule_rejects_what_does_not_fit() -> None:
    t4 = GPU_CLASSES["t4"]
    big = presets.MODELS["Qwen/Qwen2.5-14B-Instruct"]  # 27 GiB of bf16 weights
    assert not presets.fits(big, 8192, t4)
    with pytest.raises(presets.PresetError, match="needs ~"):
        presets.preset_for("reasoning", t4, model="Qwen/Qwen2.5-14B-Instruct")
    with pytest.raises(presets.PresetError, match="AWQ"):
        presets.preset_for("reasoning", GPU_CLASSES["v100"], model="Qwen/Qwen2.5-7B-Instruct-AWQ")


def test_model_override_keeps_role_limits() -> None:
    p = presets.preset_for("batch", GPU_CLASSES["l4"], model="someone/custom-model")
    assert p.model.repo == "someone/custom-model"
    assert p.quantization is None  # vLLM reads it from the checkpoint
    known = presets.preset_for("code", GPU_CLASSES["a100-80"], model="Qwen/Qwen2.5-7B-Instruct")
    assert known.model.params_b == pytest.approx(7.61)


def test_weights_rule_matches_a_published_checkpoint() -> None:
    # Qwen2.5-Coder-7B-Instruct-GPTQ-Int4 is 5.59 GB on the Hub; the rule must not undercount.
    m = presets.MODELS["Qwen/Qwen2.5-Coder-7B-Instruct-GPTQ-Int4"]
    assert m.weights_gib * presets.GIB >= 5.59e9


def test_table_rows_cover_everything() -> None:
    rows = presets.table_rows()
    assert len(rows) == len(COMBOS)
    assert all(est <= bud for *_, est, bud in rows)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("Tesla T4, 15360 MiB", "t4"),
        ("Tesla V100-SXM2-16GB, 16384 MiB", "v100"),
        ("NVIDIA L4, 23034 MiB", "l4"),
        ("NVIDIA A100-SXM4-40GB, 40960 MiB", "a100-40"),
        ("NVIDIA A100-SXM4-80GB, 81920 MiB", "a100-80"),
        ("NVIDIA H100 80GB HBM3, 81559 MiB", "a100-80"),
        ("NVIDIA RTX A6000, 49140 MiB", "a100-40"),  # unknown: by memory
        ("Quadro P5000, 16384 MiB", "v100"),  # unknown 16 GB: the float16/GPTQ-safe class
    ],
)
def test_gpu_detection(line: str, key: str) -> None:
    gpu = detect_gpu(lambda argv: line + "\n")
    assert gpu.gpu_class.key == key


def test_gpu_errors_are_readable() -> None:
    with pytest.raises(GpuError, match="cannot parse"):
        parse_nvidia_smi("garbage")
    with pytest.raises(GpuError, match="smaller than any preset"):
        classify("Tiny GPU", 8.0)

    def missing(argv: list[str]) -> str:
        raise FileNotFoundError("nvidia-smi")

    with pytest.raises(GpuError, match="no NVIDIA GPU"):
        detect_gpu(missing)
