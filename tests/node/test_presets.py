"""Every role x GPU preset obeys the documented memory and image rules and yields vLLM arguments
vLLM 0.33 accepts; GPU detection covers the cards Colab offers and falls back safely."""

import json

import pytest

from heady_node import presets
from heady_node.gpu import (
    GPU_CLASSES,
    GpuError,
    classify,
    detect_gpu,
    parse_cuda_version,
    parse_nvidia_smi,
)
from heady_node.roles import ROLES, role_for_node
from heady_shared.routes import DEFAULT_POOLS

COMBOS = [(r, g) for r in ROLES for g in GPU_CLASSES]


def test_roles_follow_node_numbers() -> None:
    assert [role_for_node(n) for n in range(1, 9)] == [
        "reasoning", "reasoning", "code", "code", "vision", "vision", "batch", "batch",
    ]  # fmt: skip
    assert DEFAULT_POOLS["vision"].pair == (5, 6)


def test_gpu_classes_are_the_cards_colab_offers() -> None:
    assert set(GPU_CLASSES) == {"t4", "l4", "a100-40", "a100-80", "h100", "rtx-pro-6000"}
    assert all(c.compute_capability >= 7.5 for c in GPU_CLASSES.values())
    assert [c.key for c in GPU_CLASSES.values() if not c.bf16] == ["t4"]


@pytest.mark.parametrize(("role", "gpu_key"), COMBOS)
def test_every_preset_fits_its_gpu(role: str, gpu_key: str) -> None:
    gpu = GPU_CLASSES[gpu_key]
    p = presets.preset_for(role, gpu)
    # The rule: weights + KV for 2 full sequences + overhead <= 0.90 x GPU memory.
    kv = p.model.kv_bytes_per_token * p.max_model_len * presets.FULL_SEQS / presets.GIB
    # Text presets also hold LoRA slots (4 x rank 16: a few hundred MB, research §3.5).
    extra = presets.VISION_OVERHEAD_GIB if p.model.vision else presets.LORA_OVERHEAD_GIB
    overhead = presets.OVERHEAD_GIB + extra
    need = p.model.weights_gib + kv + overhead
    assert need == pytest.approx(presets.memory_estimate(p.model, p.max_model_len))
    assert need <= 0.90 * gpu.memory_gib, f"{p.model.repo} on {gpu.label}: {need:.1f} GiB"
    assert p.model.vision == (role == "vision"), "vision role needs a multimodal model"
    assert p.max_model_len >= 8192
    if p.vision:  # the image rule: images x tokens per image <= half the context
        assert p.vision.images_per_prompt * p.vision.tokens_per_image <= p.max_model_len // 2


@pytest.mark.parametrize(("role", "gpu_key"), COMBOS)
def test_engine_argv_is_what_vllm_0_33_accepts(role: str, gpu_key: str) -> None:
    gpu = GPU_CLASSES[gpu_key]
    p = presets.preset_for(role, gpu)
    names = presets.served_model_names(p.model.repo, 1)
    argv = presets.engine_argv(p, port=8000, engine=["vllm", "serve"], served_names=names)
    assert argv[:3] == ["vllm", "serve", p.model.repo]
    i = argv.index("--served-model-name")
    assert argv[i + 1 : i + 1 + len(names)] == list(names)
    assert "--api-key" not in argv  # a token in argv is visible to every user of the host
    env = presets.engine_env(p, "tok")
    assert env["VLLM_API_KEY"] == env["HEADY_NODE_TOKEN"] == "tok"
    assert ("VLLM_MEDIA_URL_ALLOW_REDIRECTS" in env) == (role == "vision")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # only the tunnel is public
    assert argv[argv.index("--max-model-len") + 1] == str(p.max_model_len)
    assert argv[argv.index("--dtype") + 1] == ("auto" if gpu.bf16 else "half")
    assert argv[argv.index("--middleware") + 1] == "heady_node.guard.NodeGuard"
    assert "--quantization" not in argv  # vLLM detects AWQ/GPTQ from the checkpoint
    if p.vision:
        limits = json.loads(argv[argv.index("--limit-mm-per-prompt") + 1])
        assert limits == {"image": p.vision.images_per_prompt, "video": 0}
        kwargs = json.loads(argv[argv.index("--mm-processor-kwargs") + 1])
        assert kwargs == {"max_pixels": presets.VISION_MAX_PIXELS}
        assert argv[argv.index("--allowed-media-domains") + 1 :] == [presets.NO_MEDIA_DOMAIN]
    else:
        assert "--limit-mm-per-prompt" not in argv and "--allowed-media-domains" not in argv
    caps = presets.served_capabilities(p)
    if role == "vision":  # no adapters on the vision pair
        assert p.lora is None and "--enable-lora" not in argv and "--max-loras" not in argv
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env and "lora" not in caps
    else:
        assert argv[argv.index("--enable-lora") + 1] == "--max-loras"
        assert argv[argv.index("--max-loras") + 1] == "4"
        assert argv[argv.index("--max-lora-rank") + 1] == "16"
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
        assert caps == ("chat", "lora") and env["HEADY_NODE_CAPABILITIES"] == "chat,lora"
        assert "HEADY_GATEWAY_URL" not in env and "HEADY_LORA_CACHE_DIR" not in env


