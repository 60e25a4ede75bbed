"""Fine-tuning's pure parts (no torch): training-file validation, the hyperparameter mapping,
the vLLM adapter rules on synthetic adapters, assistant-span masking, slugs, and the LoRA
resolver's fetch/cache against a real local HTTP server standing in for the gateway."""

from __future__ import annotations

import json
import struct
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from heady_node import guard
from heady_node.finetune import hparams
from heady_node.finetune.adapter import check_vllm_compatible, pack_dir
from heady_node.finetune.chatmask import IGNORE, TemplateError, assistant_spans, labels_for
from heady_node.finetune.resolver import AdapterCache, FetchError, lora_int_id, urllib_fetch
from heady_node.gpu import GPU_CLASSES
from heady_shared import ftlines, ftnames

BASE = "Qwen/Qwen2.5-3B-Instruct"


def ex(*turns: tuple[str, str], **extra: object) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


GOOD = ex(("system", "s"), ("user", "hi"), ("assistant", "hello"))


def lines(objs: list[object]) -> list[bytes]:
    return [json.dumps(o).encode() + b"\n" for o in objs]


# -- training file ----------------------------------------------------------------------------
def test_a_good_file_passes_and_counts_examples() -> None:
    v = ftlines.validate_file([*lines([GOOD] * 10), b"\n"])
    assert v.ok and v.examples == 10 and v.job_error() is None


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ("not json", "is not valid JSON"),
        ([1], "is not a JSON object"),
        ({"prompt": "x"}, "no `messages` list"),
        ({"messages": []}, "no `messages` list"),
        (ex(("robot", "x"), ("assistant", "y")), "messages[0].role is 'robot'"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "content is"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url"}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "not a text part",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": 2},
                ]
            },
            "weight is 2",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": True},
                ]
            },
            "weight is True",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x", "weight": 1},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "only allowed on assistant",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": 0},
                ]
            },
            "nothing to train on",
        ),
        (ex(("user", "x")), "nothing to train on"),
    ],
)
def test_a_bad_example_names_its_line(obj: object, fragment: str) -> None:
    raw = [obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()]
    v = ftlines.validate_file([*lines([GOOD] * 10), b"", *raw])
    assert not v.ok and v.errors[0].line == 12, v.errors
    assert fragment in v.errors[0].message and v.errors[0].message.startswith("Line 12: ")
    err = v.job_error()
    assert err == {
        "code": "invalid_training_file",
        "message": v.errors[0].message,
        "param": "training_file",
    }


def test_tool_calls_and_text_parts_are_valid() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    obj = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
            call,
            {"role": "tool", "content": "r", "tool_call_id": "1"},
            {"role": "assistant", "content": "done"},
        ],
        "tools": [],
    }
    assert ftlines.check_example(obj) is None


def test_too_few_examples_and_too_many_tokens() -> None:
    v = ftlines.validate_file(lines([GOOD] * 9))
    assert (
        not v.ok
        and v.errors[0].line is None
        and "9 valid examples; at least 10" in (v.errors[0].message)
    )
    assert ftlines.validate_file(lines([GOOD] * 3), min_examples=3).ok
    long = ex(("user", "x " * 50), ("assistant", "y"))
    v = ftlines.validate_file(
        lines([GOOD] * 10 + [long]),
        count_tokens=lambda e: sum(len(str(m["content"]).split()) for m in e["messages"]),
        max_tokens=20,
    )
    assert [e.line for e in v.errors] == [11] and "51 tokens long" in v.errors[0].message
    assert "context is 20 tokens" in v.errors[0].message


def test_a_template_that_refuses_an_example_names_its_line() -> None:
    def count(e: dict) -> int:
        if e["messages"][0]["role"] == "system":
            raise ValueError("System role not supported")
        return 3

    v = ftlines.validate_file(
        lines([ex(("user", "u"), ("assistant", "a"))] * 10 + [GOOD]),
        count_tokens=count,
        max_tokens=10,
    )
    assert [e.line for e in v.errors] == [11]
    assert "chat template: System role not supported" in v.errors[0].message


