"""``python -m sim.fleet`` (control API, readiness line, shutdown) and ``python -m sim.node``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _spawn(*args: str, stdin: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


FleetProc = tuple[subprocess.Popen[str], dict]


@pytest.fixture
def fleet_proc() -> Iterator[FleetProc]:
    proc = _spawn("-m", "sim.fleet", "--count", "3", "--exit-on-stdin-eof")
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield proc, ready
    finally:
        _kill(proc)


def test_fleet_cli_ready_line_and_control_api(fleet_proc: FleetProc) -> None:
    _, ready = fleet_proc
    assert sorted(ready["nodes"]) == ["1", "2", "3"]
    ctl = ready["control"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", ctl)
    with httpx.Client(timeout=5) as c:
        for n, url in ready["nodes"].items():
            r = c.get(url + "/health")
            assert (r.status_code, r.headers["x-sim-node"]) == (200, n)

        nodes = c.get(ctl + "/nodes").json()
        assert {s["mode"] for s in nodes.values()} == {"healthy"}
        assert nodes["1"]["requests"] == 1

        r = c.post(ctl + "/nodes/2", json={"mode": "status", "status": 503, "headers": {"A": "b"}})
        assert r.status_code == 200
        assert r.json()["mode"] == "status"
        hit = c.get(ready["nodes"]["2"] + "/v1/models")
        assert (hit.status_code, hit.headers["a"]) == (503, "b")

        assert c.post(ctl + "/nodes/3", json={"load": 4}).json()["load"] == 4
        assert "} 4.0" in c.get(ready["nodes"]["3"] + "/metrics").text

        c.post(ready["nodes"]["1"] + "/v1/chat/completions", json={"messages": [{"content": "q"}]})
        reqs = c.get(ctl + "/nodes/1/requests").json()
        assert [r["path"] for r in reqs] == ["/health", "/v1/chat/completions"]
        assert reqs[1]["body_len"] == len(reqs[1]["body"].encode())
        assert len(reqs[1]["body_sha256"]) == 64

        c.post(ctl + "/nodes/1", json={"mode": "refuse"})
        with pytest.raises(httpx.ConnectError):  # a new connection: the pooled one was reset
            httpx.get(ready["nodes"]["1"] + "/health", timeout=5)

        reset = c.post(ctl + "/reset").json()
        assert {s["mode"] for s in reset.values()} == {"healthy"}
        assert {s["load"] for s in reset.values()} == {0}
        assert c.get(ready["nodes"]["1"] + "/health").status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/nodes/1", b"{nope"),
        ("/nodes/1", b"[1]"),
        ("/nodes/1", b'{"mode": "bogus"}'),
        ("/nodes/1", b'{"mode": "status", "status": "x"}'),
        ("/nodes/1", b'{"mode": "healthy", "extra": 1}'),
        ("/nodes/1", b'{"delay": 1}'),
        ("/nodes/1", b'{"load": -3}'),
        ("/nodes/1", b"{}"),
    ],
)
def test_fleet_cli_bad_control_input_is_400(fleet_proc: FleetProc, path: str, body: bytes) -> None:
    _, ready = fleet_proc
    r = httpx.post(ready["control"] + path, content=body, timeout=5)
    assert r.status_code == 400
    assert "error" in r.json()


def test_fleet_cli_unknown_node_is_404(fleet_proc: FleetProc) -> None:
    _, ready = fleet_proc
    assert httpx.post(ready["control"] + "/nodes/9", json={"load": 1}).status_code == 404


def test_fleet_cli_exits_on_stdin_eof(fleet_proc: FleetProc) -> None:
    proc, ready = fleet_proc
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=5) == 0
    port = int(ready["nodes"]["1"].rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_fleet_cli_exits_on_sigterm() -> None:
    proc = _spawn("-m", "sim.fleet", "--count", "1", stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert httpx.get(ready["nodes"]["1"] + "/health", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        _kill(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_cli_stands_in_for_vllm_serve() -> None:
    port = _free_port()
    args = ["serve", "org/Model-7B", "--port", str(port), "--api-key", "k"]
    args += ["--max-model-len", "4096", "--gpu-memory-utilization", "0.9", "--enforce-eager"]
    proc = _spawn("-m", "sim.node", *args, stdin=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"Uvicorn running on http://127.0.0.1:{port}" in line
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=5) as c:
            assert c.get(url + "/health").status_code == 200
            assert c.get(url + "/v1/models").status_code == 401
            models = c.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
            assert models["data"][0]["id"] == "org/Model-7B"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        _kill(proc)


def test_node_cli_served_model_name_and_node_number() -> None:
    port = _free_port()
    args = ["some/model", "--port", str(port), "--served-model-name", "alias", "code"]
    args += ["--node", "4"]
    proc = _spawn("-m", "sim.node", *args, "--tensor-parallel-size", "1", stdin=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        assert "Uvicorn running" in proc.stderr.readline()
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        cards = r.json()["data"]
        assert [m["id"] for m in cards] == ["alias", "code"]  # vLLM: one card per name
        assert {m["root"] for m in cards} == {"some/model"}  # rooted at the checkpoint
        assert r.headers["x-sim-node"] == "4"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        _kill(proc)


def test_node_cli_honours_max_num_seqs() -> None:
    # The node side passes vLLM's --max-num-seqs from its preset; the sim queues beyond it.
    port = _free_port()
    args = ["m", "--port", str(port), "--max-num-seqs", "1", "--sim-token-s", "0.1"]
    proc = _spawn("-m", "sim.node", *args, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a", "max_tokens": 5}
    try:
        assert proc.stderr is not None
        assert "Uvicorn running" in proc.stderr.readline()
        with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=5) as c:
            first = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=5)
            second = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=5)
            waiting = 'vllm:num_requests_waiting{model_name="m"} 1.0'
            deadline = time.monotonic() + 5
            while waiting not in c.get(url + "/metrics").text:
                assert time.monotonic() < deadline, "the second request never waited"
                time.sleep(0.01)
            assert [first.result().status_code, second.result().status_code] == [200, 200]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        _kill(proc)


def test_node_cli_refuses_a_bad_max_num_seqs() -> None:
    proc = _spawn("-m", "sim.node", "--port", "0", "--max-num-seqs", "0", stdin=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=10) == 2
        assert proc.stderr is not None and "max_num_seqs must be at least 1" in proc.stderr.read()
    finally:
        _kill(proc)
