"""GPU detection: parse `nvidia-smi` output and map the card to a preset class.

vLLM 0.33 needs compute capability >= 7.5 ("GPU: compute capability 7.5 or higher (e.g., T4,
RTX20xx, A100, L4, H100, B200, etc.)", docs/getting_started/installation/gpu.cuda.inc.md), so a
V100 (7.0) or older is refused with that reason instead of failing later inside vLLM.
"""

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

NVIDIA_SMI = [
    "nvidia-smi",
    "--query-gpu=name,memory.total,compute_cap,driver_version",
    "--format=csv,noheader",
]
NVIDIA_SMI_SUMMARY = ["nvidia-smi"]  # its banner carries "CUDA Version: X.Y" (driver's maximum)
MIN_COMPUTE_CAPABILITY = 7.5
BF16_COMPUTE_CAPABILITY = 8.0  # bfloat16 arrived with Ampere
MEMORY_SLACK = 0.99  # a card reporting 1% less than its class (ECC, reserved) still belongs to it

# A runner takes an argv and returns stdout; injectable so tests never need a GPU.
Runner = Callable[[list[str]], str]


@dataclass(frozen=True)
class GpuClass:
    key: str
    label: str
    memory_gib: float  # what nvidia-smi reports for the reference card: presets are checked on it
    compute_capability: float  # of the reference card
    names: tuple[str, ...]  # substrings of nvidia-smi's name that identify the card

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= BF16_COMPUTE_CAPABILITY


# The cards Colab offers (T4, L4, A100 40/80 GB, H100, G4 = RTX PRO 6000 Blackwell 96 GB) and the
# same cards on any other host. Memory is nvidia-smi's MiB / 1024.
GPU_CLASSES: dict[str, GpuClass] = {
    c.key: c
    for c in (
        GpuClass("t4", "T4 16 GB", 15360 / 1024, 7.5, ("T4",)),
        GpuClass("l4", "L4 24 GB", 23034 / 1024, 8.9, ("L4",)),
        GpuClass("a100-40", "A100 40 GB", 40960 / 1024, 8.0, ("A100",)),
        GpuClass("a100-80", "A100 80 GB", 81920 / 1024, 8.0, ("A100",)),
        GpuClass("h100", "H100 80 GB", 81559 / 1024, 9.0, ("H100",)),
        GpuClass("rtx-pro-6000", "RTX PRO 6000 96 GB (G4)", 97887 / 1024, 12.0, ("RTX PRO 6000",)),
    )
}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    compute_capability: float
    driver: str
    gpu_class: GpuClass
    known: bool  # False: an unknown card placed in a class by its memory and capability

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= BF16_COMPUTE_CAPABILITY

    def describe(self) -> str:
        head = (
            f"GPU: {self.name} ({self.memory_gib:.1f} GiB, compute capability "
            f"{self.compute_capability:.1f}, driver {self.driver})"
        )
        if self.known:
            return f"{head} -> preset class {self.gpu_class.key}"
        return (
            f"{head} -> not a card with its own presets; using class {self.gpu_class.key} "
            f"({self.gpu_class.label}), the largest its memory and compute capability allow"
        )


class GpuError(RuntimeError):
    pass


def parse_nvidia_smi(output: str) -> tuple[str, float, float, str]:
    """First GPU's (name, memory GiB, compute capability, driver) from
    `Tesla T4, 15360 MiB, 7.5, 550.54.15` lines."""
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rsplit(",", 3)]
        if len(parts) != 4 or not parts[0]:
            break
        name, mem, cc, driver = parts
        try:
            mem_parts = mem.split()
            mib = float(mem_parts[0])
            capability = float(cc)
        except (ValueError, IndexError):
            break
        unit = mem_parts[1].lower() if len(mem_parts) > 1 else "mib"
        return name, (mib / 1024 if unit == "mib" else mib), capability, driver
    raise GpuError(
        f"cannot parse nvidia-smi output: {output.strip()[:200]!r} (a driver too old to report "
        "compute_cap is also too old for vLLM's CUDA 12 build)"
    )


def parse_cuda_version(summary: str) -> str | None:
    """The driver's highest supported CUDA version from plain `nvidia-smi` output."""
    m = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", summary)
    return m.group(1) if m else None


def classify(name: str, memory_gib: float, compute_capability: float) -> tuple[GpuClass, bool]:
    """(class, known). A known card by name (if it has its class's memory); anything else: the
    largest class whose memory it has. Refuses what vLLM cannot run."""
    if compute_capability < MIN_COMPUTE_CAPABILITY:
        raise GpuError(
            f"GPU {name} has compute capability {compute_capability:.1f}; vLLM needs "
            f"{MIN_COMPUTE_CAPABILITY} or higher (T4, L4, A100, H100, RTX PRO 6000, ...). "
            "Pick another GPU type (V100 and older are not supported)."
        )
    upper = name.upper()
    named = [
        c
        for c in GPU_CLASSES.values()
        if any(n in upper for n in c.names)
        and not (c.key == "l4" and "L40" in upper)
        and memory_gib >= c.memory_gib * MEMORY_SLACK
    ]
    if named:
        return max(named, key=lambda c: c.memory_gib), True
    fitting = [c for c in GPU_CLASSES.values() if c.memory_gib * MEMORY_SLACK <= memory_gib]
    if not fitting:
        smallest = min(GPU_CLASSES.values(), key=lambda c: c.memory_gib)
        raise GpuError(
            f"GPU {name} with {memory_gib:.1f} GiB is smaller than any preset "
            f"({smallest.label} needs {smallest.memory_gib:.1f} GiB)"
        )
    return max(fitting, key=lambda c: c.memory_gib), False


def run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def detect_gpu(runner: Runner = run) -> Gpu:
    try:
        out = runner(NVIDIA_SMI)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GpuError(
            "no NVIDIA GPU visible (Colab: Runtime > Change runtime type > GPU; elsewhere: is the "
            f"NVIDIA driver installed?), nvidia-smi failed: {exc}"
        ) from exc
    name, gib, capability, driver = parse_nvidia_smi(out)
    gpu_class, known = classify(name, gib, capability)
    return Gpu(name, gib, capability, driver, gpu_class, known)
