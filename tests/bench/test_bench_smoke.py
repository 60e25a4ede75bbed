"""Smoke test of the benchmark script so it cannot rot: tiny durations, every section, sane
numbers. Not a timing test: no target from the issue is asserted here."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import _asyncio_load
from sim.fleet import Fleet

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = [
    "## 1. Latency and throughput",
    "## 2. Streaming",
    "## 3. Failover cost",
    "## 4. CPU per request",
    "## 5. Cold start",
    "## 6. KV traffic",
    "## 7. Request size",
]


def _rows(table: str, section: str) -> list[list[str]]:
    """The data rows of every markdown table in one section."""
    body = table.split(section, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _num(cell: str) -> float:
    m = re.search(r"-?\d+(?:\.\d+)?", cell)
    assert m, f"no number in {cell!r}"
    return float(m.group())


@pytest.mark.timeout(150)
def test_bench_smoke_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--smoke",
            "--no-install",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert table == proc.stdout.strip() + "\n" or table.strip() in proc.stdout
    for section in SECTIONS:
        assert section in table, f"missing {section}"
    assert "load generator" in table and "| cores |" in table

    load = {(r[0], r[1]): r for r in _rows(table, SECTIONS[0]) if r[1] in ("1", "16")}
    for name in ("direct", "bare-js", "bare-py", "gateway"):
        for conns in ("1", "16"):
            row = load[(name, conns)]
            p50, p99, rps, errors = _num(row[2]), _num(row[4]), _num(row[5]), _num(row[6])
            assert 0 < p50 <= p99 < 5000, row
            assert rps > 0 and errors == 0, row

    sse = {r[0]: r for r in _rows(table, SECTIONS[1]) if r[0] in ("direct", "gateway")}
    for row in sse.values():
        assert row[1] == "200" and _num(row[2]) == 20, row  # every event arrived
        assert 0 < _num(row[4]) < 5000, row

    failover = _rows(table, SECTIONS[2])
    first = {r[0]: r for r in failover[:4]}
    assert _num(first["primary refuses connections"][2].split("/")[0]) == 200
    hang = first["primary hangs"]
    assert hang[2].startswith("200/2/"), hang  # answered by the second node
    assert _num(hang[1]) >= 900, hang  # ATTEMPT_TIMEOUT_S = 1 s was waited out

    cpu = {r[0]: r for r in _rows(table, SECTIONS[3])}
    for name in ("bare-js", "bare-py", "gateway"):
        assert 0 < _num(cpu[name][1]) < 1000, cpu[name]

    cold = {r[0]: r for r in _rows(table, SECTIONS[4])}
    for name in ("bare-py", "gateway"):
        assert 0 < _num(cold[name][1]) < 120, cold[name]

    kv = _rows(table, SECTIONS[5])
    assert any(r[0].startswith("steady state") for r in kv)

    size = _rows(table, SECTIONS[6])
    assert {r[1] for r in size[1:]} >= {"1 MiB", "10 MiB"}
    assert all(r[4] == "200" for r in size[1:]), size


def test_asyncio_load_generator_fallback() -> None:
    """The fallback used when wrk is missing: keep-alive POSTs, latencies and counts."""
    with Fleet(count=1) as fleet:
        r = asyncio.run(_asyncio_load(fleet.url(1) + "/v1/echo", 4, 0.5, False))
    assert r["requests"] > 10
    assert r["socket_errors"] == 0 and r["status_errors"] == 0
    assert 0 < r["p50_us"] <= r["p99_us"]
