"""Fine-tuning jobs end to end: the official `openai` SDK against the gateway in the real
offline runtime (workerd + Pyodide, R2 and D1 from miniflare, migrations 0001-0002 applied by
the harness), a training node played over HTTP exactly per the node API contract
(docs/fine-tuning-jobs.md, "Node API for train work": lease, input, events, checkpoint and
adapter uploads, heartbeat, commit) with node 7's credential, and the served result: an `ft:`
model answered by a simulated node with vLLM's LoRA semantics (sim.node.lora) that the cron
learned serves LoRA on the model's base.

The node is played by httpx rather than heady_node's runner: the runner trains with torch
(tests/torch run it against its own in-test gateway); here the gateway's side is under test.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from harness.gateway import Gateway, build_config
from heady_shared import capabilities as caps
from heady_shared.ftnames import slug
from heady_shared.nodeauth import node_credential
from sim.fleet import NODE_MODELS, Fleet
from sim.node.lora import LoraRegistry, gateway_resolver
from tests.e2e.conftest import API_KEY, fleet_bindings

NODE_SECRET = "e2e-node-secret-ft-7a1b2c"
OTHER_KEY = "other-key"
PAGER_KEY = "pager-key-for-ft-lists"
BASE = NODE_MODELS[7]  # what the batch pair serves: the base a job trains and LoRA serves
LEASES = "/api/nodes/v1/leases"
TOKEN = "x-heady-lease-token"


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Iterator[Gateway]:
    bindings = fleet_bindings(
        fleet,
        GATEWAY_API_KEYS=f"{OTHER_KEY},{API_KEY},{PAGER_KEY}",
        NODE_SECRET=NODE_SECRET,
        # A node's first request for an adapter fetches it from this gateway before answering
        # (the resolver): more than the shared fixture's 2 s on a loaded machine. Production's
        # default is 120 s.
        ATTEMPT_TIMEOUT_S="30",
        FT_LEASE_S="6",
        FT_HEARTBEAT_S="1",
    )
    with Gateway(build_config(bindings=bindings)) as g:
        yield g


def sdk(gw: Gateway, key: str = API_KEY, role: str = "batch") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gw.url}/api/heavy/{role}/v1", api_key=key, max_retries=0, timeout=30
    )


def node(gw: Gateway, n: int = 7) -> httpx.Client:
    """A training node's HTTP client: its node credential, as heady_node sends it."""
    auth = {"authorization": f"Bearer {node_credential(NODE_SECRET, n)}"}
    return httpx.Client(base_url=gw.url, headers=auth, timeout=30)


def training_file(n: int = 12) -> bytes:
    lines = [
        {
            "messages": [
                {"role": "system", "content": "You are Heady."},
                {"role": "user", "content": f"pattern {i}?"},
                {"role": "assistant", "content": f"heady pattern {i}"},
            ]
        }
        for i in range(n)
    ]
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def adapter_files(base: str, rank: int = 8, hidden: int = 16) -> dict[str, bytes]:
    """An adapter in the form vLLM loads: adapter_config.json (LORA, the served base, explicit
    target modules) + adapter_model.safetensors with one lora_A/lora_B pair (zeros)."""
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "bias": "none",
    }
    size = rank * hidden * 4
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [rank, hidden],
                                    "data_offsets": [0, size]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [hidden, rank],
                                    "data_offsets": [size, 2 * size]},
    }  # fmt: skip
    raw = json.dumps(header).encode()
    weights = struct.pack("<Q", len(raw)) + raw + bytes(2 * size)
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": weights,
    }


def adapter_tar(base: str) -> bytes:
    return _tar(adapter_files(base))


