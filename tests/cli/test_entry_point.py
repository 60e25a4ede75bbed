"""The `heady` console script as a process: exit codes and output against real sim nodes."""

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-node-token"


def heady() -> list[str]:
    script = shutil.which("heady", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "heady_cli"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_TOKEN", "GATEWAY_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "250"
    return subprocess.run(
        [*heady(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sim_nodes() -> Iterator[dict[int, str]]:
    """Nodes 1, 3, 5, 7 up (one per role), each a sim.node with the cluster token."""
    procs, urls = [], {}
    for n in (1, 3, 5, 7):
        port = free_port()
        cmd = [sys.executable, "-m", "sim.node", f"model-{n}", "--port", str(port),
               "--node", str(n), "--api-key", TOKEN]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL))
        urls[n] = f"http://127.0.0.1:{port}"
    try:
        for url in urls.values():
            for _ in range(100):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def write_vars(tmp_path: Path, urls: dict[int, str], token: str = TOKEN) -> None:
    lines = [f'NODE_TOKEN="{token}"'] + [f"COLAB_ENDPOINT_{n}={u}" for n, u in urls.items()]
    (tmp_path / ".dev.vars").write_text("\n".join(lines) + "\n")


def test_probe_healthy_cluster_exits_0(sim_nodes: dict[int, str], tmp_path: Path) -> None:
    write_vars(tmp_path, sim_nodes)
    res = run("probe", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Every role has at least one healthy node." in res.stdout
    assert "model-5" in res.stdout and TOKEN not in res.stdout
    assert "Traceback" not in res.stderr


def test_probe_wrong_token_and_dead_node_exit_1(sim_nodes: dict[int, str], tmp_path: Path) -> None:
    urls = {**sim_nodes, 8: f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    write_vars(tmp_path, urls, token="wrong-token")
    res = run("probe", "--timeout", "3", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stdout.count("NODE_TOKEN rejected") == 4
    assert "connection refused" in res.stdout
    assert "No healthy node for role(s): reasoning, code, vision, batch" in res.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("probe",), "NODE_TOKEN is not set"),
        (("secrets", "1=https://me:pw@x.ngrok-free.app"), "credentials"),
        (("status", "--gateway", "http://127.0.0.1:9", "--key", "k"), "cannot reach gateway"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and needle in res.stderr
    assert "Traceback" not in res.stderr


def test_status_non_json_answer(sim_nodes: dict[int, str], tmp_path: Path) -> None:
    # A sim node is not a gateway: /api/status is not JSON there (or not found).
    res = run("status", "--gateway", sim_nodes[1], "--key", "k", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("heady: error: gateway")


def test_secrets_prints_bulk_json(tmp_path: Path) -> None:
    res = run("secrets", "2=https://ab-cd.ngrok-free.app", cwd=tmp_path)
    assert res.returncode == 0
    assert res.stdout.strip() == '{\n  "COLAB_ENDPOINT_2": "https://ab-cd.ngrok-free.app"\n}'
