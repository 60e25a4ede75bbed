"""Closed-loop load: N keep-alive connections each sending the small JSON POST back to back.

`wrk` when it is on PATH (installed with apt-get when missing and running as root), else an
asyncio client with the same shape. Both return the same summary dict:
requests, duration_us, p50_us, p90_us, p99_us, socket_errors, status_errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

from bench.client import read_response, request_bytes, split
from bench.common import API_KEY, BENCH, SMALL_BODY, log, pct

ASYNCIO_NAME = "asyncio keep-alive client (bench/loadgen.py)"


async def asyncio_load(url: str, conns: int, seconds: float, auth: bool) -> dict:
    host, port, path = split(url)
    payload = request_bytes(host, port, path, "POST", SMALL_BODY.encode(), auth, False)
    lat: list[float] = []
    errors = [0, 0]  # socket, status
    end = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                writer.write(payload)
                try:
                    status, _, _ = await read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    errors[0] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                lat.append(time.perf_counter() - t0)
                if status >= 400:
                    errors[1] += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    dur = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "duration_us": int(dur * 1e6),
        "p50_us": (pct(lat, 50) or 0) * 1e6,
        "p90_us": (pct(lat, 90) or 0) * 1e6,
        "p99_us": (pct(lat, 99) or 0) * 1e6,
        "socket_errors": errors[0],
        "status_errors": errors[1],
    }


def _install_wrk() -> None:
    log("wrk not found; installing it with apt-get")
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"]):
        subprocess.run(cmd, capture_output=True, check=False)
        if shutil.which("wrk"):
            return
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False)


class LoadGen:
    def __init__(self, install: bool, use_wrk: bool = True) -> None:
        self.wrk = shutil.which("wrk") if use_wrk else None
        if use_wrk and self.wrk is None and install and os.geteuid() == 0:
            _install_wrk()
            self.wrk = shutil.which("wrk")
        self.name = ASYNCIO_NAME
        if self.wrk:
            v = subprocess.run([self.wrk, "-v"], capture_output=True, text=True, check=False)
            first = (v.stdout + v.stderr).strip().splitlines()
            self.name = f"wrk ({first[0].split(' [')[0] if first else 'wrk'})"

    def run(self, url: str, conns: int, seconds: float, auth: bool) -> dict:
        if not self.wrk:
            return asyncio.run(asyncio_load(url, conns, seconds, auth))
        env = dict(os.environ, BENCH_BODY=SMALL_BODY, BENCH_KEY=API_KEY if auth else "")
        cmd = [self.wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
        cmd += ["-s", str(BENCH / "post.lua"), url]
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=seconds + 30, check=False
        )
        for line in out.stdout.splitlines():
            if line.startswith("BENCHJSON "):
                return json.loads(line[len("BENCHJSON ") :])
        raise RuntimeError(f"wrk gave no summary:\n{out.stdout}\n{out.stderr}")
