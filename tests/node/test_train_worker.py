"""The fine-tuning runner's process entry (`heady-node train-worker`) and the node session that
starts it beside the batch worker on nodes that train, with the engine restart wired to the
session's own engine (heady_node.finetune.runner, heady_node.session)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from heady_node import batch_worker
from heady_node.finetune import runner
from heady_node.session import NodeSession

CREDENTIAL = "node-cred-train"


class Recorder:
    """A gateway that has no work: records each lease ask (batch worker's and runner's)."""

    def __init__(self) -> None:
        self.asks: list[dict[str, Any]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == runner.API:
                    ask = json.loads(body or b"{}")
                    ask["authorization"] = self.headers.get("authorization")
                    rec.asks.append(ask)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def train_asks(self) -> list[dict[str, Any]]:
        return [a for a in self.asks if a.get("kinds") == [runner.KIND]]


@pytest.fixture
def gateway() -> Iterator[Recorder]:
    g = Recorder()
    yield g
    g.server.shutdown()
    g.server.server_close()


def wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_entry_parses_args_and_env() -> None:
    env = {"HEADY_NODE_CREDENTIAL": " cred ", "HEADY_GATEWAY_URL": "https://gw.example/"}
    r = runner.build(["--model", "Qwen/Qwen2.5-3B-Instruct", "--model", "batch", "--gpu", "t4",
                      "--max-model-len", "8192", "--poll", "2"], env)  # fmt: skip
    assert r.gateway_url == "https://gw.example" and r.credential == "cred"
    assert r.models == ("Qwen/Qwen2.5-3B-Instruct", "batch")
    assert r.gpu is not None and r.gpu.key == "t4"
    assert r.max_model_len == 8192 and r.poll_s == 2.0
    assert isinstance(r.engine, runner.NoEngine)
    assert runner.CREDENTIAL_ENV == batch_worker.CREDENTIAL_ENV
    assert runner.GATEWAY_ENV == batch_worker.GATEWAY_ENV
    cpu = runner.build(["--gateway", "http://127.0.0.1:9", "--model", "m"], {**env})
    assert cpu.gpu is None and cpu.gateway_url == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--model", "m"], {"HEADY_GATEWAY_URL": "https://gw.example"}, "HEADY_NODE_CREDENTIAL"),
        (["--model", "m"], {"HEADY_NODE_CREDENTIAL": "c"}, "--gateway"),
        (["--gateway", "http://gw.example.com", "--model", "m"], {"HEADY_NODE_CREDENTIAL": "c"},
         "https"),
    ],
)  # fmt: skip
def test_entry_refuses_missing_credential_gateway_or_plain_http(
    argv: list[str], env: dict[str, str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        runner.build(argv, env)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_cli_train_worker_refuses_a_missing_credential() -> None:
    env = {k: v for k, v in os.environ.items() if k != "HEADY_NODE_CREDENTIAL"}
    cmd = [sys.executable, "-m", "heady_node.cli", "train-worker", "--gateway",
           "https://gw.example", "--model", "m"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "HEADY_NODE_CREDENTIAL is not set" in r.stderr
    r = subprocess.run([sys.executable, "-m", "heady_node.finetune.runner", "--help"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "train-worker" in r.stdout


def test_the_batch_pair_trains_unless_told_otherwise() -> None:
    assert runner.may_train("batch") and runner.may_train("batch", "garbage")
    assert not runner.may_train("batch", "0") and not runner.may_train("batch", "false")
    assert not runner.may_train("code") and not runner.may_train("reasoning", "")
    assert runner.may_train("code", "1") and runner.may_train("vision", "TRUE")


def session(node: int, secrets: dict[str, str], tmp_path: Path, out: list[str]) -> NodeSession:
    return NodeSession(
        node=node, tunnel_kind="none", dry_run=True, log_dir=tmp_path,
        secret=lambda name: secrets.get(name, ""), out=out.append,
    )  # fmt: skip


def test_session_trains_on_the_batch_node_and_restarts_its_own_engine(
    gateway: Recorder, tmp_path: Path
) -> None:
    secrets = {"HEADY_GATEWAY_URL": gateway.url, "HEADY_NODE_CREDENTIAL": CREDENTIAL}
    out: list[str] = []
    s = session(7, secrets, tmp_path, out)
    try:
        s.preflight()
        s.start_engine()
        assert s.worker_proc is not None and s.train_worker is not None
        wait_for(lambda: gateway.train_asks())
        ask = gateway.train_asks()[0]
        assert ask["idle"] is True and "batch" in ask["models"]
        assert ask["authorization"] == f"Bearer {CREDENTIAL}"
        # The resolver plugin's settings reach the engine (node 7 serves a LoRA preset).
        assert s.engine_cmd is not None
        env = s.engine_cmd[1]
        assert Path(env["HEADY_LORA_CACHE_DIR"]).is_dir()
        assert env["HEADY_GATEWAY_URL"] == gateway.url
        assert env["HEADY_NODE_CREDENTIAL"] == CREDENTIAL
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
        # The runner's engine control is this session's engine: freeing the GPU stops it,
        # giving it back starts the same command healthy again on the same port.
        eng = s.train_engine
        assert eng is not None and eng.proc is s.engine_proc
        first = s.engine_proc
        asyncio.run(eng.release())
        assert first is not None and first.poll() is not None and s.current_engine() is None
        assert "engine STOPPED for training" in s.status_once()
        asyncio.run(eng.restore())
        assert s.current_engine() is eng.proc and eng.proc is not first
        assert httpx.get(f"{s.local_url}/health", timeout=5).status_code == 200
        line = s.status_once()
        assert "EXITED" not in line and "STOPPED" not in line
    finally:
        s.stop()
    assert s.train_worker is None and s.current_engine() is None
    assert eng.proc is not None and eng.proc.poll() is not None  # the restarted one stopped too
    assert any(x.startswith("Train worker: leasing fine-tuning jobs from") for x in out)


def test_session_starts_no_train_worker_where_the_node_does_not_train(
    gateway: Recorder, tmp_path: Path
) -> None:
    secrets = {"HEADY_GATEWAY_URL": gateway.url, "HEADY_NODE_CREDENTIAL": CREDENTIAL}
    code = session(3, secrets, tmp_path, [])
    code.preflight()
    assert not code.trains() and code.start_train_worker() is False
    assert code.train_worker is None
    off = session(8, {**secrets, "HEADY_TRAIN": "0"}, tmp_path, [])
    off.preflight()
    assert not off.trains() and off.start_train_worker() is False
    on = session(3, {**secrets, "HEADY_TRAIN": "1"}, tmp_path, [])
    assert on.trains()
    no_gateway = session(7, {}, tmp_path, [])
    no_gateway.preflight()
    assert no_gateway.trains() and no_gateway.start_train_worker() is False
