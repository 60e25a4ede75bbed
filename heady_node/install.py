"""Install vLLM and the tunnel agent the way their vendors document, after checking the host.

vLLM is pinned (VLLM_VERSION) and installed as vLLM's installation guide says for CUDA
(docs/getting_started/installation/gpu.cuda.inc.md in vLLM 0.33.0): `uv pip install vllm
--torch-backend=auto` (uv picks the PyTorch build matching the installed driver), then
`vllm download-kernels` (FlashInfer's precompiled kernels; without them vLLM compiles them at
start-up). The driver is checked first: vLLM 0.33.0's wheels are built for CUDA 12.9 (same page),
which runs on any driver of the CUDA 12 family, >= 525, through CUDA minor version compatibility
(https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html); Blackwell
cards need CUDA 12.8 or newer in the driver ("NVIDIA Blackwell GPUs ... require a minimum of
CUDA 12.8", same vLLM page).
"""

import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from heady_node import gpu as gpu_mod

VLLM_VERSION = "0.33.0"
# The image engine on vision nodes (heady_node.image_server), installed in the same resolve as
# vLLM so it runs on vLLM's torch (diffusers needs no torch of its own); vLLM already brings
# transformers, safetensors, Pillow, starlette/uvicorn and python-multipart.
DIFFUSERS_VERSION = "0.42.1"
# Fine-tuning on the batch pair (heady_node.finetune.trainer), in the same resolve so training
# runs on vLLM's torch and transformers: the pins of requirements-torch.txt (the CPU tests) plus
# bitsandbytes for 4-bit QLoRA where the base does not fit the card in 16 bits. Listed before
# vLLM on the command line; uv resolves them together.
FINETUNE_PINS = ("peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "bitsandbytes==0.50.2")
MIN_DRIVER_MAJOR = 525
BLACKWELL_COMPUTE_CAPABILITY = 10.0
BLACKWELL_MIN_CUDA = (12, 8)
NGROK_TGZ = "https://bin.equinox.io/c/bNyj1mQVY4c/ngrok-v3-stable-linux-amd64.tgz"
CLOUDFLARED = (
    "https://github.com/cloudflare/cloudflared/releases/latest/download/cloudflared-linux-amd64"
)


class InstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class HostReport:
    gpu: gpu_mod.Gpu
    cuda: str | None  # highest CUDA version the driver supports (nvidia-smi banner)

    def lines(self) -> list[str]:
        return [
            self.gpu.describe(),
            f"NVIDIA driver {self.gpu.driver}, supports CUDA up to {self.cuda or 'unknown'}; "
            f"installing vLLM {VLLM_VERSION} (built for CUDA 12.9, runs on drivers >= "
            f"{MIN_DRIVER_MAJOR})",
        ]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def host_problems(driver: str, cuda: str | None, compute_capability: float) -> list[str]:
    """Why this driver cannot run vLLM VLLM_VERSION on this card; empty when it can."""
    problems = []
    major = _version(driver)[:1]
    if not major:
        problems.append(f"cannot read the NVIDIA driver version from {driver!r}")
    elif major[0] < MIN_DRIVER_MAJOR:
        problems.append(
            f"NVIDIA driver {driver} is older than {MIN_DRIVER_MAJOR}: vLLM {VLLM_VERSION} needs "
            "a CUDA 12 driver (update the driver, or use a host image with a newer one)"
        )
    if compute_capability >= BLACKWELL_COMPUTE_CAPABILITY and (
        cuda is None or _version(cuda)[:2] < BLACKWELL_MIN_CUDA
    ):
        need = ".".join(map(str, BLACKWELL_MIN_CUDA))
        problems.append(
            f"this Blackwell card (compute capability {compute_capability:.1f}) needs a driver "
            f"supporting CUDA {need} or newer; this one supports {cuda or 'an unknown version'}"
        )
    return problems


def inspect_host(runner: gpu_mod.Runner = gpu_mod.run) -> HostReport:
    """GPU, driver and CUDA version; raises GpuError / InstallError with the reason to stop."""
    gpu = gpu_mod.detect_gpu(runner)
    try:
        cuda = gpu_mod.parse_cuda_version(runner(gpu_mod.NVIDIA_SMI_SUMMARY))
    except (OSError, subprocess.SubprocessError):
        cuda = None
    report = HostReport(gpu, cuda)
    if problems := host_problems(gpu.driver, cuda, gpu.compute_capability):
        raise InstallError("; ".join(problems))
    return report


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def install_commands(
    tunnel: str, *, python: str = sys.executable, bin_dir: str = "/usr/local/bin"
) -> list[list[str]]:
    """The commands, in order. uv installs into `python`'s environment (`--system` when that is
    not a virtualenv, e.g. Colab's interpreter)."""
    target = ["--python", python] + ([] if in_virtualenv() else ["--system"])
    cmds = [
        [python, "-m", "pip", "install", "--quiet", "uv"],
        [
            python,
            "-m",
            "uv",
            "pip",
            "install",
            *target,
            *FINETUNE_PINS,
            f"vllm=={VLLM_VERSION}",
            f"diffusers=={DIFFUSERS_VERSION}",
            "--torch-backend=auto",
        ],
        ["vllm", "download-kernels"],
    ]
    if tunnel == "ngrok":
        cmds.append(["sh", "-c", f"curl -fsSL {NGROK_TGZ} | tar xz -C {bin_dir}"])
    elif tunnel == "cloudflare":
        cmds.append(["curl", "-fsSLo", f"{bin_dir}/cloudflared", CLOUDFLARED])
        cmds.append(["chmod", "+x", f"{bin_dir}/cloudflared"])
    return cmds


def run_commands(
    cmds: Sequence[list[str]],
    *,
    out: Callable[[str], None] = print,
    execute: bool = True,
) -> None:
    for cmd in cmds:
        out("$ " + " ".join(cmd))
        if execute:
            result = subprocess.run(cmd, check=False)
            if result.returncode != 0:
                raise InstallError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}")
