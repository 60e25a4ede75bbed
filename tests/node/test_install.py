"""Host checks before installing vLLM, and the documented install commands."""

import pytest

from heady_node import install


@pytest.mark.parametrize(
    ("driver", "cuda", "cc", "problem"),
    [
        ("550.54.15", "12.4", 7.5, None),  # Colab's T4 today: CUDA 12 minor version compatibility
        ("525.60.13", "12.0", 8.0, None),
        ("580.82.07", "13.0", 12.0, None),
        ("570.86.10", "12.8", 12.0, None),
        ("470.82.01", "11.4", 7.5, "older than 525"),
        ("550.54.15", "12.4", 12.0, "needs a driver supporting CUDA 12.8"),
        ("550.54.15", None, 10.0, "supports an unknown version"),
        ("n/a", "12.4", 8.0, "cannot read the NVIDIA driver version"),
    ],
)
def test_host_problems(driver: str, cuda: str | None, cc: float, problem: str | None) -> None:
    problems = install.host_problems(driver, cuda, cc)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


def test_install_commands_pin_vllm_and_use_uv_torch_backend_auto(monkeypatch) -> None:
    monkeypatch.setattr(install, "in_virtualenv", lambda: False)
    cmds = install.install_commands("cloudflare", python="/usr/bin/python3", bin_dir="/opt/bin")
    assert cmds[0] == ["/usr/bin/python3", "-m", "pip", "install", "--quiet", "uv"]
    assert cmds[1] == [
        "/usr/bin/python3", "-m", "uv", "pip", "install", "--python", "/usr/bin/python3",
        "--system", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "bitsandbytes==0.50.2",
        "vllm==0.33.0", "diffusers==0.42.1", "--torch-backend=auto",
    ]  # fmt: skip
    assert cmds[2] == ["vllm", "download-kernels"]
    assert cmds[3][:3] == ["curl", "-fsSLo", "/opt/bin/cloudflared"]
    monkeypatch.setattr(install, "in_virtualenv", lambda: True)
    assert "--system" not in install.install_commands("none")[1]
    assert len(install.install_commands("none")) == 3


def test_run_commands_stops_at_the_first_failure(tmp_path) -> None:
    seen: list[str] = []
    marker = tmp_path / "ran"
    cmds = [["false"], ["touch", str(marker)]]
    with pytest.raises(install.InstallError, match="`false` failed with exit code 1"):
        install.run_commands(cmds, out=seen.append)
    assert seen == ["$ false"] and not marker.exists()
