"""The fleet's fine-tuning side in `make dev`: LoRA serving with the real resolver on the text
nodes, the real fine-tuning runner beside nodes 7-8, and the engine hand-over a trainer asks for
(batch worker drained, engine down, then up with the worker back), through kill/revive/reset.

The "gateway" is a small recording HTTP server: 204 (no work) to lease requests, 404 to adapter
requests, so we see who asks, as which node, for what. Training itself (torch) is proven in
tests/torch/test_dev_fine_tuning.py; the runners here run in this venv and find no work."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from harness import dev
from heady_node.finetune import runner
from heady_shared import capabilities as caps
from heady_shared.ftnames import slug
from heady_shared.nodeauth import node_of
from sim.fleet import NODE_MODELS, FleetProcess, FleetProcessError, TrainerSpec, trainer_argv
from tests.support.local import alive, serving, wait_for

SECRET = "s3cret-for-training-tests"
FT = f"ft:{NODE_MODELS[1]}:heady:x:0123456789abcdef01234567"


class _Recorder(ThreadingHTTPServer):
    asks: list[tuple[int | None, list[str], list[str] | None]]  # node, models, kinds
    adapters: list[tuple[int | None, str]]  # node, path


def _node(handler: BaseHTTPRequestHandler) -> int | None:
    cred = (handler.headers.get("authorization") or "").removeprefix("Bearer ")
    return node_of(SECRET, cred)


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/api/nodes/v1/leases":
            req = json.loads(body)
            self.server.asks.append((_node(self), req["models"], req.get("kinds")))
        self.send_response(204)
        self.end_headers()

    def do_GET(self) -> None:
        self.server.adapters.append((_node(self), self.path))
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[_Recorder]:
    server = _Recorder(("127.0.0.1", 0), _Handler)
    server.asks, server.adapters = [], []
    with serving(server):
        yield server


def _trainer_asks(server: _Recorder) -> set[int | None]:
    return {n for n, _, kinds in server.asks if kinds == ["train"]}


def test_the_trainer_command_is_the_cpu_stand_in_with_the_fleet_hand_over() -> None:
    spec = TrainerSpec("http://127.0.0.1:9", "s", "/venv/bin/python", poll_s=0.5)
    argv = trainer_argv(spec, 8, ["Qwen/x", "batch"], "http://127.0.0.1:5", Path("/w"))
    assert argv[:3] == ["/venv/bin/python", "-m", "heady_node.finetune.runner"]
    text = " ".join(argv)
    assert "--gpu cpu --dev-base" in text and "--model Qwen/x --model batch" in text
    assert "--engine-control http://127.0.0.1:5/nodes/8" in text
    assert "--max-model-len 16384" in text and "--poll 0.5" in text
    with pytest.raises(ValueError, match="python"):
        TrainerSpec.parse({"gateway_url": "http://127.0.0.1:9", "node_secret": "s"})
    with pytest.raises(ValueError, match="poll_s"):
        TrainerSpec.parse(
            {"gateway_url": "http://127.0.0.1:9", "node_secret": "s", "python": "p", "poll_s": 0}
        )


def test_the_dev_base_is_refused_anywhere_but_the_cpu(capsys: pytest.CaptureFixture) -> None:
    argv = ["--gateway", "http://127.0.0.1:9", "--model", "m", "--dev-base", "--gpu", "t4"]
    with pytest.raises(SystemExit) as exit_:
        runner.build(argv, {runner.CREDENTIAL_ENV: "c"})
    assert exit_.value.code == 2 and "--dev-base trains on the CPU only" in capsys.readouterr().err
    plain = runner.build(argv[:4], {runner.CREDENTIAL_ENV: "c"})  # no flags: no sim parts
    assert isinstance(plain.engine, runner.NoEngine) and plain.loader is runner.default_loader


def test_make_dev_finds_the_torch_venv_only_once_installed(tmp_path: Path) -> None:
    venv = tmp_path / ".venv-torch"
    assert dev.torch_python(venv)[0] is None and "no torch venv" in dev.torch_python(venv)[1]
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert "incomplete" in dev.torch_python(venv)[1]  # make torch-install writes it last
    (venv / ".installed-0123abcd").write_text("")
    assert dev.torch_python(venv) == (venv / "bin" / "python", "")


def test_lora_trainers_and_the_engine_hand_over(gateway: _Recorder, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{gateway.server_address[1]}"
    with FleetProcess(api_key="tok") as fleet:
        # LoRA on the text nodes (not the vision pair), with the real resolver: an unknown
        # `ft:` model is asked of the gateway as the node itself, and then is vLLM's 404.
        bases = fleet.serve_lora(url, SECRET, cache_dir=tmp_path / "lora")
        assert bases == {str(n): NODE_MODELS[n] for n in (1, 2, 3, 4, 7, 8)}
        state = fleet.state()
        assert [n for n in state if caps.LORA in state[n]["capabilities"]] == list(bases)
        r = httpx.post(
            fleet.url(1) + "/v1/chat/completions",
            headers={"authorization": "Bearer tok"},
            json={"model": FT, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert gateway.adapters == [(1, f"/api/nodes/v1/adapters/{slug(FT)}")]

        fleet.start_workers(url, SECRET, log_dir=tmp_path)
        trainers = fleet.start_trainers(url, SECRET, sys.executable, log_dir=tmp_path, poll_s=0.2)
        assert sorted(trainers) == ["7", "8"] and all(t["alive"] for t in trainers.values())
        # Each runner asks for train work as its own node, with its engine's served names.
        wait_for(lambda: _trainer_asks(gateway) == {7, 8}, timeout=30)
        train_models = {n: m for n, m, k in gateway.asks if k == ["train"]}
        assert NODE_MODELS[8] in train_models[8] and "batch" in train_models[8]

        # The hand-over a trainer asks before training: worker drained, then the engine down.
        worker8 = fleet.workers()["8"]["pid"]
        down = fleet.engine_stop(8)
        assert down["mode"] == "refuse" and down["training"] is True
        assert down["drained"] is True and not alive(worker8)
        assert fleet.trainers()["8"]["training"] is True
        with pytest.raises(httpx.ConnectError):
            httpx.get(fleet.url(8) + "/health", timeout=5)
        # reset() heals the faults, not the hand-over: node 8 stays down, its worker too.
        fleet.set(1, "refuse")
        fleet.reset()
        assert fleet.state()["1"]["mode"] == "healthy"
        after = fleet.state()
        assert after["8"]["mode"] == "refuse"
        assert all(caps.LORA in after[n]["capabilities"] for n in bases)  # LoRA survives it
        assert fleet.workers()["8"]["alive"] is False
        up = fleet.engine_start(8)
        assert up["mode"] == "healthy" and up["training"] is False and up["loras"] == []
        assert fleet.workers()["8"]["alive"] is True and fleet.workers()["8"]["pid"] != worker8
        assert httpx.get(fleet.url(8) + "/health", timeout=5).status_code == 200

        # A node that dies takes its trainer with it; revive brings a new one.
        trainer7 = fleet.trainers()["7"]["pid"]
        killed = fleet.kill(7)
        assert killed["trainer"]["alive"] is False and not alive(trainer7)
        gateway.asks.clear()
        revived = fleet.revive(7)
        assert revived["trainer"]["alive"] is True and revived["trainer"]["pid"] != trainer7
        wait_for(lambda: 7 in _trainer_asks(gateway), timeout=30)
        assert "leasing train jobs" in (tmp_path / "trainer-7.log").read_text()

        with pytest.raises(FleetProcessError, match=r"HTTP 400.*torch-install"):
            fleet.start_trainers(url, SECRET, tmp_path / "no-python")
        pids = [t["pid"] for t in fleet.trainers().values()]
    for pid in pids:  # stopping the fleet stops its trainers
        wait_for(lambda pid=pid: not alive(pid), timeout=15)
