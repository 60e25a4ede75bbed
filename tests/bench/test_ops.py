"""`python -m bench.ops`: every operation of the op-bench Worker runs in workerd and is
priced (a table row with numbers). Not a timing test: no cost is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ops import op_names

ROOT = Path(__file__).resolve().parents[2]


def test_the_worker_offers_the_documented_operations() -> None:
    names = op_names()
    assert names[0] == "noop" and len(names) == len(set(names))
    for documented in ("await_js", "console_log_line", "print_line", "body_read_at_least"):
        assert documented in names


@pytest.mark.timeout(240)
def test_every_operation_is_priced() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ops", "--requests", "20", "--reps", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^\| (\w+) \| (-?\d+) \| (-?\d+) \|$", proc.stdout, re.M)
    }
    assert set(rows) == set(op_names()) - {"noop"}, proc.stdout
    assert re.search(r"noop = \d+ µs CPU", proc.stdout), proc.stdout


def test_unknown_operation_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ops", "--ops", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "unknown ops ['nope']" in proc.stderr
