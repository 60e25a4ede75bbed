"""Smoke run of the batch benchmark sections (bench/sections/batch.py): 200 short lines through
the gateway and the real workers on nodes 7-8, then the same with one node killed with its
worker mid-shard. Not a timing test: the 0.95x target is reported by `make bench`, not
asserted here; what is asserted is that everything works and exactly-once holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sections import select

ROOT = Path(__file__).resolve().parents[2]
HEADINGS = {s.key: s.heading for s in select("batch,batch-chaos")}


def _rows(text: str, key: str) -> dict[str, list[str]]:
    body = text.split(HEADINGS[key], 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def _num(cell: str) -> float:
    m = re.search(r"-?\d+(?:[.,]\d+)*", cell)
    assert m, f"no number in {cell!r}"
    return float(m.group().replace(",", ""))


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bench") / "results.md"
    cmd = [sys.executable, "-m", "bench.run", "--smoke", "--no-install", "--out", str(out)]
    cmd += ["--sections", "batch,batch-chaos"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


@pytest.mark.timeout(300)
def test_batch_throughput_smoke(table: str) -> None:
    rows = _rows(table, "batch")
    direct = [r for name, r in rows.items() if name.startswith("direct (")]
    assert direct and all(_num(r[2]) > 0 and _num(r[3]) == 0 for r in direct), direct
    batch = rows["batch (gateway + workers)"]
    assert _num(batch[2]) > 0 and _num(batch[3]) == 0, batch
    assert rows["every custom_id exactly once in output + error"][1] == "**yes**"
    assert _num(rows["engine requests for 200 lines (no node died)"][1]) == 200
    assert 0 < _num(rows["workerd CPU per line"][1]) < 100
    assert _num(rows["no batch"][2]) > 0 and _num(rows["during a batch (BATCH_HELPERS off)"][2]) > 0


def test_batch_chaos_smoke(table: str) -> None:
    rows = _rows(table, "batch-chaos")
    assert rows["status"][1:] == ["completed", "**yes**"]
    assert rows["kills (node + worker, SIGKILL, mid-shard)"][2] == "**yes**"
    assert rows["every custom_id exactly once"][2] == "**yes**"
    assert rows["lines never seen by an engine (must be 0)"][2] == "**yes**"
    assert _num(rows["completed / failed"][1]) == 200


def test_batch_budget_counts_the_core_calls() -> None:
    """bench.batch_budget (docs/budgets.md): 1,000 lines in 10 shards, every call counted."""
    from bench.batch_budget import run

    tally = run(1000, 100, 2, 5)
    shards = tally["shards: lease, input, 2 heartbeats, result PUTs, commit"]
    # Per shard: an input GET, two result PUTs (output and error: some lines fail), two HEADs.
    assert shards.r2 == {"B: GetObject": 10, "A: PutObject": 20, "B: HeadObject": 20}
    # lease + input + 2 heartbeats + 2 result targets + commit (a read and 2 writes) >= 8 each
    assert shards.statements >= 80 and shards.written >= 10 * 13
    assert tally["batches.retrieve x 5"].written == 0  # reads never write
    assert tally["files.content (output + error)"].r2 == {"B: GetObject": 20}
