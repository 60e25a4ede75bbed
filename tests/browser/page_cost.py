"""What the status page costs: its size (raw, gzip as workerd sends it, gzip -9) and the
Worker's CPU time per request, read from workerd's own utime+stime in /proc around a loop of
sequential keep-alive requests in the offline runtime, /healthz (the cheapest JSON answer
the gateway has) measured the same way as the reference.

    .venv/bin/python tests/browser/page_cost.py [--requests 2000]

No fleet is needed: the page touches no node.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import status_page as sp  # noqa: E402
from harness.gateway import Gateway, build_config  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cost:
    label: str
    requests: int
    cpu_ms: float  # workerd CPU per request
    p50_ms: float  # wall time per request, client side


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def workerd_pid(runner_pid: int) -> int:
    """workerd runs as a child or grandchild of the node runner."""
    frontier = [runner_pid]
    for _ in range(3):
        nxt = []
        for p in frontier:
            for c in _children(p):
                if "workerd" in Path(f"/proc/{c}/comm").read_text():
                    return c
                nxt.append(c)
        frontier = nxt
    raise RuntimeError("workerd not found under the runner")


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def measure(gw: Gateway, label: str, method: str, path: str, headers: dict, n: int) -> Cost:
    assert gw.proc is not None
    pid = workerd_pid(gw.proc.pid)
    url = urlsplit(gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        for _ in range(20):  # warm up the isolate and the connection
            conn.request(method, path, headers=headers)
            conn.getresponse().read()
        walls = []
        before = cpu_s(pid)
        for _ in range(n):
            t = time.perf_counter()
            conn.request(method, path, headers=headers)
            r = conn.getresponse()
            r.read()
            walls.append(time.perf_counter() - t)
        used = cpu_s(pid) - before
    finally:
        conn.close()
    return Cost(label, n, used / n * 1000, statistics.median(walls) * 1000)


def wire_gzip_bytes(gw: Gateway) -> int:
    url = urlsplit(gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", "/", headers={"accept-encoding": "gzip"})
        r = conn.getresponse()
        body = r.read()
        assert r.getheader("content-encoding") == "gzip"
        return len(body)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args(argv)
    raw = sp.HTML.encode()
    bindings = {"GATEWAY_API_KEYS": "page-cost-key"}
    with Gateway(build_config(bindings=bindings, worker_logs=False)) as gw:
        wire = wire_gzip_bytes(gw)
        ident = {"accept-encoding": "identity"}
        runs = [
            ("GET / (200, page)", "GET", "/", ident),
            ("GET / gzip (200, page)", "GET", "/", {"accept-encoding": "gzip"}),
            ("GET / If-None-Match (304)", "GET", "/", {**ident, "if-none-match": sp.ETAG}),
            ("HEAD / (200, no body)", "HEAD", "/", ident),
            ("GET /healthz (reference)", "GET", "/healthz", ident),
        ]
        costs = [measure(gw, label, m, p, h, args.requests) for label, m, p, h in runs]
    print(
        f"page: {len(raw)} bytes raw, {wire} gzip as workerd sends it, "
        f"{len(gzip.compress(raw, 9))} gzip -9"
    )
    print(f"| request | workerd CPU ms/request | p50 ms ({args.requests} sequential) |")
    print("|---|---:|---:|")
    for c in costs:
        print(f"| {c.label} | {c.cpu_ms:.2f} | {c.p50_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
