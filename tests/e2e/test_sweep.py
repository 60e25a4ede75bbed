"""The storage sweep end to end, in the real offline runtime (workerd + Pyodide; R2 is
miniflare's R2 simulation, listed with `startAfter` by jsstore.R2Blobs.list): a batch whose
shard lease is taken over leaves the dead lease's output part in R2; once the batch completed
and the grace passed, the cron deletes it, and the output file still downloads whole.

Nodes 7 and 8 are played by hand over httpx with their node credentials (as
heady_node.batch_worker would call), so the test decides exactly when node 7 "dies"."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from harness.gateway import Gateway, build_config
from heady_shared.nodeauth import node_credential
from sim.fleet import NODE_MODELS
from sweep import MIN_GRACE_S
from tests.e2e.conftest import API_KEY, fleet_bindings

NODE_SECRET = "e2e-sweep-node-secret-9a8b7c"
LEASE_S = 2
FT_LEASE_S = 5  # the setting's lower bound
LINES = 6
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def gw(fleet) -> Iterator[Gateway]:
    bindings = fleet_bindings(
        fleet,
        NODE_SECRET=NODE_SECRET,
        SHARD_LINES="100",
        BATCH_LEASE_S=str(LEASE_S),
        BATCH_HEARTBEAT_S="1",
        FT_LEASE_S=str(FT_LEASE_S),
        FT_HEARTBEAT_S="1",
    )
    with Gateway(build_config(bindings=bindings)) as g:
        yield g


class Node:
    """One node's calls to the node API (`/api/nodes/v1/leases...`)."""

    def __init__(self, gw: Gateway, n: int) -> None:
        self.base = f"{gw.url}/api/nodes/v1/leases"
        self.http = httpx.Client(
            timeout=30, headers={"authorization": f"Bearer {node_credential(NODE_SECRET, n)}"}
        )

    def lease(self, **body) -> dict:
        r = self.http.post(self.base, json={"models": ["batch"], "idle": False, **body})
        assert r.status_code == 200, r.text
        return r.json()["lease"]

    def upload(self, lease: dict, path: str, data: bytes) -> httpx.Response:
        return self.http.put(
            f"{self.base}/{lease['id']}/{path}",
            content=data,
            headers={"x-heady-lease-token": lease["token"]},
        )

    def input(self, lease: dict) -> bytes:
        r = self.http.get(
            f"{self.base}/{lease['id']}/input", headers={"x-heady-lease-token": lease["token"]}
        )
        assert r.status_code == 200, r.text
        return r.content

    def put(self, lease: dict, data: bytes) -> None:
        r = self.http.put(
            f"{self.base}/{lease['id']}/results/output",
            content=data,
            headers={"x-heady-lease-token": lease["token"]},
        )
        assert r.status_code == 200 and r.json() == {"bytes": len(data)}, r.text

    def commit(self, lease: dict, body: dict) -> httpx.Response:
        return self.http.post(
            f"{self.base}/{lease['id']}/commit", json={"token": lease["token"], **body}
        )


def requests_jsonl(n: int) -> bytes:
    lines = [
        {
            "custom_id": f"s-{i}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "batch", "messages": [{"role": "user", "content": f"line {i}"}]},
        }
        for i in range(n)
    ]
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def answers(data: bytes) -> bytes:
    """The output part a node writes: one BatchRequestOutput line per request."""
    out = []
    for i, raw in enumerate(x for x in data.split(b"\n") if x.strip()):
        cid = json.loads(raw)["custom_id"]
        body = {"choices": [{"message": {"content": f"answer {cid}"}}]}
        resp = {"status_code": 200, "request_id": f"r{i}", "body": body}
        out.append({"id": f"batch_req_{i}", "custom_id": cid, "response": resp, "error": None})
    return ("\n".join(json.dumps(x) for x in out) + "\n").encode()


def stored(gw: Gateway, key: str, length: int) -> bytes | None:
    """The object's first `length` bytes through the harness's R2 route; None if absent
    (the harness ends the body short for a missing object)."""
    try:
        r = httpx.get(f"{gw.url}/__harness/blob", params={"part": f"{key}:0:{length}"}, timeout=30)
    except httpx.HTTPError:
        return None
    return r.content if r.status_code == 200 and len(r.content) == length else None


def probes(gw: Gateway) -> list[dict]:
    return [x for x in gw.log_records() if x.get("msg") == "probe"]


def cron(gw: Gateway) -> dict:
    """One cron tick; its log line (the runtime's output arrives a moment after the answer)."""
    before = len(probes(gw))
    gw.scheduled()
    deadline = time.monotonic() + 10
    while len(probes(gw)) == before:
        assert time.monotonic() < deadline, "no probe log line"
        time.sleep(0.05)
    probe = probes(gw)[-1]
    assert "batches_sweep_error" not in probe and "ft_sweep_error" not in probe, probe
    assert isinstance(probe["batches_swept"], dict) and isinstance(probe["ft_swept"], dict)
    return probe