def lease_train(nc: httpx.Client, models: list[str], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = nc.post(LEASES, json={"models": models, "idle": True, "kinds": ["train"]})
        if r.status_code == 200:
            return r.json()["lease"]
        assert r.status_code == 204, r.text
        assert time.monotonic() < deadline, "no train lease offered"
        time.sleep(0.3)


def learn(gw: Gateway) -> None:
    """A cron tick that probes every node (health forgotten first: a healthy node is
    otherwise probed only once per PROBE_UP_EVERY_S), so it learns what each serves now."""
    gw.reset()
    gw.scheduled()


def chats(fleet: Fleet) -> list[int]:
    """The nodes that got a chat request (probes and model lists aside)."""
    return [n for n in range(1, 9) for r in fleet.requests(n) if r.path == "/v1/chat/completions"]


@contextmanager
def lora_on_the_batch_pair(gw: Gateway, fleet: Fleet, cache: Path) -> Iterator[None]:
    """vLLM with --enable-lora on the batch pair (the sim's LoRA registry, whose resolver is
    heady_node's: it fetches the adapter from the gateway by the slug vLLM is asked for and
    checks it against the served base), reported as the `lora` capability; the cron learns it.
    After the block the fleet is plain again, and the cron knows it."""
    try:
        for n in (7, 8):
            cred = node_credential(NODE_SECRET, n)
            resolver = gateway_resolver(gw.url, cred, cache / f"lora-{n}")
            fleet.node(n).loras = LoraRegistry(BASE, [resolver])
            fleet.set_capabilities(n, [caps.CHAT, caps.LORA])
        learn(gw)
        yield
    finally:
        for n in (7, 8):
            fleet.node(n).loras = None
        fleet.reset()
        learn(gw)


def served_lora(fleet: Fleet, client: openai.OpenAI, ask: dict, name: str) -> int:
    """`ask` answered by one of the batch pair, the node it names: vLLM echoes the LoRA it
    served, and was sent the slug `name`, never the ft: name."""
    answer = client.chat.completions.with_raw_response.create(**ask)
    served_by = int(answer.headers["x-heady-node"])
    assert served_by in (7, 8) and answer.parse().model == name
    sent = [r for r in fleet.requests(served_by) if r.path == "/v1/chat/completions"]
    assert json.loads(sent[-1].body)["model"] == name
    return served_by


def upload(client: openai.OpenAI, data: bytes) -> str:
    return client.files.create(file=("heady.jsonl", data), purpose="fine-tune").id


def test_a_job_trains_is_listed_and_its_model_is_served_to_its_key_only(
    gw: Gateway, fleet: Fleet, tmp_path: Path
) -> None:
    c = sdk(gw)
    data = training_file()
    fid = upload(c, data)
    job = c.fine_tuning.jobs.create(
        model=BASE,
        training_file=fid,
        suffix="heady",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.status == "validating_files" and job.fine_tuned_model is None
    assert job.seed == 7 and job.hyperparameters.n_epochs == 2

    nc = node(gw)
    # A node whose model is not the base is offered nothing; a node outside the batch pair
    # (TRAIN_NODES unset) neither.
    assert nc.post(LEASES, json={"models": ["other/model"], "kinds": ["train"]}).status_code == 204
    with node(gw, 3) as n3:
        assert n3.post(LEASES, json={"models": [BASE], "kinds": ["train"]}).status_code == 204
    lease = lease_train(nc, [BASE])
    assert lease["kind"] == "train" and lease["job_id"] == job.id and lease["model"] == BASE
    assert lease["id"].startswith("ftlease-") and lease["seed"] == 7
    assert lease["fine_tuned_model"] == f"ft:{BASE}:heady:heady:{job.id.removeprefix('ftjob-')}"
    lid, tok = lease["id"], lease["token"]
    hdr = {TOKEN: tok}
    # The training file through the lease (the batch input route, sent to finetune_nodes).
    got = nc.get(lease["input"], headers=hdr)
    assert got.status_code == 200 and got.content == data
    assert nc.get(f"{LEASES}/{lid}/validation", headers=hdr).status_code == 404  # none given
    assert nc.get(f"{LEASES}/{lid}/checkpoint", headers=hdr).status_code == 404  # none yet
    assert nc.get(lease["input"], headers={TOKEN: "forged"}).status_code == 409
    # Validated, then training: metrics events, a heartbeat, a checkpoint per epoch.
    events = [{"level": "info", "type": "message", "message": "Files validated: 12 examples"}]
    r = nc.post(f"{LEASES}/{lid}/events", json={"token": tok, "validated": True, "events": events})
    assert r.status_code == 200 and r.json() == {"accepted": 1}
    assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
    metrics = [
        {"level": "info", "type": "metrics", "message": f"Step {s}/6: training loss={2.0 / s:.3f}",
         "data": {"step": s, "train_loss": 2.0 / s, "total_steps": 6}}
        for s in range(1, 7)
    ]  # fmt: skip
    r = nc.post(f"{LEASES}/{lid}/events", json={"token": tok, "events": metrics})
    assert r.json() == {"accepted": 6}
    beat = nc.post(f"{LEASES}/{lid}/heartbeat", json={"token": tok})
    assert beat.status_code == 200 and beat.json()["cancel"] is False
    ckpt = _tar({"adapter_config.json": b"{}", "trainer_state.json": b"{}"})
    for step in (3, 6):
        r = nc.put(
            f"{LEASES}/{lid}/checkpoints/{step}",
            content=ckpt,
            headers={**hdr, "x-heady-checkpoint-metrics": json.dumps({"train_loss": 2.0 / step})},
        )
        assert r.status_code == 200 and r.json()["step_number"] == step, r.text
    adapter = adapter_tar(BASE)
    r = nc.put(f"{LEASES}/{lid}/adapter", content=adapter, headers=hdr)
    assert r.status_code == 200 and r.json() == {"bytes": len(adapter)}
    used = {"batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": 2}
    done = {"token": tok, "ok": True, "trained_tokens": 480, "hyperparameters": used}
    r = nc.post(f"{LEASES}/{lid}/commit", json=done)
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    model = r.json()["fine_tuned_model"]
    assert nc.post(f"{LEASES}/{lid}/commit", json=done).status_code == 200  # a retry: same

    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model == model
    assert job.trained_tokens == 480 and job.hyperparameters.batch_size == 4
    assert job.finished_at is not None and len(job.result_files) == 1
    steps = c.files.content(job.result_files[0]).text.splitlines()
    assert steps[0].startswith("step,train_loss") and len(steps) == 7
    page = c.fine_tuning.jobs.list_events(job.id, limit=100)
    kinds = [(e.type, e.message) for e in page.data]
    assert sum(t == "metrics" for t, _ in kinds) == 6
    assert any("Files validated" in m for _, m in kinds)
    assert page.data[0].created_at >= page.data[-1].created_at  # newest first
    cps = c.fine_tuning.jobs.checkpoints.list(job.id)
    assert [cp.step_number for cp in cps.data] == [6, 3]
    assert cps.data[0].fine_tuned_model_checkpoint == f"{model}:ckpt-step-6"
    assert cps.data[0].metrics.train_loss == pytest.approx(2.0 / 6)

    # The adapter, as a node's LoRA resolver fetches it (by the slug, node credential).
    name = slug(model)
    got = nc.get(f"/api/nodes/v1/adapters/{name}")
    assert got.status_code == 200 and got.content == adapter
    assert got.headers["x-heady-ft-base"] == BASE
    assert nc.get("/api/nodes/v1/adapters/ft-nope-0123456789abcdef0123").status_code == 404
    assert httpx.get(f"{gw.url}/api/nodes/v1/adapters/{name}").status_code == 401

    # Another key: neither the job nor the model exists for it, and nothing is forwarded.
    other = sdk(gw, OTHER_KEY, "reasoning")
    with pytest.raises(openai.NotFoundError):
        sdk(gw, OTHER_KEY).fine_tuning.jobs.retrieve(job.id)
    for n in range(1, 9):
        fleet.clear_requests(n)
    with pytest.raises(openai.NotFoundError) as refused:
        other.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_found"
    assert not chats(fleet)
    assert model not in {m.id for m in other.models.list()}

    # The caller's models list shows it (beside the node's own).
    mine = sdk(gw, API_KEY, "reasoning")
    listed = {m.id: m for m in mine.models.list()}
    assert model in listed and listed[model].owned_by == "heady"
    assert BASE in listed or "reasoning" in listed

    # Served: no node is known to serve LoRA yet -> 503 no_capable_node, nothing forwarded.
    ask = {"model": model, "messages": [{"role": "user", "content": "pattern 3?"}], "max_tokens": 4}
    learn(gw)
    with pytest.raises(openai.APIStatusError) as none_yet:
        mine.chat.completions.create(**ask)
    assert none_yet.value.status_code == 503 and none_yet.value.type == "no_capable_node"
    assert BASE in none_yet.value.message
    assert not chats(fleet)

    with lora_on_the_batch_pair(gw, fleet, tmp_path):
        # Served by the batch pair: by the model's base, though the role is `reasoning`.
        served_by = served_lora(fleet, mine, ask, name)
        loaded = fleet.node(served_by).loras.loaded
        assert loaded == {name: str(tmp_path / f"lora-{served_by}" / name)}
        assert (tmp_path / f"lora-{served_by}" / name / "adapter_config.json").is_file()
        # Still the caller's only.
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(**ask)


def test_jobs_list_pages_filters_and_cancel(gw: Gateway) -> None:
    c = sdk(gw, PAGER_KEY)
    fid = upload(c, training_file())
    # A base no node serves: these jobs stay queued for nobody, and are cancelled below.
    ids = [
        c.fine_tuning.jobs.create(
            model="pager/base", training_file=fid, metadata={"batch": "b" if i % 2 else "a"}
        ).id
        for i in range(5)
    ]
    # Newest first (created_at, then id: jobs of the same instant in a fixed order).
    full = [j.id for j in c.fine_tuning.jobs.list(limit=100).data]
    assert sorted(full) == sorted(ids)
    made = {j.id: j.created_at for j in c.fine_tuning.jobs.list(limit=100).data}
    assert [made[j] for j in full] == sorted(made.values(), reverse=True)
    first = c.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == full[:2] and first.has_more
    second = c.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in second.data] == full[2:4] and second.has_more
    last = c.fine_tuning.jobs.list(limit=2, after=second.data[-1].id)
    assert [j.id for j in last.data] == full[4:] and not last.has_more
    assert [j.id for j in c.fine_tuning.jobs.list(limit=2)] == full  # the SDK pages on
    only_b = [j.id for j in c.fine_tuning.jobs.list(metadata={"batch": "b"}).data]
    assert only_b == [j for j in full if j in (ids[1], ids[3])]
    theirs = {j.id for j in sdk(gw).fine_tuning.jobs.list(limit=100).data}
    assert theirs and not theirs & set(ids)  # another key sees its own jobs only

    for jid in ids:
        cancelled = c.fine_tuning.jobs.cancel(jid)
        assert cancelled.status == "cancelled"
    assert c.fine_tuning.jobs.cancel(ids[0]).status == "cancelled"  # again: same answer
    assert c.fine_tuning.jobs.retrieve(ids[0]).status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        sdk(gw).fine_tuning.jobs.cancel(ids[1])
    events = [e.message for e in c.fine_tuning.jobs.list_events(ids[0]).data]
    assert events[0] == "The job was cancelled" and events[-1].startswith("Validating training")


def test_a_cancel_reaches_the_training_node_and_a_lapsed_lease_resumes(gw: Gateway) -> None:
    c = sdk(gw)
    fid = upload(c, training_file())
    job = c.fine_tuning.jobs.create(model=BASE, training_file=fid)
    nc7, nc8 = node(gw, 7), node(gw, 8)
    first = lease_train(nc7, [BASE])
    assert first["job_id"] == job.id
    tok = first["token"]
    r = nc7.put(
        f"{LEASES}/{first['id']}/checkpoints/5",
        content=_tar({"adapter_config.json": b"{}"}),
        headers={TOKEN: tok},
    )
    assert r.status_code == 200
    # Node 7 dies (no heartbeat): after the lease lapses the job shows queued, node 8 takes
    # it over and is told where to resume; node 7's late calls are refused.
    time.sleep(6.5)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "queued"
    second = lease_train(nc8, [BASE])
    assert second["job_id"] == job.id and second["attempt"] == 2
    assert second["resume_from"]["step_number"] == 5
    resumed = nc8.get(second["checkpoint"], headers={TOKEN: second["token"]})
    assert resumed.status_code == 200 and resumed.content.startswith(b"adapter_config.json")
    late = nc7.post(f"{LEASES}/{first['id']}/heartbeat", json={"token": tok})
    assert late.status_code == 409
    # The client cancels: the next heartbeat says so, the node commits `cancelled`.
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    beat = nc8.post(f"{LEASES}/{second['id']}/heartbeat", json={"token": second["token"]})
    assert beat.status_code == 200 and beat.json()["cancel"] is True
    r = nc8.post(
        f"{LEASES}/{second['id']}/commit",
        json={"token": second["token"], "ok": False, "cancelled": True},
    )
    assert r.status_code == 200
    final = c.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None


def test_a_running_jobs_checkpoint_is_served_to_its_key_by_a_nodes_resolver(
    gw: Gateway, fleet: Fleet, tmp_path: Path
) -> None:
    """OpenAI lets a checkpoint be used as a model once checkpoints.list shows it, while the
    job still runs: here a node's real resolver loads the checkpoint's adapter (the gateway
    serves only the adapter files of the checkpoint tar, never the trainer's state.json)."""
    c = sdk(gw)
    job = c.fine_tuning.jobs.create(model=BASE, training_file=upload(c, training_file()))
    nc = node(gw)
    lease = lease_train(nc, [BASE])
    assert lease["job_id"] == job.id
    lid, tok = lease["id"], lease["token"]
    files = adapter_files(BASE)
    ckpt = _tar({**files, "state.json": b'{"step": 4, "epoch": 1}'})
    r = nc.put(f"{LEASES}/{lid}/checkpoints/4", content=ckpt, headers={TOKEN: tok})
    assert r.status_code == 200, r.text
    [cp] = c.fine_tuning.jobs.checkpoints.list(job.id).data
    model = cp.fine_tuned_model_checkpoint
    assert model == f"ft:{BASE}:heady::{job.id.removeprefix('ftjob-')}:ckpt-step-4"
    assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
    name = slug(model)
    assert name.startswith(f"ft-ckpt-{job.id.removeprefix('ftjob-')}-4-")

    # What a resolver fetches: a tar of the two adapter files, cut from the checkpoint's.
    got = nc.get(f"/api/nodes/v1/adapters/{name}")
    assert got.status_code == 200 and got.headers["x-heady-ft-base"] == BASE
    with tarfile.open(fileobj=io.BytesIO(got.content), mode="r:") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == files  # type: ignore[union-attr]

    # Another key: 404 and nothing forwarded; not in anyone's /v1/models.
    mine, other = sdk(gw, API_KEY, "reasoning"), sdk(gw, OTHER_KEY, "reasoning")
    ask = {"model": model, "messages": [{"role": "user", "content": "pattern 1?"}], "max_tokens": 4}
    for n in range(1, 9):
        fleet.clear_requests(n)
    with pytest.raises(openai.NotFoundError) as refused:
        other.chat.completions.create(**ask)
    assert refused.value.code == "model_not_found" and not chats(fleet)
    assert model not in {m.id for m in mine.models.list()}
    # Routed like the job's model: no node known to serve LoRA on its base -> 503.
    learn(gw)
    with pytest.raises(openai.APIStatusError) as none_yet:
        mine.chat.completions.create(**ask)
    assert none_yet.value.status_code == 503 and none_yet.value.type == "no_capable_node"
    assert not chats(fleet)

    with lora_on_the_batch_pair(gw, fleet, tmp_path):
        served_by = served_lora(fleet, mine, ask, name)
        cached = tmp_path / f"lora-{served_by}" / name
        assert fleet.node(served_by).loras.loaded == {name: str(cached)}
        assert sorted(p.name for p in cached.iterdir()) == sorted(files)  # no state.json
        # The job cancelled: what checkpoints.list listed stays usable (the documented rule).
        assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert [x.id for x in c.fine_tuning.jobs.checkpoints.list(job.id).data] == [cp.id]
        assert mine.chat.completions.create(**ask).model == name
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(**ask)
        beat = nc.post(f"{LEASES}/{lid}/heartbeat", json={"token": tok})
        assert beat.json()["cancel"] is True
        stop = {"token": tok, "ok": False, "cancelled": True}
        assert nc.post(f"{LEASES}/{lid}/commit", json=stop).status_code == 200
