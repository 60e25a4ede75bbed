"""Run the operator's notebook top to bottom in dry-run mode (sim.node + dry-run tunnel)."""

import os
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import NoSuchKernel
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "heady-ai-processing.ipynb"


def _outputs(nb: nbformat.NotebookNode) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", ""))
            if "data" in out:
                text.append(out["data"].get("text/plain", ""))
    return "".join(text)


def test_notebook_dry_run_prints_wrangler_lines(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEADY_DRY_RUN", "1")
    monkeypatch.setenv("HEADY_NODE", "4")
    monkeypatch.delenv("HEADY_TUNNEL", raising=False)
    monkeypatch.delenv("NODE_TOKEN", raising=False)
    # The kernel must import heady_node and sim from this checkout even without an install.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # ipykernel's built-in "python3" spec runs this interpreter (no `ipykernel install` needed).
    try:
        KernelManager(kernel_name="python3").kernel_spec  # noqa: B018 - fail early if absent
    except NoSuchKernel:  # pragma: no cover - only without ipykernel
        raise AssertionError("ipykernel missing: pip install -e '.[dev]'") from None
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    out = _outputs(nb)
    # install: driver and CUDA first, then the pinned vLLM the documented way (not run here)
    assert "NVIDIA driver 550.54.15, supports CUDA up to 12.4" in out
    assert "uv pip install --python" in out
    assert "vllm==0.33.0 diffusers==0.42.1 --torch-backend=auto" in out
    assert "cloudflared-linux-amd64" in out
    assert "Node 4: role code, model Qwen/Qwen2.5-Coder-7B-Instruct-AWQ" in out
    assert "Answers to model names: Qwen/Qwen2.5-Coder-7B-Instruct-AWQ, code" in out
    assert "Tunnel: cloudflare via CF_TUNNEL_TOKEN_4, address node4.example.com" in out
    assert "\n  npx wrangler secret put COLAB_ENDPOINT_4\n" in out
    url = "https://node4.example.com"
    assert f"  echo {url} | npx wrangler secret put COLAB_ENDPOINT_4" in out
    assert f'  COLAB_ENDPOINT_4="{url}"' in out
    assert "node 4 (code) up | " in out
    assert out.rstrip().endswith("Node 4 stopped.")