def test_lora_env_carries_what_the_resolver_plugin_needs() -> None:
    from heady_node import batch_worker
    from heady_node.finetune import hparams, resolver
    from heady_shared import capabilities

    assert presets.LORA_RANK == hparams.LORA_RANK  # the trainer's rank fits the served slots
    assert presets.LORA_CACHE_ENV == resolver.CACHE_ENV
    assert presets.GATEWAY_ENV == batch_worker.GATEWAY_ENV
    assert presets.CREDENTIAL_ENV == batch_worker.CREDENTIAL_ENV
    assert capabilities.LORA == "lora"
    p = presets.preset_for("batch", GPU_CLASSES["t4"])
    env = presets.engine_env(
        p, "tok", lora_cache_dir="/c", gateway_url="https://gw.example", credential="cred"
    )
    assert env["HEADY_LORA_CACHE_DIR"] == "/c"
    assert env["HEADY_GATEWAY_URL"] == "https://gw.example"
    assert env["HEADY_NODE_CREDENTIAL"] == "cred"
    v = presets.preset_for("vision", GPU_CLASSES["t4"])
    venv = presets.engine_env(
        v, "tok", lora_cache_dir="/c", gateway_url="https://gw.example", credential="cred"
    )
    assert not {"HEADY_LORA_CACHE_DIR", "HEADY_GATEWAY_URL", "HEADY_NODE_CREDENTIAL"} & set(venv)


def test_vision_media_domains_are_the_operators_list() -> None:
    p = presets.preset_for("vision", GPU_CLASSES["l4"])
    argv = presets.engine_argv(
        p, port=1, engine=["vllm", "serve"], media_domains=("img.example.com", "b.io")
    )
    assert argv[argv.index("--allowed-media-domains") + 1 :] == ["img.example.com", "b.io"]
    assert presets.VISION_ENV == {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}


def test_served_names_are_the_repo_and_every_role_the_node_may_answer_for() -> None:
    repo = "Qwen/Qwen2.5-7B-Instruct-AWQ"
    # Nodes 1-2 are every role's fallback (heady_shared.routes.DEFAULT_POOLS).
    assert presets.served_model_names(repo, 1) == (repo, "reasoning", "code", "vision", "batch")
    assert presets.served_model_names(repo, 2)[1:] == ("reasoning", "code", "vision", "batch")
    assert presets.served_model_names(repo, 4) == (repo, "code")
    assert presets.served_model_names(repo, 7) == (repo, "batch")
    assert presets.served_model_names("batch", 7) == ("batch",)  # no duplicate names


def test_dtype_follows_the_real_card_not_its_class() -> None:
    # A 24 GB Turing card (no bf16) placed in the L4 class must still run float16.
    p = presets.preset_for("batch", GPU_CLASSES["l4"], bf16=False)
    assert p.dtype == "half"
    assert presets.preset_for("batch", GPU_CLASSES["l4"]).dtype == "auto"


