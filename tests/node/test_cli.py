"""`heady-node` end to end as the operator runs it: the console script, real child processes.

The GPU is a stand-in `nvidia-smi` script first on PATH (the real detection code runs it); the
engine is sim.node (dry run) or the vLLM-shaped FastAPI app with the guard loaded through
`--middleware`, exactly as vLLM would load it.
"""

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADY_NODE = [sys.executable, "-m", "heady_node.cli"]
TOKEN = "cli-node-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_nvidia_smi(tmp_path: Path, csv: str, cuda: str = "12.4") -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu*) echo ' + repr(csv) + " ;;\n"
        f"*) echo '| NVIDIA-SMI 550.54.15  Driver Version: 550.54.15  CUDA Version: {cuda} |' ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def run(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HEADY_", "CF_", "NGROK_"))}
    clean.pop("NODE_TOKEN", None)
    return subprocess.run(
        [*HEADY_NODE, *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_serve_dry_run_end_to_end(tmp_path: Path) -> None:
    r = run(["serve", "--node", "3", "--dry-run", "--rounds", "2", "--log-dir", str(tmp_path)], {})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "GPU: Tesla T4 (15.0 GiB, compute capability 7.5, driver 550.54.15)" in out
    assert "Answers to model names: Qwen/Qwen2.5-Coder-7B-Instruct-AWQ, code" in out
    assert "Tunnel: cloudflare via CF_TUNNEL_TOKEN_3, address node3.example.com" in out
    assert '  COLAB_ENDPOINT_3="https://node3.example.com"' in out
    assert out.count("node 3 (code) up | ") == 2
    assert out.rstrip().endswith("Node 3 stopped.")


def test_serve_on_a_gpu_host_publishes_only_the_guarded_api(tmp_path: Path) -> None:
    port = free_port()
    env = fake_nvidia_smi(tmp_path, "NVIDIA L4, 23034 MiB, 8.9, 550.54.15")
    env |= {"NODE_TOKEN": TOKEN, "HEADY_NODE": "1", "HEADY_TUNNEL": "none"}
    engine = f"{sys.executable} -m tests.node.vllm_shape serve"
    args = ["serve", "--port", str(port), "--engine", engine, "--status-interval", "0.3"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HEADY_", "CF_", "NGROK_"))}
    proc = subprocess.Popen(
        [*HEADY_NODE, *args, "--log-dir", str(tmp_path)],
        env={**clean, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = _read_until(proc, "node 1 (reasoning) up", timeout=60)
    try:
        assert "Guard active: only /v1/*, /health and /metrics answer" in seen, seen
        assert (
            "Answers to model names: Qwen/Qwen2.5-14B-Instruct-AWQ, reasoning, code, vision, batch"
            in seen
        )
        assert "--dtype auto" in seen and "--quantization" not in seen
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401
        ids = [m["id"] for m in httpx.get(f"{base}/v1/models", headers=auth).json()["data"]]
        assert ids == ["Qwen/Qwen2.5-14B-Instruct-AWQ", "reasoning", "code", "vision", "batch"]
        chat = {"model": "vision", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", headers=auth, json=chat).status_code == 200
        assert httpx.post(f"{base}/invocations", headers=auth).status_code == 404
        assert httpx.post(f"{base}/pause", headers=auth).status_code == 404
        assert httpx.get(f"{base}/metrics").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert rest.rstrip().endswith("Node 1 stopped.")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=2)


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    text, deadline = "", time.monotonic() + timeout
    while marker not in text:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"no {marker!r} in:\n{text}{proc.stdout.read()}")
        if sel.select(timeout=0.5):
            text += proc.stdout.readline()
    return text


def test_a_v100_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path, "Tesla V100-SXM2-16GB, 16384 MiB, 7.0, 550.54.15")
    env |= {"NODE_TOKEN": TOKEN}
    r = run(["serve", "--node", "2", "--tunnel", "none", "--log-dir", str(tmp_path)], env)
    assert r.returncode == 2
    assert r.stderr.startswith("heady-node: error: GPU Tesla V100-SXM2-16GB has compute capability")
    assert not list(tmp_path.glob("engine-*.log"))


def test_missing_tunnel_secret_stops_before_the_model_loads(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path, "Tesla T4, 15360 MiB, 7.5, 550.54.15") | {"NODE_TOKEN": TOKEN}
    r = run(["serve", "--node", "5", "--log-dir", str(tmp_path)], env)
    assert r.returncode == 2
    assert "heady-node: error: CF_TUNNEL_TOKEN_5 is missing" in r.stderr
    assert not list(tmp_path.glob("engine-*.log"))


def test_install_prints_driver_and_cuda_first_then_the_pinned_commands(tmp_path: Path) -> None:
    r = run(["install", "--tunnel", "ngrok", "--dry-run"], {})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("GPU: Tesla T4")
    assert lines[1].startswith("NVIDIA driver 550.54.15, supports CUDA up to 12.4")
    assert any(ln.endswith("vllm==0.33.0 diffusers==0.42.1 --torch-backend=auto") for ln in lines)
    assert "$ vllm download-kernels" in lines
    assert any("ngrok-v3-stable-linux-amd64.tgz" in ln for ln in lines)


def test_install_stops_early_on_a_driver_too_old_for_cuda_12(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path, "Tesla T4, 15360 MiB, 7.5, 470.82.01", cuda="11.4")
    r = run(["install", "--tunnel", "none"], env)
    assert r.returncode == 2
    assert "NVIDIA driver 470.82.01 is older than 525" in r.stderr
    assert "$ " not in r.stdout  # nothing was run