def test_errors_are_capped_and_the_job_error_says_how_many_more() -> None:
    v = ftlines.validate_file([b"x"] * 500)
    assert len(v.errors) == ftlines.MAX_ERRORS
    assert "(99 more problems in the file)" in str(v.job_error()["message"])


# -- names and slugs --------------------------------------------------------------------------
def test_the_resolver_finds_an_adapter_by_its_ft_name_or_the_gateways_slug(tmp_path) -> None:
    # Names and slugs themselves are heady_shared.ftnames' (tests/unit/test_finetune_names.py);
    # here: the node's cache agrees with the gateway, which asks vLLM for the slug.
    name = ftnames.ft_model_name(BASE, "heady", "0123abcd")
    cache = AdapterCache(tmp_path, "https://gw.example", "cred")
    assert (
        cache.path_for(name) == cache.path_for(ftnames.slug(name)) == tmp_path / ftnames.slug(name)
    )
    assert cache.path_for(BASE) is None and cache.path_for("../../etc") is None
    assert lora_int_id(name) == lora_int_id(name) > 0


# -- hyperparameters --------------------------------------------------------------------------
T4, L4, A100 = GPU_CLASSES["t4"], GPU_CLASSES["l4"], GPU_CLASSES["a100-80"]


def test_auto_values() -> None:
    assert [hparams.auto_epochs(n) for n in (10, 20, 34, 100, 5000)] == [10, 5, 3, 3, 3]
    assert [hparams.auto_batch(n) for n in (10, 64, 100, 500, 10_000)] == [1, 2, 2, 8, 16]
    p = hparams.plan(
        hparams.Requested(),
        served_base=BASE,
        n_examples=100,
        max_length=8192,
        seq_tokens=512,
        seed=1,
        gpu=T4,
    )
    assert (p.epochs, p.batch_size, p.lr_multiplier, p.learning_rate) == (3, 2, 1.0, 2e-4)
    assert p.reported() == {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert hparams.total_steps(p, 100) == 150


def test_precision_and_qlora_follow_the_card() -> None:
    kw = {"n_examples": 1000, "max_length": 16384, "seq_tokens": 1024, "seed": 5}
    t4 = hparams.plan(hparams.Requested(), served_base=BASE, gpu=T4, **kw)
    assert t4.precision == "fp16" and not t4.load_in_4bit and t4.train_repo == BASE
    # The T4 reasoning base (7B AWQ) trains its 16-bit sibling in 4 bits; the adapter names AWQ.
    awq = "Qwen/Qwen2.5-7B-Instruct-AWQ"
    q = hparams.plan(hparams.Requested(), served_base=awq, gpu=T4, **kw)
    assert q.load_in_4bit and q.precision == "fp16" and q.train_repo == "Qwen/Qwen2.5-7B-Instruct"
    assert q.served_base == awq and q.learning_rate == 1e-4
    l4 = hparams.plan(hparams.Requested(), served_base=awq, gpu=L4, **kw)
    assert l4.precision == "bf16" and not l4.load_in_4bit
    big = hparams.plan(hparams.Requested(), served_base="Qwen/Qwen2.5-14B-Instruct", gpu=L4, **kw)
    assert big.load_in_4bit and big.learning_rate == 5e-5


BASE7 = "Qwen/Qwen2.5-7B-Instruct"


def test_batch_is_micro_times_accumulation_exactly() -> None:
    for batch in (1, 6, 12, 64, 256):
        p = hparams.plan(
            hparams.Requested(batch_size=batch),
            served_base=BASE7,
            n_examples=500,
            max_length=16384,
            seq_tokens=16000,
            seed=0,
            gpu=T4,
        )
        assert p.micro_batch * p.grad_accum == batch and p.micro_batch >= 1
    small = hparams.plan(
        hparams.Requested(batch_size=64),
        served_base=BASE,
        n_examples=500,
        max_length=8192,
        seq_tokens=256,
        seed=0,
        gpu=A100,
    )
    assert small.micro_batch == 64 and small.grad_accum == 1
    long = hparams.plan(
        hparams.Requested(batch_size=64),
        served_base=BASE,
        n_examples=500,
        max_length=8192,
        seq_tokens=8192,
        seed=0,
        gpu=T4,
    )
    assert long.micro_batch < 64 and long.micro_batch * long.grad_accum == 64


def test_lora_settings_are_what_vllm_serves() -> None:
    p = hparams.plan(
        hparams.Requested(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5),
        served_base=BASE,
        n_examples=40,
        max_length=8192,
        seq_tokens=100,
        seed=9,
        gpu=T4,
    )
    assert (p.epochs, p.batch_size, p.learning_rate, p.seed) == (2, 4, 1e-4, 9)
    assert p.lora_rank in hparams.VLLM_LORA_RANKS and p.lora_rank <= 16
    assert "lm_head" not in p.target_modules and "embed_tokens" not in p.target_modules
    assert hparams.TrainPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize(
    ("hp", "param"),
    [
        ({"n_epochs": 0}, "hyperparameters.n_epochs"),
        ({"n_epochs": 51}, "hyperparameters.n_epochs"),
        ({"n_epochs": 2.5}, "hyperparameters.n_epochs"),
        ({"batch_size": 257}, "hyperparameters.batch_size"),
        ({"batch_size": True}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": 0}, "hyperparameters.learning_rate_multiplier"),
        ({"learning_rate_multiplier": "high"}, "hyperparameters.learning_rate_multiplier"),
        ({"warmup": 3}, "hyperparameters.warmup"),
        ([1], "hyperparameters"),
    ],
)
def test_bad_hyperparameters_name_the_field(hp: object, param: str) -> None:
    with pytest.raises(hparams.HyperparameterError) as info:
        hparams.parse_requested(hp)
    assert info.value.param == param


JOB = {"model": BASE, "training_file": "file-abc"}


def test_a_job_request_is_checked_and_normalised() -> None:
    req = ftlines.check_job_request(
        {
            **JOB,
            "suffix": "heady",
            "seed": 0,
            "validation_file": "file-v",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
            "metadata": {"team": "x"},
        }
    )
    assert (req.model, req.suffix, req.seed, req.validation_file) == (BASE, "heady", 0, "file-v")
    assert req.hyperparameters == hparams.Requested(n_epochs=2)
    assert req.method() == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {
                "batch_size": "auto",
                "learning_rate_multiplier": "auto",
                "n_epochs": 2,
            }
        },
    }
    old = ftlines.check_job_request({**JOB, "hyperparameters": {"batch_size": 8}})
    assert old.hyperparameters.batch_size == 8 and old.seed is None and old.metadata is None
    assert ftlines.check_job_request(JOB).hyperparameters == hparams.Requested()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], "body"),
        ({"training_file": "f"}, "model"),
        ({"model": BASE}, "training_file"),
        ({**JOB, "validation_file": 3}, "validation_file"),
        ({**JOB, "suffix": "a:b"}, "suffix"),
        ({**JOB, "suffix": "x" * 65}, "suffix"),
        ({**JOB, "suffix": "a/b"}, "suffix"),
        ({**JOB, "seed": -1}, "seed"),
        ({**JOB, "seed": 2**31}, "seed"),
        ({**JOB, "seed": True}, "seed"),
        ({**JOB, "method": {"type": "dpo"}}, "method.type"),
        ({**JOB, "method": {"type": "supervised", "supervised": 3}}, "method.supervised"),
        (
            {
                **JOB,
                "hyperparameters": {},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
        ),
        ({**JOB, "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({**JOB, "integrations": [{"type": "wandb"}]}, "integrations"),
        ({**JOB, "metadata": {"k": 1}}, "metadata"),
        ({**JOB, "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ],
)
def test_a_bad_job_request_names_the_field(body: object, param: str) -> None:
    with pytest.raises(ftlines.HyperparameterError) as info:
        ftlines.check_job_request(body)
    assert info.value.param == param and str(info.value)


def test_seed_for_a_job_is_stable() -> None:
    assert hparams.seed_for("ftjob-1") == hparams.seed_for("ftjob-1") != hparams.seed_for("ftjob-2")
    assert 0 <= hparams.seed_for("x") < 2**31


# -- adapter rules (synthetic adapters) -------------------------------------------------------
def write_adapter(d: Path, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": BASE,
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": None,
        "bias": "none",
        "use_dora": False,
        **(cfg or {}),
    }
    (d / "adapter_config.json").write_text(json.dumps(config))
    pre = "base_model.model.model.layers.0.self_attn"
    tensors = (
        tensors
        if tensors is not None
        else {f"{pre}.q_proj.lora_A.weight": [16, 64], f"{pre}.q_proj.lora_B.weight": [64, 16]}
    )
    header, off = {}, 0
    for name, shape in tensors.items():
        n = 2 * shape[0] * shape[1]
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * off)
    return d


def test_a_plain_lora_adapter_is_compatible(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a", {"init_lora_weights": "gaussian"})
    assert check_vllm_compatible(d, BASE) == []
    assert check_vllm_compatible(d, BASE, max_rank=8) == [
        "rank 16 exceeds the node's --max-lora-rank 8"
    ]
    assert "the served base is 'other'" in check_vllm_compatible(d, "other")[0]


@pytest.mark.parametrize(
    ("cfg", "tensors", "fragment"),
    [
        ({"r": 12}, None, "rank 12 is not one of vLLM's"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, None, "embedding/lm_head layers"),
        ({"target_modules": ".*proj"}, None, "regex"),
        ({"peft_type": "IA3"}, None, "peft_type"),
        ({"use_dora": True}, None, "DoRA"),
        ({"bias": "all"}, None, "bias"),
        ({"lora_bias": True}, None, "lora_bias is set"),
        ({"init_lora_weights": "pissa"}, None, "changes the base weights"),
        ({"layer_replication": [[0, 2]]}, None, "layer_replication"),
        ({}, {"base_model.model.lm_head.weight": [64, 64]}, "embedding/lm_head"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": [16, 64]}, "embedding"),
        ({}, {"x.q_proj.lora_A.weight": [8, 64]}, "rank 16 expected first"),
        ({}, {"x.q_proj.weight": [64, 64]}, "not a lora_A/lora_B"),
        ({}, {}, "holds no tensors"),
    ],
)
def test_what_vllm_refuses_is_named(tmp_path: Path, cfg, tensors, fragment) -> None:
    d = write_adapter(tmp_path / "a", cfg, tensors)
    problems = check_vllm_compatible(d, BASE)
    assert any(fragment in p for p in problems), problems


def test_added_tokens_and_missing_files_are_refused(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a")
    (d / "added_tokens.json").write_text("{}")
    assert any("added_tokens.json" in p for p in check_vllm_compatible(d, BASE))
    (d / "adapter_model.safetensors").unlink()
    assert any("missing" in p for p in check_vllm_compatible(d, BASE))
    assert check_vllm_compatible(tmp_path / "nothing", BASE) == ["adapter_config.json is missing"]


# -- masking ----------------------------------------------------------------------------------
def chatml(msgs, gen: bool) -> str:
    text = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in msgs)
    return text + ("<s>assistant\n" if gen else "")


def test_spans_cover_weighted_assistant_turns_and_their_end_marker() -> None:
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    text, spans = assistant_spans(chatml, msgs)
    assert [text[a:b] for a, b in spans] == ["d</s>\n"]
    # Tokens: a label only where the token starts inside a span; specials (0-width) never.
    offsets = [
        (0, 3),
        (3, 8),
        (spans[0][0], spans[0][0] + 1),
        (spans[0][0] + 1, spans[0][1]),
        (0, 0),
    ]
    assert labels_for([1, 2, 3, 4, 5], offsets, spans) == [IGNORE, IGNORE, 3, 4, IGNORE]


def test_a_template_that_rewrites_history_is_refused() -> None:
    def odd(msgs, gen: bool) -> str:
        return f"{len(msgs)}:" + chatml(msgs, gen)

    with pytest.raises(TemplateError):
        assistant_spans(
            odd, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


# -- resolver: fetch into the cache -----------------------------------------------------------
CRED = "hn1.7.0123456789abcdef0123456789abcdef"


class _Gateway(ThreadingHTTPServer):
    adapters: dict[str, bytes]
    seen: list[tuple[str, str | None]]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:
        srv: _Gateway = self.server  # type: ignore[assignment]
        srv.seen.append((self.path, self.headers.get("authorization")))
        slug = self.path.removeprefix("/api/nodes/v1/adapters/")
        body = (
            srv.adapters.get(slug)
            if self.headers.get("authorization") == f"Bearer {CRED}"
            else None
        )
        self.send_response(200 if body is not None else 404)
        self.send_header("content-length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def gateway() -> Iterator[_Gateway]:
    srv = _Gateway(("127.0.0.1", 0), _Handler)
    srv.adapters, srv.seen = {}, []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_resolver_fetches_once_into_a_slug_dir(gateway: _Gateway, tmp_path: Path) -> None:
    name = ftnames.ft_model_name(BASE, "sfx", "0001")
    slug = ftnames.slug(name)
    gateway.adapters[slug] = pack_dir(write_adapter(tmp_path / "src"))
    cache = AdapterCache(
        tmp_path / "cache", f"http://127.0.0.1:{gateway.server_port}", CRED, urllib_fetch
    )
    cache.cache_dir.mkdir()
    path = cache.get(BASE, name)
    assert path == tmp_path / "cache" / slug
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert cache.get(BASE, name) == path and len(gateway.seen) == 1  # cached
    assert gateway.seen[0] == (f"/api/nodes/v1/adapters/{slug}", f"Bearer {CRED}")
    assert [p.name for p in cache.cache_dir.iterdir()] == [slug]  # no .part leftovers
    # Unknown name: the gateway's 404 -> None (vLLM answers "does not exist").
    assert cache.get(BASE, name.replace(":0001", ":0002")) is None
    assert cache.get(BASE, "Qwen/Qwen2.5-3B-Instruct") is None  # not an ft: name: no request
    assert len(gateway.seen) == 2
    # A node of another base: the cached adapter is not served there.
    assert cache.get("Qwen/Qwen2.5-7B-Instruct", name) is None


def test_resolver_refuses_bad_archives(gateway: _Gateway, tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path / "cache", f"http://127.0.0.1:{gateway.server_port}", CRED)
    cache.cache_dir.mkdir()
    src = write_adapter(tmp_path / "src")
    (src / "../evil").resolve().write_text("x")
    bad = {
        "wrong-base": pack_dir(write_adapter(tmp_path / "wb", {"base_model_name_or_path": "x"})),
        "extra-file": pack_dir(
            src, ("adapter_config.json", "adapter_model.safetensors", "../evil")
        ),
        "not-tar": b"hello",
    }
    for i, (why, body) in enumerate(bad.items()):
        name = ftnames.ft_model_name(BASE, why, f"{i:04x}")
        gateway.adapters[ftnames.slug(name)] = body
        with pytest.raises((FetchError, tarfile.TarError)):
            cache.get(BASE, name)
    assert list(cache.cache_dir.iterdir()) == []  # nothing half-written stays
    assert not (tmp_path / "cache" / "evil").exists()


def test_the_guard_hides_vllms_runtime_lora_routes() -> None:
    # LoRA nodes run with VLLM_ALLOW_RUNTIME_LORA_UPDATING (for the resolver), which mounts
    # /v1/load_lora_adapter: loading any path or hub id must never be reachable from outside.
    digest = guard.token_digest("tok")
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter/"):
        assert guard.decide(path, "Bearer tok", digest) == guard.NOT_EXPOSED
    assert guard.decide("/v1/chat/completions", "Bearer tok", digest) is None


def test_a_train_lease_keeps_seed_zero_and_only_gateway_paths() -> None:
    from heady_node.finetune.runner import TrainLease

    base = {"id": "l1", "token": "t", "job_id": "ftjob-1", "model": BASE}
    lease = TrainLease.parse(
        {
            **base,
            "seed": 0,
            "checkpoint": "https://evil.example/x",
            "validation_input": "/api/nodes/v1/leases/l1/input/validation",
        }
    )
    assert lease.seed == 0 and lease.checkpoint is None
    assert lease.input == "/api/nodes/v1/leases/l1/input"
    assert lease.validation_input == "/api/nodes/v1/leases/l1/input/validation"
    assert TrainLease.parse(base).seed == hparams.seed_for("ftjob-1")
    other = TrainLease.parse({**base, "input": "/api/nodes/v1/leases/l2/input"})
    assert other.input == "/api/nodes/v1/leases/l1/input"  # another lease's path: not followed
