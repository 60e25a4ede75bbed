"""`python -m bench.node_throughput`: one simulated node under keep-alive load (moved here
from sim/bench.py with the rest of the benchmarks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_node_throughput_reports_a_rate() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.node_throughput", "--seconds", "0.3", "--clients", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"/health: (\d+) requests in 0\.3s .* = ([\d,]+) req/s", proc.stdout)
    assert m, proc.stdout
    assert int(m.group(1)) > 0 and int(m.group(2).replace(",", "")) > 0
