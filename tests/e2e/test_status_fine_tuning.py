"""/api/status's `fine_tuning` end to end: the gateway in the real offline runtime (workerd +
Pyodide, D1 and R2 from miniflare), a job created with the `openai` SDK and trained by nodes
played over HTTP per the node API (as tests/e2e/test_fine_tuning.py does). The status follows
it: validating, held by node 7, running with its step and loss after a metrics event, queued
once node 7's lease lapses, resumed by node 8, succeeded with its model and checkpoints. Another
key sees the job counted, never listed; no node URL, token or lease token is in the answer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from harness.gateway import Gateway, build_config
from heady_shared.nodeauth import node_credential
from sim.fleet import NODE_MODELS, Fleet
from tests.e2e.conftest import API_KEY, NODE_TOKEN, fleet_bindings
from tests.e2e.test_fine_tuning import LEASES, TOKEN, adapter_tar, lease_train, training_file

NODE_SECRET = "e2e-node-secret-ftstatus-3c9d"
OTHER_KEY = "other-key-ftstatus"
BASE = NODE_MODELS[7]
LEASE_S = 5.0  # FT_LEASE_S's lowest


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Iterator[Gateway]:
    bindings = fleet_bindings(
        fleet,
        GATEWAY_API_KEYS=f"{API_KEY},{OTHER_KEY}",
        NODE_SECRET=NODE_SECRET,
        FT_LEASE_S=str(LEASE_S),  # short: the test lets node 7's lease lapse
        FT_HEARTBEAT_S="1",
    )
    with Gateway(build_config(bindings=bindings)) as g:
        yield g


def node(gw: Gateway, n: int) -> httpx.Client:
    auth = {"authorization": f"Bearer {node_credential(NODE_SECRET, n)}"}
    return httpx.Client(base_url=gw.url, headers=auth, timeout=30)


def status(gw: Gateway, key: str = API_KEY) -> tuple[dict, str]:
    r = httpx.get(f"{gw.url}/api/status", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["fine_tuning"], r.text


def only(view: dict, job_id: str) -> dict:
    (j,) = view["mine"]
    assert j["id"] == job_id
    return j


def metrics(step: int, total: int, loss: float) -> dict:
    data = {"step": step, "total_steps": total, "train_loss": loss}
    return {"level": "info", "type": "metrics", "message": f"Step {step}/{total}", "data": data}


@pytest.mark.timeout(180)
def test_status_follows_a_job_from_created_to_succeeded(gw: Gateway, fleet: Fleet) -> None:
    c = openai.OpenAI(base_url=f"{gw.url}/api/heavy/batch/v1", api_key=API_KEY, max_retries=0)
    view, _ = status(gw)
    assert view == {"active": 0, "nodes": [], "mine": []}
    fid = c.files.create(file=("heady.jsonl", training_file()), purpose="fine-tune").id
    job = c.fine_tuning.jobs.create(
        model=BASE,
        training_file=fid,
        suffix="heady",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    view, _ = status(gw)
    j = only(view, job.id)
    assert (view["active"], view["nodes"]) == (1, [])
    assert (j["status"], j["model"], j["suffix"]) == ("validating_files", BASE, "heady")
    assert j["holder"] is None and j["progress"] is None and j["created_at"] == job.created_at
    theirs, _ = status(gw, OTHER_KEY)
    assert theirs == {"active": 1, "nodes": [], "mine": []}  # counted, never listed

    n7, n8 = node(gw, 7), node(gw, 8)
    lease = lease_train(n7, [BASE])
    tok = lease["token"]
    view, _ = status(gw)
    j = only(view, job.id)
    assert j["status"] == "validating_files" and view["nodes"] == [7]
    assert j["holder"] == {"node": 7, "expires_at": int(lease["expires_at"]), "attempt": 1}

    events = [
        {"level": "info", "type": "message", "message": "Files validated"},
        metrics(2, 6, 1.5),
    ]
    r = n7.post(f"{LEASES}/{lease['id']}/events", json={"token": tok, "events": events})
    assert r.status_code == 200, r.text
    view, text = status(gw)
    j = only(view, job.id)
    assert j["status"] == "running" and j["holder"]["node"] == 7
    assert j["progress"] == {
        "step": 2,
        "total_steps": 6,
        "train_loss": 1.5,
        "valid_loss": None,
        "full_valid_loss": None,
        "n_epochs": 2,
        "epoch": 1,
    }
    secrets = [tok, lease["id"], NODE_SECRET, NODE_TOKEN, node_credential(NODE_SECRET, 7)]
    secrets += [fleet.url(n) for n in range(1, 9)]
    assert not [s for s in secrets if s in text]

    # Node 7 stops beating: once its lease lapses the job waits for a node, held by none.
    deadline = time.monotonic() + LEASE_S + 10
    while (j := only(status(gw)[0], job.id))["status"] != "queued":
        assert time.monotonic() < deadline, j
        time.sleep(0.5)
    assert j["holder"] is None and j["progress"]["step"] == 2  # what was reached stays

    # Node 8 takes it over and finishes it.
    again = lease_train(n8, [BASE])
    assert again["job_id"] == job.id and again["attempt"] == 2
    lid, tok = again["id"], again["token"]
    view, _ = status(gw)
    j = only(view, job.id)
    assert (j["status"], j["holder"]["node"], j["holder"]["attempt"]) == ("running", 8, 2)
    assert view["nodes"] == [8]
    r = n8.post(f"{LEASES}/{lid}/events", json={"token": tok, "events": [metrics(6, 6, 0.25)]})
    assert r.status_code == 200, r.text
    for step in (3, 6):
        r = n8.put(f"{LEASES}/{lid}/checkpoints/{step}", content=b"ckpt", headers={TOKEN: tok})
        assert r.status_code == 200, r.text
    r = n8.put(f"{LEASES}/{lid}/adapter", content=adapter_tar(BASE), headers={TOKEN: tok})
    assert r.status_code == 200, r.text
    used = {"batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": 2}
    done = {"token": tok, "ok": True, "trained_tokens": 480, "hyperparameters": used}
    r = n8.post(f"{LEASES}/{lid}/commit", json=done)
    assert r.status_code == 200, r.text

    final = c.fine_tuning.jobs.retrieve(job.id)
    view, text = status(gw)
    j = only(view, job.id)
    assert (view["active"], view["nodes"]) == (0, [])
    assert j["status"] == "succeeded" and j["holder"] is None
    assert j["fine_tuned_model"] == final.fine_tuned_model and j["finished_at"] == final.finished_at
    assert j["checkpoints"] == 2 and j["trained_tokens"] == 480
    assert (j["progress"]["step"], j["progress"]["epoch"], j["progress"]["train_loss"]) == (
        6,
        2,
        0.25,
    )
    assert tok not in text and json.dumps(NODE_SECRET) not in text
    assert status(gw, OTHER_KEY)[0] == {"active": 0, "nodes": [], "mine": []}
    n7.close()
    n8.close()
