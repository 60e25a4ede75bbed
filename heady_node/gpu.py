"""GPU detection: parse `nvidia-smi` output and map the card to a preset class."""

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

NVIDIA_SMI = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]

# A runner takes an argv and returns stdout; injectable so tests never need a GPU.
Runner = Callable[[list[str]], str]


@dataclass(frozen=True)
class GpuClass:
    key: str
    label: str
    memory_gib: float  # what nvidia-smi reports on Colab, the budget presets are checked against
    bf16: bool  # Ampere+ only; older cards must run float16
    awq: bool  # vLLM's AWQ kernels need compute capability >= 7.5


GPU_CLASSES: dict[str, GpuClass] = {
    c.key: c
    for c in (
        GpuClass("t4", "T4 16 GB", 15360 / 1024, bf16=False, awq=True),
        GpuClass("v100", "V100 16 GB", 16384 / 1024, bf16=False, awq=False),
        GpuClass("l4", "L4 24 GB", 23034 / 1024, bf16=True, awq=True),
        GpuClass("a100-40", "A100 40 GB", 40960 / 1024, bf16=True, awq=True),
        GpuClass("a100-80", "A100 80 GB / H100 80 GB", 81920 / 1024, bf16=True, awq=True),
    )
}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    gpu_class: GpuClass


class GpuError(RuntimeError):
    pass


def parse_nvidia_smi(output: str) -> tuple[str, float]:
    """First GPU's (name, memory GiB) from `name, 15360 MiB` lines."""
    for line in output.splitlines():
        if not line.strip():
            continue
        name, _, mem = line.rpartition(",")
        parts = mem.split()
        if not name.strip() or not parts:
            break
        try:
            mib = float(parts[0])
        except ValueError:
            break
        unit = parts[1].lower() if len(parts) > 1 else "mib"
        gib = mib / 1024 if unit == "mib" else mib
        return name.strip(), gib
    raise GpuError(f"cannot parse nvidia-smi output: {output.strip()[:200]!r}")


def classify(name: str, memory_gib: float) -> GpuClass:
    """Known cards by name; anything else by memory, conservatively (float16, no AWQ)."""
    n = name.upper()
    if "T4" in n:
        return GPU_CLASSES["t4"]
    if "V100" in n:
        return GPU_CLASSES["v100"]
    if "L4" in n and "L40" not in n:
        return GPU_CLASSES["l4"]
    if ("A100" in n or "H100" in n) and memory_gib >= 70:
        return GPU_CLASSES["a100-80"]
    if "A100" in n:
        return GPU_CLASSES["a100-40"]
    # Unknown card: the biggest class whose budget it covers, tuned down to the safest kernels.
    fitting = [c for c in GPU_CLASSES.values() if c.memory_gib <= memory_gib + 0.01]
    if not fitting:
        raise GpuError(f"GPU {name!r} with {memory_gib:.1f} GiB is smaller than any preset (T4)")
    best = max(fitting, key=lambda c: c.memory_gib)
    if best.key in ("t4", "v100"):
        return GPU_CLASSES["v100"]  # float16 + GPTQ works on every CUDA card vLLM supports
    return best


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def detect_gpu(runner: Runner = _run) -> Gpu:
    try:
        out = runner(NVIDIA_SMI)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GpuError(
            f"no NVIDIA GPU visible (Runtime > Change runtime type > GPU), nvidia-smi failed: {exc}"
        ) from exc
    name, gib = parse_nvidia_smi(out)
    return Gpu(name=name, memory_gib=gib, gpu_class=classify(name, gib))