def test_rule_rejects_what_does_not_fit() -> None:
    t4 = GPU_CLASSES["t4"]
    big = presets.MODELS["Qwen/Qwen2.5-14B-Instruct"]  # 27 GiB of bf16 weights
    assert not presets.fits(big, 8192, t4)
    with pytest.raises(presets.PresetError, match="needs ~"):
        presets.preset_for("reasoning", t4, model="Qwen/Qwen2.5-14B-Instruct")


def test_model_override_keeps_role_limits() -> None:
    p = presets.preset_for("batch", GPU_CLASSES["l4"], model="someone/custom-model")
    assert p.model.repo == "someone/custom-model"
    assert p.quantization is None
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
    ("line", "key", "known"),
    [
        ("Tesla T4, 15360 MiB, 7.5, 550.54.15", "t4", True),
        ("NVIDIA L4, 23034 MiB, 8.9, 550.54.15", "l4", True),
        ("NVIDIA A100-SXM4-40GB, 40960 MiB, 8.0, 550.54.15", "a100-40", True),
        ("NVIDIA A100-SXM4-80GB, 81920 MiB, 8.0, 550.54.15", "a100-80", True),
        ("NVIDIA H100 80GB HBM3, 81559 MiB, 9.0, 550.54.15", "h100", True),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition, 97887 MiB, 12.0, 580.82.07",
         "rtx-pro-6000", True),
        # Unknown cards: the largest class their memory allows, printed with the real name.
        ("NVIDIA RTX A6000, 49140 MiB, 8.6, 550.54.15", "a100-40", False),
        ("Quadro RTX 6000, 24576 MiB, 7.5, 550.54.15", "l4", False),
        ("NVIDIA L40S, 46068 MiB, 8.9, 550.54.15", "a100-40", False),
        ("NVIDIA GeForce RTX 4090, 24564 MiB, 8.9, 550.54.15", "l4", False),
        # A MIG slice of an A100 is not a whole A100: classified by its memory.
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb, 19968 MiB, 8.0, 550.54.15", "t4", False),
    ],
)  # fmt: skip
def test_gpu_detection(line: str, key: str, known: bool) -> None:
    gpu = detect_gpu(lambda argv: line + "\n")
    assert (gpu.gpu_class.key, gpu.known) == (key, known)
    text = gpu.describe()
    assert gpu.name in text
    assert f"-> preset class {key}" in text if known else f"using class {key}" in text
    if not known:
        assert "not a card with its own presets" in text


def test_unknown_turing_card_keeps_float16() -> None:
    gpu = detect_gpu(lambda argv: "Quadro RTX 6000, 24576 MiB, 7.5, 550.54.15\n")
    p = presets.preset_for("code", gpu.gpu_class, bf16=gpu.bf16)
    assert (gpu.gpu_class.key, p.dtype) == ("l4", "half")


def test_v100_and_older_are_refused_with_the_reason() -> None:
    with pytest.raises(GpuError, match=r"V100.*compute capability 7\.0.*7\.5 or higher"):
        detect_gpu(lambda argv: "Tesla V100-SXM2-16GB, 16384 MiB, 7.0, 550.54.15\n")
    with pytest.raises(GpuError, match=r"compute capability 6\.1"):
        classify("Tesla P4", 7680 / 1024, 6.1)


def test_gpu_errors_are_readable() -> None:
    with pytest.raises(GpuError, match="cannot parse"):
        parse_nvidia_smi("garbage")
    with pytest.raises(GpuError, match="cannot parse"):
        parse_nvidia_smi("Tesla T4, 15360 MiB")  # no compute_cap field: driver too old
    with pytest.raises(GpuError, match="smaller than any preset"):
        classify("Tiny GPU", 8.0, 8.6)

    def missing(argv: list[str]) -> str:
        raise FileNotFoundError("nvidia-smi")

    with pytest.raises(GpuError, match="no NVIDIA GPU"):
        detect_gpu(missing)


def test_cuda_version_from_the_nvidia_smi_banner() -> None:
    banner = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |"
    assert parse_cuda_version(banner) == "12.4"
    assert parse_cuda_version("no banner") is None
