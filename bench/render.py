"""Markdown for bench/results.md: number formatting, tables, the header and machine facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from bench.common import ROOT, Profile
from harness.gateway import NODE


def fmt(x: float | None, digits: int = 2, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and abs(x) >= 100:
        digits = 0 if abs(x) >= 1000 else 1
    return f"{x:.{digits}f}{unit}"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**yes**" if ok else "**NO**")


def table(
    header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Collection[int] = ()
) -> list[str]:
    """A markdown table (and a blank line); `numeric` columns (by index) align right."""
    align = ["---:" if i in numeric else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def machine_facts(loadgen_name: str) -> dict[str, object]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(
                args, capture_output=True, text=True, cwd=ROOT, check=False
            ).stdout.strip()
        except OSError:
            return "n/a"

    cpu = "n/a"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mf = "n/a"
    with contextlib.suppress(OSError, ValueError, KeyError):
        package = json.loads((ROOT / "node_modules" / "miniflare" / "package.json").read_text())
        mf = package["version"]
    dirty = " (dirty tree)" if cmd("git", "status", "--porcelain", "src") else ""
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python (client)": platform.python_version(),
        "node": cmd(NODE, "--version"),
        "miniflare / workerd": f"{mf} (Pyodide 0.26.0a2 in the Python Workers)",
        "load generator": loadgen_name,
        "git": cmd("git", "rev-parse", "--short", "HEAD") + dirty,
    }


def document(command: str, profile: Profile, machine: dict[str, object], body: list[str]) -> str:
    head = [
        "# Heady gateway benchmarks",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}` (profile "
        f"`{profile.name}`: {profile.reps} interleaved repetitions of {profile.load_s} s load "
        "runs per target; medians of repetitions, ratios taken within each repetition).",
        "",
        *table(["machine", ""], machine.items()),
        "Targets: **direct** = the simulated node; **bare-js** = `bench/bare_js/worker.mjs`; "
        "**bare-py** = `bench/bare_py/entry.py`; **gateway** = `src/`; **gateway[LABEL]** = "
        "another source tree (`--src`). All Workers run in the same offline workerd; one "
        'request = a small `POST /v1/completions` (`"model": "reasoning"`) answered by the node.',
        "",
    ]
    return "\n".join(head + body).rstrip("\n") + "\n"