def test_a_taken_over_leases_part_is_swept_after_the_batch_completes(gw):
    client = openai.OpenAI(
        base_url=f"{gw.url}/api/heavy/batch/v1", api_key=API_KEY, max_retries=0, timeout=30
    )
    f = client.files.create(file=("sweep.jsonl", requests_jsonl(LINES)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    node7, node8 = Node(gw, 7), Node(gw, 8)

    validate = node7.lease()
    assert validate["kind"] == "validate" and validate["batch_id"] == b.id
    data = node7.input(validate)
    shard = {"offset": 0, "length": len(data), "first_line": 0, "n_lines": LINES}
    plan = {"ok": True, "model": "batch", "total": LINES, "shards": [shard]}
    assert node7.commit(validate, plan).status_code == 200

    # node 7 leases the shard, uploads part of an answer, and dies (no heartbeat, no commit)
    dead = node7.lease()
    assert dead["kind"] == "lines" and dead["seq"] == 1
    half = answers(node7.input(dead))[:40]
    node7.put(dead, half)
    orphan = f"b/{b.id}/w/1/{dead['id']}.out"
    assert stored(gw, orphan, len(half)) == half

    time.sleep(LEASE_S + 0.5)  # the lease lapsed: node 8 takes the shard over
    taker = node8.lease()
    assert taker["seq"] == 1 and taker["id"] != dead["id"]
    output = answers(node8.input(taker))
    node8.put(taker, output)
    usage = {"input_tokens": 6, "output_tokens": 6, "total_tokens": 12}
    done = node8.commit(taker, {"completed": LINES, "failed": 0, "partial": False, "usage": usage})
    assert done.status_code == 200, done.text
    assert node7.commit(dead, {"completed": LINES, "failed": 0}).status_code == 409

    batch = client.batches.retrieve(b.id)
    assert batch.status == "completed" and batch.output_file_id
    assert client.files.content(batch.output_file_id).content == output
    kept = f"b/{b.id}/w/1/{taker['id']}.out"

    # right after the end: inside the grace, nothing of it is touched
    probe = cron(gw)
    assert probe["batches_swept"]["deleted"] == 0
    assert stored(gw, orphan, len(half)) == half

    # once the grace passed after the last lease's expiry: the orphan goes, the output stays
    time.sleep(LEASE_S + MIN_GRACE_S + 1)
    probe = cron(gw)
    assert probe["batches_swept"]["targets"] >= 1 and probe["batches_swept"]["deleted"] >= 1
    assert probe["batches_swept"]["lists"] >= 1
    assert stored(gw, orphan, len(half)) is None
    assert stored(gw, kept, len(output)) == output
    assert client.files.content(batch.output_file_id).content == output

    # swept once: a later run does not list its prefix again
    probe = cron(gw)
    assert probe["batches_swept"] == {"targets": 0, "deleted": 0, "lists": 0}


def test_a_lost_training_leases_adapter_is_swept_after_the_job_is_cancelled(gw):
    client = openai.OpenAI(
        base_url=f"{gw.url}/api/heavy/batch/v1", api_key=API_KEY, max_retries=0, timeout=30
    )
    base = NODE_MODELS[7]
    data = b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ).encode()
        + b"\n"
        for i in range(4)
    )
    fid = client.files.create(file=("train.jsonl", data), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=base, training_file=fid)
    node7, node8 = Node(gw, 7), Node(gw, 8)
    train = {"models": [base], "idle": True, "kinds": ["train"]}

    first = node7.lease(**train)
    assert first["job_id"] == job.id
    ckpt = b"checkpoint step 5 " * 8
    assert node7.upload(first, "checkpoints/5", ckpt).status_code == 200
    lost = b"an adapter its node never committed"
    assert node7.upload(first, "adapter", lost).status_code == 200
    lost_key = f"ft/{job.id}/adapter/{first['id']}.tar"
    ckpt_key = f"ft/{job.id}/ckpt/5/{first['id']}.tar"
    assert stored(gw, lost_key, len(lost)) == lost

    time.sleep(FT_LEASE_S + 0.5)  # node 7 died; node 8 takes the job over, then it is cancelled
    second = node8.lease(**train)
    assert second["job_id"] == job.id and second["resume_from"]["step_number"] == 5
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    done = node8.commit(second, {"ok": False, "cancelled": True})
    assert done.status_code == 200, done.text

    time.sleep(FT_LEASE_S + MIN_GRACE_S + 1)
    probe = cron(gw)
    assert probe["ft_swept"]["targets"] >= 1 and probe["ft_swept"]["deleted"] >= 1
    assert stored(gw, lost_key, len(lost)) is None
    # the recorded checkpoint stays (listed checkpoints stay servable whatever the status)
    assert stored(gw, ckpt_key, len(ckpt)) == ckpt
    [c] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert c.step_number == 5
