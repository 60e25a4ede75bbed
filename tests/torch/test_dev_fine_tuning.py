"""`make dev` fine-tunes: the README's "Fine-tuning" snippet, run as written (only its gateway
URL pointed at this test's cluster) with the official `openai` SDK against the dev cluster
started by harness.dev's own `start()` — the fleet process with its batch workers, LoRA on the
text nodes with heady_node's real resolver, the real fine-tuning runner beside nodes 7-8 in this
venv training the tiny stand-in base (heady_node.finetune.devbase) on the CPU, the gateway in
workerd — on free ports, stopped at the end.

It proves: upload, job, events (loss), `succeeded`, `fine_tuned_model`; node 8 (the trainer of
the README's base) handed its engine over and got it back with a new batch worker; the chat on
the reasoning route answered by node 1 after its resolver fetched the adapter from the gateway;
a batch submitted just before the job completes meanwhile.

Run in the torch venv (`make test-torch`); it starts workerd itself (`make install`)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from openai import OpenAI

from harness import dev
from harness.gateway import ROOT
from heady_shared.ftnames import slug

BASE = "Qwen/Qwen2.5-7B-Instruct-AWQ"  # the README's: node 8 trains it, nodes 1 and 8 serve it
BATCH_LINES = 128  # more than node 7 runs at once (64): both workers hold lines


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Fine-tuning\n") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README's Fine-tuning section has no python block"
    return code.group(1)


def batch_input() -> bytes:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "batch",
                # vLLM's ignore_eos: 150 tokens a line, 6-7.5 s at the batch pair's speed.
                "max_tokens": 150,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": f"prompt {i}"}],
            },
        }
        for i in range(BATCH_LINES)
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_the_readme_fine_tuning_snippet_completes_under_make_dev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snippet = readme_snippet()
    assert f'model="{BASE}"' in snippet and "/api/heavy/reasoning/v1" in snippet
    assert 'GW, KEY = "http://127.0.0.1:8787", "dev-key"' in snippet
    cluster = dev.start(
        0,
        log_dir=tmp_path / "dev",
        dev_vars=None,
        # Shards a drained worker hands back or abandons run again within seconds here.
        settings={"BATCH_LEASE_S": "6", "BATCH_HEARTBEAT_S": "1"},
        trainer_times={"poll_s": 0.5, "poll_max_s": 1.0},
        fleet_python=ROOT / ".venv" / "bin" / "python",  # the simulator's 3.12, as make dev
    )
    try:
        assert sorted(cluster.trainers) == ["7", "8"], cluster.no_train_reason
        fleet, url = cluster.fleet, cluster.gw.url
        logs = [tmp_path / "dev" / f"trainer-{n}.log" for n in (7, 8)]
        deadline = time.monotonic() + 60  # the trainers import torch in the background
        while not all(p.exists() and "stand-in base is ready" in p.read_text() for p in logs):
            assert time.monotonic() < deadline, "the trainers never got their base ready"
            time.sleep(0.2)
        worker8 = fleet.workers()["8"]["pid"]
        c = OpenAI(base_url=f"{url}/api/heavy/batch/v1", api_key=dev.DEV_KEY, max_retries=0)
        inp = c.files.create(file=("in.jsonl", batch_input()), purpose="batch")
        batch = c.batches.create(
            input_file_id=inp.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while c.batches.retrieve(batch.id).status != "in_progress":  # the workers' next ask
            assert time.monotonic() < deadline, "the batch never started"
            time.sleep(0.2)

        monkeypatch.chdir(tmp_path)  # the snippet writes heady-patterns.jsonl where it runs
        code = snippet.replace("http://127.0.0.1:8787", url)
        ns: dict = {}
        started = time.monotonic()
        exec(compile(code, "README.md:Fine-tuning", "exec"), ns)
        trained_s = time.monotonic() - started

        j = ns["j"]
        assert j.status == "succeeded", j.error
        assert j.fine_tuned_model == f"ft:{BASE}:heady:heady:{j.id.removeprefix('ftjob-')}"
        events = c.fine_tuning.jobs.list_events(j.id, limit=100).data
        losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
        assert losses and all(x > 0 for x in losses)
        validated = [e.message for e in events if e.message.startswith("Files validated")]
        assert validated and "tiny random stand-in" in validated[0], validated  # said, not hidden
        assert [cp.step_number for cp in c.fine_tuning.jobs.checkpoints.list(j.id).data] == [20, 10]

        # Node 8 trained it: its engine was handed over and came back with a new batch worker.
        log8 = (tmp_path / "dev" / "trainer-8.log").read_text()
        assert "simulated cluster's tiny random stand-in" in log8
        assert "engine serving again after" in log8
        assert fleet.state()["8"]["mode"] == "healthy"
        assert fleet.trainers()["8"]["training"] is False
        assert fleet.workers()["8"]["alive"] and fleet.workers()["8"]["pid"] != worker8

        # Node 1 answered the reasoning route's chat, after its resolver fetched the adapter.
        name = slug(j.fine_tuned_model)
        answer = ns["answer"]
        assert answer.model == name and answer.choices[0].message.content
        asked = [
            n
            for n in range(1, 9)
            for r in fleet.requests(n)
            if r["path"] == "/v1/chat/completions" and name in (r["body"] or "")
        ]
        assert asked == [1]  # once, on node 1 (the plan's first: reasoning pair, LoRA, base)
        assert fleet.state()["1"]["loras"] == [name]
        fetched = tmp_path / "dev" / "lora-cache" / "node1" / name / "adapter_config.json"
        assert json.loads(fetched.read_text())["base_model_name_or_path"] == BASE

        # The batch submitted just before ran meanwhile and completes, every line answered.
        deadline = time.monotonic() + 90
        while (b := c.batches.retrieve(batch.id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
            time.sleep(0.5)
        assert b.status == "completed" and b.request_counts.completed == BATCH_LINES
        assert b.request_counts.failed == 0
        out = c.files.content(b.output_file_id).text.splitlines()
        assert sorted(json.loads(x)["custom_id"] for x in out) == sorted(
            f"line-{i}" for i in range(BATCH_LINES)
        )
        # ... and it was running when node 8 handed its engine over and began training.
        began = next(e.created_at for e in events if e.message == "Training started")
        assert b.in_progress_at is not None and b.in_progress_at <= began <= b.completed_at
        print(f"README snippet under make dev: {trained_s:.1f} s")
    finally:
        cluster.stop()
