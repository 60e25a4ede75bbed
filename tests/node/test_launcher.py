"""Launcher, tunnel and session against real processes: sim.node as the engine and the
dry-run tunnel test double as ngrok/cloudflared."""

import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from heady_node import launcher, presets, settings, tunnel
from heady_node.gpu import GPU_CLASSES
from heady_node.session import NodeSession

PY = sys.executable
SIM = [PY, "-m", "sim.node"]
DRY_TUNNEL = [PY, "-m", "heady_node.dry_run_tunnel"]


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
    names = presets.served_model_names(preset.model.repo, 3)
    argv = presets.engine_argv(preset, port=port, engine=SIM, served_names=names)
    log = tmp_path / "engine.log"
    proc = launcher.spawn(argv, log_path=log, env=presets.engine_env(preset, "tok"))
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


def ngrok_double(port: int, api_port: int, url: str) -> list[str]:
    return [*DRY_TUNNEL, "--url", url, "--api-port", str(api_port), "--addr",
            f"http://127.0.0.1:{port}"]  # fmt: skip


def test_ngrok_url_comes_from_the_agent_api(tmp_path: Path) -> None:
    api_port = free_port()
    plan = tunnel.ngrok_plan(8123, "tok", api_url=f"http://127.0.0.1:{api_port}")
    cmd = ngrok_double(8123, api_port, "https://ab12.ngrok-free.dev")
    proc, url = tunnel.open_tunnel(plan, log_path=tmp_path / "t.log", timeout=20, command=cmd)
    try:
        assert url == "https://ab12.ngrok-free.dev"
        assert proc.poll() is None
        # Nothing in the log names the URL: it was read from the API.
        assert "ab12" not in (tmp_path / "t.log").read_text()
    finally:
        launcher.stop(proc, grace=5)
    assert proc.poll() is not None


def test_tunnel_failure_and_timeout_report_the_log(tmp_path: Path) -> None:
    plan = tunnel.ngrok_plan(8000, "tok", api_url=f"http://127.0.0.1:{free_port()}")
    failing = [*DRY_TUNNEL, "--fail", "334"]
    with pytest.raises(tunnel.TunnelError, match=r"exited with code 1 \(ERR_NGROK_334: .*another"):
        tunnel.open_tunnel(plan, log_path=tmp_path / "a.log", timeout=20, command=failing)
    silent = [PY, "-c", "import time; time.sleep(60)"]
    with pytest.raises(tunnel.TunnelError, match="gave no URL within 1s"):
        tunnel.open_tunnel(plan, log_path=tmp_path / "b.log", timeout=1, command=silent)
    cf = tunnel.cloudflare_plan("tok", "node7.example.com")
    cmd = [*DRY_TUNNEL, "--kind", "cloudflare"]
    proc, url = tunnel.open_tunnel(cf, log_path=tmp_path / "c.log", timeout=20, command=cmd)
    launcher.stop(proc, grace=5)
    assert url == "https://node7.example.com"


@pytest.mark.parametrize("kind", ["ngrok", "cloudflare"])
def test_dry_run_session_end_to_end(tmp_path: Path, kind: str) -> None:
    lines: list[str] = []
    s = NodeSession(node=6, tunnel_kind=kind, dry_run=True, log_dir=tmp_path, out=lines.append)
    s.preflight()
    s.start_engine()
    assert s.engine_proc is not None
    cmdline = Path(f"/proc/{s.engine_proc.pid}/cmdline").read_bytes()
    assert b"dry-run-node-token" not in cmdline  # the token travels in the environment
    base = s.local_url
    url = s.open_tunnel()
    s.keep_alive(rounds=2)
    text = "\n".join(lines)
    assert "model Qwen/Qwen2-VL-2B-Instruct" in text
    assert "Answers to model names: Qwen/Qwen2-VL-2B-Instruct, vision" in text
    assert "--api-key" not in text and "dry-run-node-token" not in text
    assert "--middleware heady_node.guard.NodeGuard" in text
    assert "image URLs allowed from: none (data: URLs only)" in text
    assert "  npx wrangler secret put COLAB_ENDPOINT_6" in lines
    assert f'  COLAB_ENDPOINT_6="{url}"' in lines
    assert sum("node 6 (vision) up | " in ln for ln in lines) == 2
    assert lines[-1] == "Node 6 stopped."
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=2)


def test_tunnel_failure_keeps_the_engine_and_a_retry_works(tmp_path: Path) -> None:
    lines: list[str] = []
    s = NodeSession(node=3, tunnel_kind="ngrok", dry_run=True, log_dir=tmp_path, out=lines.append)
    good = s.tunnel_command
    s.tunnel_command = [*DRY_TUNNEL, "--fail", "108"]
    s.preflight()
    s.start_engine()
    try:
        with pytest.raises(tunnel.TunnelError, match="ERR_NGROK_108"):
            s.open_tunnel()
        assert s.engine_proc is not None and s.engine_proc.poll() is None
        assert httpx.get(f"{s.local_url}/health", timeout=5).status_code == 200
        assert any("The engine keeps running at" in ln for ln in lines)
        assert s.status_once().endswith("| tunnel DOWN")
        s.tunnel_command = good  # the operator fixes the setting and re-runs the tunnel cell
        assert s.open_tunnel() == "https://heady-dry-run-node3.ngrok-free.dev"
        assert "tunnel DOWN" not in s.status_once()
    finally:
        s.stop()


def test_preflight_refuses_bad_settings_before_any_engine_starts(tmp_path: Path) -> None:
    secrets = {"NODE_TOKEN": "t", "CF_TUNNEL_TOKEN_1": "same", "CF_TUNNEL_TOKEN_2": "same",
               "CF_TUNNEL_HOSTNAME_1": "n1.example.com"}  # fmt: skip
    s = NodeSession(
        node=1,
        log_dir=tmp_path,
        engine=SIM,
        gpu_runner=lambda argv: "Tesla T4, 15360 MiB, 7.5, 550.54.15",
        secret=lambda name: secrets.get(name, ""),
        out=lambda line: None,
    )
    with pytest.raises(settings.SettingsError, match="node 1 and node 2"):
        s.start_engine()
    assert s.engine_proc is None
    del secrets["NODE_TOKEN"]
    with pytest.raises(settings.SettingsError, match="NODE_TOKEN is missing"):
        s.preflight()


def test_a_custom_route_table_decides_role_and_model_names(tmp_path: Path) -> None:
    def session(node: int, routes: str) -> NodeSession:
        return NodeSession(
            node=node, tunnel_kind="none", dry_run=True, log_dir=tmp_path, routes=routes,
            out=lambda line: None,
        )  # fmt: skip

    routes = '{"roles": {"code": [3], "reasoning": [1, 2]}, "fallback": [3]}'
    s = session(3, routes)
    s.preflight()
    assert s.role == "code"
    assert s.served_names == ("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", "code", "reasoning")
    s = session(1, routes)
    s.preflight()
    assert s.served_names[1:] == ("reasoning",)  # no longer anyone's fallback
    with pytest.raises(settings.SettingsError, match="node 5 is in no role's pair"):
        session(5, routes)
    with pytest.raises(settings.SettingsError, match="ROUTES"):
        session(3, '{"roles": {"code": [9]}}')
