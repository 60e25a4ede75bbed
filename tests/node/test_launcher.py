"""Launcher and tunnel against real processes: sim.node as the engine, fake_tunnel as ngrok."""

import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from heady_node import launcher, presets, tunnel
from heady_node.gpu import GPU_CLASSES
from heady_node.session import NodeSession

PY = sys.executable
SIM = [PY, "-m", "sim.node"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); /proc tells the truth.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_sim_engine_starts_healthy_serves_and_stops(tmp_path: Path) -> None:
    port = free_port()
    preset = presets.preset_for("code", GPU_CLASSES["t4"])
    argv = presets.engine_argv(preset, port=port, api_key="tok", engine=SIM)
    log = tmp_path / "engine.log"
    proc = launcher.spawn(argv, log_path=log)
    try:
        waited = launcher.wait_healthy(
            f"http://127.0.0.1:{port}", proc, log_path=log, timeout=30, interval=0.1
        )
        assert waited < 30
        base = f"http://127.0.0.1:{port}"
        assert launcher.smoke_test(base, "tok", preset.model.repo)
        with pytest.raises(launcher.EngineError, match="401"):
            launcher.smoke_test(base, "wrong", preset.model.repo)
    finally:
        launcher.stop(proc, grace=5)
    assert proc.poll() is not None
    assert "Uvicorn running" in log.read_text()


def test_dead_engine_fails_fast_with_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    code = "import sys; print('CUDA out of memory (pretend)'); sys.exit(3)"
    proc = launcher.spawn([PY, "-c", code], log_path=log)
    start = time.monotonic()
    with pytest.raises(launcher.EngineError, match=r"code 3[\s\S]*CUDA out of memory"):
        launcher.wait_healthy(
            f"http://127.0.0.1:{free_port()}", proc, log_path=log, timeout=30, interval=0.1
        )
    assert time.monotonic() - start < 10


def test_hung_engine_times_out_and_is_killed_with_its_children(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    pidfile = tmp_path / "child.pid"
    # An engine that forks a worker (as vLLM does) and never answers, ignoring SIGTERM.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
        "print('loading weights...', flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = launcher.spawn([PY, "-c", code], log_path=log)
    with pytest.raises(launcher.EngineError, match=r"not healthy after 1s[\s\S]*loading weights"):
        launcher.wait_healthy(
            f"http://127.0.0.1:{free_port()}", proc, log_path=log, timeout=1.0, interval=0.1
        )
    for _ in range(50):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.1)
    child = int(pidfile.read_text())
    assert alive(child)
    launcher.stop(proc, grace=0.5)  # SIGTERM ignored -> SIGKILL for the whole group
    assert proc.poll() is not None
    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.1)
    assert not alive(child), "engine's child survived stop()"


def test_tunnel_with_injected_command(tmp_path: Path) -> None:
    plan = tunnel.ngrok_plan(8000, "tok")
    cmd = [PY, "-m", "heady_node.fake_tunnel", "--url", "https://ab12.ngrok-free.app"]
    proc, url = tunnel.open_tunnel(plan, log_path=tmp_path / "t.log", timeout=20, command=cmd)
    try:
        assert url == "https://ab12.ngrok-free.app"
        assert proc.poll() is None
    finally:
        launcher.stop(proc, grace=5)
    assert proc.poll() is not None


def test_tunnel_failure_and_timeout_report_the_log(tmp_path: Path) -> None:
    plan = tunnel.ngrok_plan(8000, "tok")
    failing = [PY, "-m", "heady_node.fake_tunnel", "--fail"]
    with pytest.raises(tunnel.TunnelError, match=r"exited with code 1[\s\S]*authentication"):
        tunnel.open_tunnel(plan, log_path=tmp_path / "a.log", timeout=20, command=failing)
    silent = [PY, "-c", "import time; time.sleep(60)"]
    with pytest.raises(tunnel.TunnelError, match="gave no URL within 1s"):
        tunnel.open_tunnel(plan, log_path=tmp_path / "b.log", timeout=1, command=silent)
    cf = tunnel.cloudflare_plan("tok", "node7.example.com")
    cmd = [PY, "-m", "heady_node.fake_tunnel", "--kind", "cloudflare"]
    proc, url = tunnel.open_tunnel(cf, log_path=tmp_path / "c.log", timeout=20, command=cmd)
    launcher.stop(proc, grace=5)
    assert url == "https://node7.example.com"


@pytest.mark.parametrize("kind", ["ngrok", "cloudflare"])
def test_dry_run_session_end_to_end(tmp_path: Path, kind: str) -> None:
    lines: list[str] = []
    s = NodeSession(node=6, tunnel_kind=kind, dry_run=True, log_dir=tmp_path, out=lines.append)
    s.plan()
    s.start_engine()
    base = s.local_url
    url = s.open_tunnel()
    s.keep_alive(rounds=2)
    text = "\n".join(lines)
    assert "model Qwen/Qwen2-VL-2B-Instruct" in text
    assert "--api-key ***" in text and "dry-run-node-token" not in text
    assert "  npx wrangler secret put COLAB_ENDPOINT_6" in lines
    assert f'  COLAB_ENDPOINT_6="{url}"' in lines
    assert sum("node 6 (vision) up | served" in ln for ln in lines) == 2
    assert lines[-1] == "Node 6 stopped."
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=2)


def test_session_requires_node_token_outside_dry_run(tmp_path: Path) -> None:
    s = NodeSession(
        node=1,
        log_dir=tmp_path,
        engine=SIM,
        gpu_runner=lambda argv: "Tesla T4, 15360 MiB",
        secret=lambda name: "",
        out=lambda line: None,
    )
    with pytest.raises(RuntimeError, match="NODE_TOKEN is missing"):
        s.start_engine()
    assert s.engine_proc is None
