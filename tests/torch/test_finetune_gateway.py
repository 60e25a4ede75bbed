"""The real node runner against the real gateway: heady_node's FineTuneRunner (the trainer on
the CPU, the tiny Llama and in-memory tokenizer of test_finetune.py) leases a job from the
gateway in workerd (harness.gateway: R2, D1 and the migrations offline), validates the file,
trains, uploads its checkpoints and adapter and commits; the client side (httpx, as the SDK
sends it) sees the events, the checkpoints, `succeeded` and the fine-tuned model, and the
adapter a LoRA resolver fetches by the model's slug passes vLLM's rules.

Run in the torch venv (`make test-torch`); it starts workerd itself (node_modules from
`make install`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.gateway import Gateway, build_config
from heady_node.finetune.adapter import check_vllm_compatible
from heady_node.finetune.runner import FineTuneRunner
from heady_shared.ftnames import slug
from heady_shared.nodeauth import node_credential
from tests.torch.test_finetune import BASE, examples, make_model, make_tokenizer
from tests.torch.test_finetune_runner import Engine

KEY = "torch-e2e-client-key"
SECRET = "torch-e2e-node-secret-0a1b2c"
API = "/api/heavy/batch/v1"


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    bindings = {
        "GATEWAY_API_KEYS": KEY,
        "NODE_SECRET": SECRET,
        "FT_LEASE_S": "5",
        "FT_HEARTBEAT_S": "1",
    }
    with Gateway(build_config(bindings=bindings)) as g:
        yield g


def client(gw: Gateway) -> httpx.Client:
    return httpx.Client(
        base_url=gw.url + API, headers={"authorization": f"Bearer {KEY}"}, timeout=60
    )


def run_node(gw: Gateway, node: int, tmp: Path) -> str | None:
    """One round of node `node`'s runner: lease a train job, run it to its commit."""
    tok = make_tokenizer()

    async def go() -> str | None:
        r = FineTuneRunner(
            gw.url,
            node_credential(SECRET, node),
            Engine(),
            gpu=None,
            max_model_len=64,
            models=[BASE],
            loader=lambda plan: (make_model(len(tok)), tok),
            tokenizer_loader=lambda repo: tok,
            work_dir=tmp,
            log_every=3,
        )
        try:
            return await r.step()
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_the_runner_trains_a_gateway_job_to_a_served_adapter(gw: Gateway, tmp_path: Path) -> None:
    c = client(gw)
    data = b"".join(json.dumps(x).encode() + b"\n" for x in examples())
    up = c.post("/files", files={"file": ("set.jsonl", data)}, data={"purpose": "fine-tune"})
    assert up.status_code == 200, up.text
    hp = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 40}
    body = {
        "model": BASE,
        "training_file": up.json()["id"],
        "suffix": "tiny",
        "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }
    job = c.post("/fine_tuning/jobs", json=body).json()
    assert job["status"] == "validating_files", job

    # A node outside the batch pair (TRAIN_NODES unset) is offered nothing; node 7 trains it.
    assert run_node(gw, 3, tmp_path / "n3") is None
    outcome = run_node(gw, 7, tmp_path / "n7")
    assert outcome is not None and outcome.startswith("succeeded: 9 steps"), outcome

    done = c.get(f"/fine_tuning/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["seed"] == 7
    assert done["fine_tuned_model"] == f"ft:{BASE}:heady:tiny:{job['id'].removeprefix('ftjob-')}"
    assert done["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 4,
        "learning_rate_multiplier": 40.0,
    }
    assert done["trained_tokens"] > 0
    events = c.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert sorted(steps) == [3, 6, 9]
    losses = {e["data"]["step"]: e["data"]["train_loss"] for e in events if e["type"] == "metrics"}
    assert losses[9] < losses[3]  # it learns
    assert any(e["message"].startswith("Files validated") for e in events)
    cps = c.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [cp["step_number"] for cp in cps] == [9, 6, 3]
    csv = c.get(f"/files/{done['result_files'][0]}/content").text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == 4

    # The adapter as the node's LoRA resolver fetches it: vLLM's form, naming the base.
    node = httpx.Client(
        base_url=gw.url, headers={"authorization": f"Bearer {node_credential(SECRET, 8)}"}
    )
    got = node.get(f"/api/nodes/v1/adapters/{slug(done['fine_tuned_model'])}")
    assert got.status_code == 200 and got.headers["x-heady-ft-base"] == BASE
    out = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        tar.extractall(out, filter="data")
    assert check_vllm_compatible(out, BASE) == []


# Node 7's runner in a process of its own, so it can die as a node does (SIGKILL: no commit,
# no goodbye): the same runner and tiny model as run_node.
NODE_PROCESS = """
import asyncio, sys
from pathlib import Path
from heady_node.finetune.runner import FineTuneRunner
from tests.torch.test_finetune import BASE, make_model, make_tokenizer
from tests.torch.test_finetune_runner import Engine
tok = make_tokenizer()
async def go():
    r = FineTuneRunner(sys.argv[1], sys.argv[2], Engine(), gpu=None, max_model_len=64,
        models=[BASE], loader=lambda plan: (make_model(len(tok)), tok),
        tokenizer_loader=lambda repo: tok, work_dir=Path(sys.argv[3]), log_every=3)
    print(await r.step(), flush=True)
asyncio.run(go())
"""


def test_a_node_killed_mid_training_is_resumed_from_its_checkpoint_elsewhere(
    gw: Gateway, tmp_path: Path
) -> None:
    c = client(gw)
    data = b"".join(json.dumps(x).encode() + b"\n" for x in examples())
    fid = c.post("/files", files={"file": ("s.jsonl", data)}, data={"purpose": "fine-tune"})
    hp = {"n_epochs": 20, "batch_size": 4, "learning_rate_multiplier": 40}
    body = {"model": BASE, "training_file": fid.json()["id"], "hyperparameters": hp}
    job = c.post("/fine_tuning/jobs", json=body).json()
    jid = job["id"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", "."]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", NODE_PROCESS, gw.url, node_credential(SECRET, 7), str(tmp_path)],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not c.get(f"/fine_tuning/jobs/{jid}/checkpoints").json()["data"]:
            assert proc.poll() is None, "node 7 ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint from node 7"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert c.get(f"/fine_tuning/jobs/{jid}").json()["status"] == "running"
    kept = c.get(f"/fine_tuning/jobs/{jid}/checkpoints").json()["data"][0]["step_number"]
    assert 0 < kept < 60
    time.sleep(5.5)  # FT_LEASE_S without a heartbeat: the lease lapses
    assert c.get(f"/fine_tuning/jobs/{jid}").json()["status"] == "queued"

    outcome = run_node(gw, 8, tmp_path / "n8")
    assert outcome is not None and outcome.startswith("succeeded: 60 steps"), outcome
    done = c.get(f"/fine_tuning/jobs/{jid}").json()
    assert done["status"] == "succeeded" and done["fine_tuned_model"]
    events = c.get(f"/fine_tuning/jobs/{jid}/events", params={"limit": 100}).json()["data"]
    messages = [e["message"] for e in events]
    resumed = [m for m in messages if m.startswith("Resuming from the checkpoint")]
    assert resumed and f"step {kept}" in resumed[0], messages
    cps = c.get(f"/fine_tuning/jobs/{jid}/checkpoints", params={"limit": 100}).json()["data"]
    assert cps[0]["step_number"] == 60 and len(cps) == 20
