"""What the gateway costs, measured side by side in one run (issue 4).

    .venv/bin/python -m bench.run [--quick | --smoke] [--out bench/results.md]
                                  [--src LABEL=DIR ...] [--no-install]

Targets, all in the same offline workerd the end-to-end tests use, in front of one simulated
fleet (`python -m sim.fleet`, its own process so it never shares a GIL with the client):

  direct   the simulated node itself
  bare-js  bench/bare_js/worker.mjs, a pass-through JS Worker (same harness runner)
  bare-py  bench/bare_py/entry.py, a pass-through Python Worker (harness adapter)
  gateway  src/ (plus one `gateway[LABEL]` per --src: another source tree, e.g. a worktree of
           an earlier commit, for a before/after in the same run)

Load comes from wrk (installed with apt-get when missing and we are root) or, failing that,
from the asyncio keep-alive client below; the table says which. Runs are interleaved across
targets and repeated; the table shows medians and same-run ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness.gateway import CACHE, NODE, Gateway, build_config

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
API_KEY = "bench-key-0123456789"
NODE_TOKEN = "bench-node-token"
ECHO_PATH = "/v1/echo"
ROLE = "reasoning"  # default routes: nodes 1 and 2, fallback 1, 2
SMALL_BODY = '{"model":"sim-model","prompt":"hello","max_tokens":8}'
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Profile:
    name: str
    load_s: int  # seconds per wrk run
    reps: int  # interleaved repetitions of the load runs
    sse_events: int
    sse_reps: int
    failover_reps: int
    steady_s: int
    size_reps: int
    cold_reps: int
    sizes: tuple[int, ...] = (1 << 20, 10 << 20)


PROFILES = {
    "full": Profile("full", 4, 3, 200, 5, 3, 3, 5, 3),
    "quick": Profile("quick", 2, 1, 200, 1, 1, 2, 2, 1),
    "smoke": Profile("smoke", 1, 1, 20, 1, 1, 1, 1, 1),
}


# ---- small utilities ------------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def fmt(x, digits=2, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float) and abs(x) >= 100:
        digits = 0 if abs(x) >= 1000 else 1
    return f"{x:.{digits}f}{unit}"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def find_workerd(runner_pid: int, timeout: float = 10.0) -> int | None:
    """workerd is a child (or grandchild) of the node runner."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frontier = [runner_pid]
        for _ in range(3):
            nxt = []
            for p in frontier:
                for c in proc_children(p):
                    try:
                        comm = Path(f"/proc/{c}/comm").read_text().strip()
                    except OSError:
                        continue
                    if "workerd" in comm:
                        return c
                    nxt.append(c)
            frontier = nxt
        time.sleep(0.1)
    return None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def mem_kib(pid: int | None, key: str) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def http_json(url: str, data: dict | None = None, timeout: float = 30) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


# ---- processes: fleet, bare JS runner, Python workers -----------------------------------------


class FleetProc:
    """`python -m sim.fleet` in its own process, controlled over its HTTP control API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sim.fleet", "--exit-on-stdin-eof", "--control-port", "0"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout
        info = json.loads(self.proc.stdout.readline())
        self.nodes = {int(k): v for k, v in info["nodes"].items()}
        self.control = info["control"]

    def set(self, n: int, mode: str, **params) -> None:
        http_json(f"{self.control}/nodes/{n}", {"mode": mode, **params})

    def reset(self) -> None:
        http_json(f"{self.control}/reset", {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def js_worker_config(upstream: str) -> dict:
    """The bare JS Worker, run by the same harness runner (and workerd) as the Python ones."""
    return {
        "modulesRoot": str(CACHE / "modules-js"),
        "modules": [
            {
                "name": "worker.mjs",
                "file": str(BENCH / "bare_js" / "worker.mjs"),
                "type": "ESModule",
            }
        ],
        "compatibilityDate": "2024-07-01",
        "compatibilityFlags": [],
        "bindings": {"UPSTREAM": upstream},
        "kvNamespaces": {},
        "host": "127.0.0.1",
        "port": 0,
        "workerLogs": False,
        "crons": [],
    }


@dataclass
class Target:
    name: str
    url: str  # base URL
    path: str  # path of the small JSON POST
    auth: bool = False
    server: object = None  # Gateway / None for direct
    workerd: int | None = None
    cold_start_s: list[float] = field(default_factory=list)

    @property
    def post_url(self) -> str:
        return self.url + self.path


def gateway_bindings(fleet: FleetProc, **extra: str) -> dict[str, str]:
    b = {f"COLAB_ENDPOINT_{n}": url for n, url in fleet.nodes.items()}
    b |= {
        "GATEWAY_API_KEYS": API_KEY,
        "NODE_TOKEN": NODE_TOKEN,
        "ATTEMPT_TIMEOUT_S": "1",
        "KV_MIN_WRITE_INTERVAL_S": "1",
    }
    b.update(extra)
    return b


def start_worker(name: str, config: dict, path: str, auth: bool) -> Target:
    """Start one Worker in workerd; process start to first 200 on the small POST is its cold
    start."""
    t0 = time.monotonic()
    gw = Gateway(config).start(timeout=180)
    target = Target(name, gw.url, path, auth, gw)
    status = asyncio.run(one_request(target.post_url, "POST", SMALL_BODY.encode(), auth))[0]
    target.cold_start_s.append(time.monotonic() - t0)
    if status != 200:
        raise RuntimeError(f"{name}: small POST answered {status}")
    assert gw.proc
    target.workerd = find_workerd(gw.proc.pid)
    return target


def start_python_worker(name: str, bindings: dict, src: Path, path: str, auth: bool) -> Target:
    config = build_config(bindings=bindings, src=src, worker_logs=False)
    return start_worker(name, config, path, auth)


def start_js_worker(upstream: str) -> Target:
    return start_worker("bare-js", js_worker_config(upstream), ECHO_PATH, False)


# ---- HTTP clients ---------------------------------------------------------------------------


def _split(url: str) -> tuple[str, int, str]:
    u = urllib.parse.urlsplit(url)
    return (
        u.hostname or "127.0.0.1",
        u.port or 80,
        (u.path or "/") + (f"?{u.query}" if u.query else ""),
    )


def _request_bytes(host, port, path, method, body: bytes, auth: bool, close: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    if body or method not in ("GET", "HEAD"):
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    if auth:
        lines.append(f"authorization: Bearer {API_KEY}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *hdr_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in hdr_lines:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, headers, body


async def one_request(url, method="GET", body=b"", auth=False, timeout=60.0):
    """One request on a fresh connection: (status, headers, body, seconds)."""
    host, port, path = _split(url)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_request_bytes(host, port, path, method, body, auth, True))
        status, headers, data = await asyncio.wait_for(_read_response(reader), timeout)
    finally:
        writer.close()
    return status, headers, data, time.perf_counter() - t0


def request(url, method="GET", body=b"", auth=False, timeout=60.0):
    return asyncio.run(one_request(url, method, body, auth, timeout))


async def _asyncio_load(url: str, conns: int, seconds: float, auth: bool) -> dict:
    host, port, path = _split(url)
    payload = _request_bytes(host, port, path, "POST", SMALL_BODY.encode(), auth, False)
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
                    status, _, _ = await _read_response(reader)
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
        "p50_us": pct(lat, 50) * 1e6 if lat else 0,
        "p90_us": pct(lat, 90) * 1e6 if lat else 0,
        "p99_us": pct(lat, 99) * 1e6 if lat else 0,
        "socket_errors": errors[0],
        "status_errors": errors[1],
    }


class LoadGen:
    def __init__(self, install: bool) -> None:
        self.wrk = shutil.which("wrk")
        if self.wrk is None and install and os.geteuid() == 0:
            log("wrk not found; installing it with apt-get")
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False
            )
            if shutil.which("wrk") is None:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
                subprocess.run(
                    ["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False
                )
            self.wrk = shutil.which("wrk")
        self.name = "asyncio keep-alive client (bench/run.py)"
        if self.wrk:
            v = subprocess.run([self.wrk, "-v"], capture_output=True, text=True)
            first = (v.stdout + v.stderr).strip().splitlines()
            self.name = f"wrk ({first[0].split(' [')[0] if first else 'wrk'})"

    def run(self, url: str, conns: int, seconds: int, auth: bool) -> dict:
        if not self.wrk:
            return asyncio.run(_asyncio_load(url, conns, seconds, auth))
        env = dict(os.environ, BENCH_BODY=SMALL_BODY, BENCH_KEY=API_KEY if auth else "")
        cmd = [self.wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s"]
        cmd += ["-s", str(BENCH / "post.lua"), url]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 30)
        for line in out.stdout.splitlines():
            if line.startswith("BENCHJSON "):
                return json.loads(line[len("BENCHJSON ") :])
        raise RuntimeError(f"wrk gave no summary:\n{out.stdout}\n{out.stderr}")


# ---- 1. latency and throughput --------------------------------------------------------------


def bench_load(targets: list[Target], gen: LoadGen, prof: Profile, kv_gw: Target) -> dict:
    runs: dict[tuple[str, int], list[dict]] = {}
    kv = {"get": 0, "put": 0, "requests": 0, "seconds": 0.0, "span": 0.0}
    t_first = None
    for rep in range(prof.reps):
        for conns in (1, 16):
            k = rep % len(targets)
            order = targets[k:] + targets[:k]  # rotate so no target always runs first
            for t in order:
                is_kv = t is kv_gw
                if is_kv:
                    kv_gw.server.kv_stats(reset=True)
                    t_first = t_first or time.monotonic()
                c0 = cpu_seconds(t.workerd)
                r = gen.run(t.post_url, conns, prof.load_s, t.auth)
                c1 = cpu_seconds(t.workerd)
                r["cpu_s"] = None if c0 is None or c1 is None else c1 - c0
                if is_kv:
                    s = kv_gw.server.kv_stats()
                    kv["get"] += s["get"]
                    kv["put"] += s["put"]
                    kv["requests"] += r["requests"]
                    kv["seconds"] += r["duration_us"] / 1e6
                    kv["span"] = time.monotonic() - t_first
                runs.setdefault((t.name, conns), []).append(r)
                log(
                    f"load {t.name:>16} c={conns:<2} "
                    f"{r['requests'] / (r['duration_us'] / 1e6):8.0f}"
                    f" req/s p50 {r['p50_us'] / 1000:.2f} ms errors {r['socket_errors']}"
                    f"+{r['status_errors']}"
                )
    return {"runs": runs, "kv": kv}


def summarize_load(runs: dict, targets: list[Target]) -> dict:
    out = {}
    for (name, conns), rs in runs.items():
        out[(name, conns)] = {
            "p50": median(r["p50_us"] / 1000 for r in rs),
            "p90": median(r["p90_us"] / 1000 for r in rs),
            "p99": median(r["p99_us"] / 1000 for r in rs),
            "rps": median(r["requests"] / (r["duration_us"] / 1e6) for r in rs),
            "errors": sum(r["socket_errors"] + r["status_errors"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "cpu_ms": median(
                r["cpu_s"] * 1000 / r["requests"]
                if r["cpu_s"] is not None and r["requests"]
                else None
                for r in rs
            ),
        }
    # same-run ratios: per repetition, then the median
    ratios = {}
    names = [t.name for t in targets]
    for gname in [n for n in names if n.startswith("gateway")]:
        for base in ("bare-py", "bare-js"):
            for conns in (1, 16):
                g, b = runs.get((gname, conns)), runs.get((base, conns))
                if not g or not b:
                    continue
                ratios[(gname, base, conns)] = {
                    "p50": median(
                        x["p50_us"] / y["p50_us"] for x, y in zip(g, b, strict=False) if y["p50_us"]
                    ),
                    "rps": median(
                        (x["requests"] / x["duration_us"]) / (y["requests"] / y["duration_us"])
                        for x, y in zip(g, b, strict=False)
                        if y["requests"]
                    ),
                }
    return {"stats": out, "ratios": ratios}


# ---- 2. streaming ---------------------------------------------------------------------------


class _Dechunker:
    """Incremental HTTP/1.1 body decoder: feed raw bytes after the head, get body bytes."""

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.raw = b""
        self.left = 0  # bytes left in the current chunk (+2 for its CRLF once started)
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not self.chunked:
            return data
        self.raw += data
        out = []
        while self.raw and not self.done:
            if self.left == 0:
                nl = self.raw.find(b"\r\n")
                if nl < 0:
                    break
                line = self.raw[:nl].split(b";")[0].strip()
                self.raw = self.raw[nl + 2 :]
                if not line:
                    continue  # the CRLF that ends the previous chunk
                size = int(line, 16)
                if size == 0:
                    self.done = True
                    break
                self.left = size
            take = self.raw[: self.left]
            out.append(take)
            self.raw = self.raw[len(take) :]
            self.left -= len(take)
        return b"".join(out)


async def sse_once(url: str, auth: bool, timeout: float = 30.0) -> dict:
    host, port, path = _split(url)
    t_send = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(_request_bytes(host, port, path, "GET", b"", auth, True))
    t0_mono, t0_perf = time.monotonic(), time.perf_counter()
    head = b""
    body = b""
    decoder: _Dechunker | None = None
    first_byte = None
    events: list[tuple[float, float | None]] = []  # (arrival perf, transit ms from node stamp)
    status = None
    finished = False  # the stream's last event, [DONE], arrived: stop without waiting for EOF
    try:
        while not finished:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            now = time.perf_counter()
            if not chunk:
                break
            if first_byte is None:
                first_byte = now
            if decoder is None:
                head += chunk
                if b"\r\n\r\n" not in head:
                    continue
                head, _, chunk = head.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").lower().split("\r\n")
                status = int(lines[0].split()[1])
                decoder = _Dechunker(
                    any(x.startswith("transfer-encoding:") and "chunked" in x for x in lines)
                )
            body += decoder.feed(chunk)
            while True:
                j = body.find(b"\n\n")
                if j < 0:
                    break
                event, body = body[:j], body[j + 2 :]
                if event == b"data: [DONE]":
                    finished = True
                    break
                if not event.startswith(b"data: "):
                    continue
                transit = None
                try:
                    stamp = json.loads(event[6:])["t"]  # the node's time.monotonic() at write
                    transit = (t0_mono + (now - t0_perf) - stamp) * 1000
                except (ValueError, KeyError, TypeError):
                    pass
                events.append((now, transit))
    finally:
        writer.close()
    gaps = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(events)]
    return {
        "status": status,
        "events": len(events),
        "ttfb_ms": (first_byte - t_send) * 1000 if first_byte else None,
        "first_event_ms": (events[0][0] - t_send) * 1000 if events else None,
        "gaps": gaps,
        "transit": [t for _, t in events if t is not None],
    }


def bench_sse(targets: list[Target], fleet: FleetProc, prof: Profile) -> dict:
    for n in (1, 2):
        fleet.set(n, "sse", events=prof.sse_events, interval=0.01)
    res: dict[str, list[dict]] = {}
    try:
        for rep in range(prof.sse_reps):
            k = rep % len(targets)
            for t in targets[k:] + targets[:k]:
                # one small request first, so every target's isolate is equally warm (an idle
                # Python isolate adds a few ms to its next request; that is not streaming)
                request(t.post_url, "POST", SMALL_BODY.encode(), t.auth)
                r = asyncio.run(sse_once(t.url + t.path.replace(ECHO_PATH, "/v1/stream"), t.auth))
                res.setdefault(t.name, []).append(r)
                log(
                    f"sse {t.name:>16} status {r['status']} events {r['events']} first event "
                    f"{fmt(r['first_event_ms'])} ms"
                )
    finally:
        fleet.reset()
    out = {}
    direct_p50 = pct([x for r in res.get("direct", []) for x in r["transit"]], 50) or 0.0
    for name, rs in res.items():
        gaps = [g for r in rs for g in r["gaps"]]
        transit = [x for r in rs for x in r["transit"]]
        out[name] = {
            "status": [r["status"] for r in rs],
            "events": median(r["events"] for r in rs),
            "ttfb": median(r["ttfb_ms"] for r in rs),
            "first_event": median(r["first_event_ms"] for r in rs),
            "gap_p50": pct(gaps, 50),
            "gap_p1": pct(gaps, 1),
            "gap_p99": pct(gaps, 99),
            "gap_max": max(gaps) if gaps else None,
            "transit_p50": pct(transit, 50),
            "transit_p99": pct(transit, 99),
            "transit_max": max(transit) if transit else None,
            "n_transit": len(transit),
            "late": sum(1 for x in transit if x > direct_p50 + 5.0),
        }
    return out


# ---- 3 + 6. failover cost and KV traffic -----------------------------------------------------


def bench_failover(gw: Target, fleet: FleetProc, gen: LoadGen, prof: Profile) -> dict:
    server: Gateway = gw.server  # type: ignore[assignment]
    body = SMALL_BODY.encode()
    first: dict[str, list[float]] = {"healthy": [], "refuse": [], "hang": []}
    attempts: dict[str, list[str]] = {"healthy": [], "refuse": [], "hang": []}
    timeout_s = float(server.config["bindings"].get("ATTEMPT_TIMEOUT_S", "120"))
    steady: dict[str, list[dict]] = {"healthy": [], "dead-primary": []}
    kv_fail = {"get": 0, "put": 0, "requests": 0}
    for rep in range(prof.failover_reps):
        for mode in ("healthy", "refuse", "hang"):
            fleet.reset()
            server.reset()  # turn 0: node 1 is the primary of the next request
            if mode != "healthy":
                fleet.set(1, mode)
            server.kv_stats(reset=True)
            st, h, _, secs = request(gw.post_url, "POST", body, True, timeout=timeout_s + 30)
            first[mode].append(secs * 1000)
            attempts[mode].append(f"{st}/{h.get('x-heady-attempts')}/{h.get('x-heady-node')}")
            if mode == "refuse":
                # node 1 is now marked down: steady state with a dead primary vs healthy,
                # back to back, and the KV traffic of the whole failover episode
                r = gen.run(gw.post_url, 1, prof.steady_s, True)
                s = server.kv_stats()
                kv_fail["get"] += s["get"]
                kv_fail["put"] += s["put"]
                kv_fail["requests"] += r["requests"] + 1
                steady["dead-primary"].append(r)
                fleet.reset()
                server.reset()
                steady["healthy"].append(gen.run(gw.post_url, 1, prof.steady_s, True))
        log(f"failover rep {rep}: " + ", ".join(f"{m} {v[-1]:.1f} ms" for m, v in first.items()))
    fleet.reset()
    server.reset()
    sd = {
        k: {
            "p50": median(r["p50_us"] / 1000 for r in v),
            "rps": median(r["requests"] / (r["duration_us"] / 1e6) for r in v),
            "errors": sum(r["socket_errors"] + r["status_errors"] for r in v),
        }
        for k, v in steady.items()
    }
    ratio = median(
        d["p50_us"] / h["p50_us"]
        for d, h in zip(steady["dead-primary"], steady["healthy"], strict=True)
    )
    return {
        "first": {k: median(v) for k, v in first.items()},
        "attempts": attempts,
        "timeout_s": timeout_s,
        "steady": sd,
        "steady_ratio": ratio,
        "kv_failover": kv_fail,
    }


# ---- 5. cold start --------------------------------------------------------------------------


def bench_cold(fleet: FleetProc, targets: dict[str, Target], prof: Profile, variants) -> None:
    """Extra cold starts (the first sample is the start of the long-lived instance)."""
    for _ in range(prof.cold_reps - 1):
        for name, (src, path, auth, binds) in variants.items():
            t = start_python_worker(name, binds, src, path, auth)
            t.server.stop()
            targets[name].cold_start_s.extend(t.cold_start_s)
            log(f"cold start {name}: {t.cold_start_s[0]:.2f} s")


# ---- 7. request size ------------------------------------------------------------------------


def bench_size(targets: list[Target], prof: Profile) -> dict:
    out = {}
    for size in prof.sizes:
        body = b'{"blob":"' + b"x" * (size - 11) + b'"}'
        for t in targets:
            hwm0 = mem_kib(t.workerd, "VmHWM")
            lat, statuses = [], []
            for _ in range(prof.size_reps):
                st, _, _, secs = request(t.post_url, "POST", body, t.auth, timeout=120)
                lat.append(secs * 1000)
                statuses.append(st)
            out[(t.name, size)] = {
                "p50": median(lat),
                "max": max(lat),
                "statuses": sorted(set(statuses)),
                "hwm_before": hwm0,
                "hwm_after": mem_kib(t.workerd, "VmHWM"),
                "rss": mem_kib(t.workerd, "VmRSS"),
            }
            log(f"size {size >> 20} MiB {t.name:>16} p50 {median(lat):.1f} ms status {statuses}")
    return out


# ---- the table ------------------------------------------------------------------------------


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**yes**" if ok else "**NO**")


def render(ctx: dict) -> str:
    L: list[str] = []
    add = L.append
    prof: Profile = ctx["profile"]
    add("# Heady gateway benchmarks")
    add("")
    add(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{ctx['command']}` "
        f"(profile `{prof.name}`: {prof.reps} interleaved repetitions of {prof.load_s} s load "
        "runs per target; medians of repetitions, ratios taken within each repetition)."
    )
    add("")
    add("| machine | |")
    add("|---|---|")
    for k, v in ctx["machine"].items():
        add(f"| {k} | {v} |")
    add("")
    add(
        "Targets: **direct** = the simulated node; **bare-js** = `bench/bare_js/worker.mjs`; "
        "**bare-py** = `bench/bare_py/entry.py`; **gateway** = `src/` (all Workers in the same "
        "offline workerd, one request = one small JSON POST echoed by the node)."
    )
    add("")

    sections = ctx["sections"]
    load = ctx.get("load") or {"stats": {}, "ratios": {}, "kv": None}
    st, ratios = load["stats"], load["ratios"]
    names = ctx["names"]
    f = ctx.get("failover")
    if 1 in sections:
        add("## 1. Latency and throughput (small JSON POST)")
        add("")
        add("| target | conc | p50 ms | p90 ms | p99 ms | req/s | errors |")
        add("|---|---:|---:|---:|---:|---:|---:|")
        for conns in (1, 16):
            for n in names:
                s = st.get((n, conns))
                if s:
                    add(
                        f"| {n} | {conns} | {fmt(s['p50'])} | {fmt(s['p90'])} | {fmt(s['p99'])} | "
                        f"{fmt(s['rps'], 0)} | {s['errors']} |"
                    )
        add("")
        add("| ratio (same run) | conc | p50 latency | throughput | target | met? |")
        add("|---|---:|---:|---:|---|---|")
        for (g, base, conns), r in sorted(ratios.items()):
            if base == "bare-py":
                ok = (
                    None
                    if r["p50"] is None or r["rps"] is None
                    else r["p50"] <= 1.2 and r["rps"] >= 0.8
                )
                tgt = "p50 ≤ 1.2x, req/s ≥ 0.8x"
            else:
                ok, tgt = None, "(floor; no target)"
            add(
                f"| {g} / {base} | {conns} | {fmt(r['p50'])}x | {fmt(r['rps'])}x | {tgt} | {met(ok)} |"  # noqa: E501
            )
        add("")

    if 2 in sections:
        add("## 2. Streaming (SSE: events spaced 10 ms apart)")
        add("")
        sse = ctx["sse"]
        add(
            "| target | status | events | TTFB ms | first event ms | gap p1 / p50 / p99 / max ms | "
            "transit p50 / p99 / max ms |"
        )
        add("|---|---|---:|---:|---:|---|---|")
        for n in names:
            s = sse.get(n)
            if s:
                add(
                    f"| {n} | {','.join(map(str, sorted(set(s['status']))))} | {fmt(s['events'], 0)} | "  # noqa: E501
                    f"{fmt(s['ttfb'])} | {fmt(s['first_event'])} | {fmt(s['gap_p1'])} / "
                    f"{fmt(s['gap_p50'])} / {fmt(s['gap_p99'])} / {fmt(s['gap_max'])} | "
                    f"{fmt(s['transit_p50'])} / {fmt(s['transit_p99'])} / {fmt(s['transit_max'])} |"
                )
        add("")
        add(
            "Transit = arrival at the client minus the node's `time.monotonic()` stamp in the event "  # noqa: E501
            "(same host clock), so it is the per-event delay added on the way. Each stream "
            "follows one small warm-up request to the same target."
        )
        add("")
        d, g = sse.get("direct"), sse.get("gateway")
        if d and g:
            fe = (
                None
                if g["first_event"] is None or d["first_event"] is None
                else g["first_event"] - d["first_event"]
            )
            extra = (
                None
                if g["transit_max"] is None or d["transit_p50"] is None
                else g["transit_max"] - d["transit_p50"]
            )
            add("| SSE check (gateway vs direct) | value | target | met? |")
            add("|---|---:|---|---|")
            add(
                f"| first event, later than direct (median) | {fmt(fe)} ms | ≤ 1 ms | "
                f"{met(None if fe is None else fe <= 1.0)} |"
            )
            add(
                f"| worst event delay over direct's median transit | {fmt(extra)} ms | ≤ 5 ms | "
                f"{met(None if extra is None else extra <= 5.0)} |"
            )
            b = sse.get("bare-py")
            if b and b["first_event"] is not None and g["first_event"] is not None:
                add(
                    f"| first event, later than bare-py (median; informational) | "
                    f"{fmt(g['first_event'] - b['first_event'])} ms | | |"
                )
            add(
                f"| gateway events > 5 ms later than direct's median transit | "
                f"{g['late']} of {g['n_transit']} | 0 | {met(g['late'] == 0)} |"
            )
            add("")

    if 3 in sections:
        add("## 3. Failover cost (gateway; primary = node 1)")
        add("")
        add("| case | first request ms (median) | status/attempts/node | note |")
        add("|---|---:|---|---|")
        add(
            f"| healthy primary (cold isolate memory) | {fmt(f['first']['healthy'])} | "
            f"{', '.join(sorted(set(f['attempts']['healthy'])))} | baseline |"
        )
        add(
            f"| primary refuses connections | {fmt(f['first']['refuse'])} | "
            f"{', '.join(sorted(set(f['attempts']['refuse'])))} | "
            f"+{fmt(_sub(f['first']['refuse'], f['first']['healthy']))} ms over healthy |"
        )
        over = _sub(f["first"]["hang"], f["timeout_s"] * 1000 + (f["first"]["healthy"] or 0))
        add(
            f"| primary hangs | {fmt(f['first']['hang'])} | "
            f"{', '.join(sorted(set(f['attempts']['hang'])))} | ATTEMPT_TIMEOUT_S = "
            f"{f['timeout_s']:g} s; +{fmt(over)}"
            " ms over timeout + healthy |"
        )
        add("")
        sh, sd = f["steady"]["healthy"], f["steady"]["dead-primary"]
        r = f["steady_ratio"]
        add("| steady state (c=1) | p50 ms | req/s | errors | target | met? |")
        add("|---|---:|---:|---:|---|---|")
        add(f"| healthy | {fmt(sh['p50'])} | {fmt(sh['rps'], 0)} | {sh['errors']} | | |")
        add(
            f"| primary marked down | {fmt(sd['p50'])} | {fmt(sd['rps'], 0)} | {sd['errors']} | "
            f"p50 ≤ 1.10x healthy (is {fmt(r)}x) | {met(None if r is None else r <= 1.10)} |"
        )
        add("")

    if 4 in sections:
        add("## 4. CPU per request (workerd process utime+stime from /proc)")
        add("")
        add("| target | conc 1 ms CPU/req | conc 16 ms CPU/req | target | met? |")
        add("|---|---:|---:|---|---|")
        for n in names:
            if n == "direct":
                continue
            c1, c16 = st.get((n, 1), {}).get("cpu_ms"), st.get((n, 16), {}).get("cpu_ms")
            if n.startswith("gateway"):
                worst = max(x for x in (c1, c16) if x is not None) if (c1 or c16) else None
                add(
                    f"| {n} | {fmt(c1, 3)} | {fmt(c16, 3)} | ≤ 2 ms | "
                    f"{met(None if worst is None else worst <= 2.0)} |"
                )
            else:
                add(f"| {n} | {fmt(c1, 3)} | {fmt(c16, 3)} | | |")
        add("")

    if 5 in sections:
        add("## 5. Cold start (process start to first 200 on the small POST)")
        add("")
        add("| target | median s | samples |")
        add("|---|---:|---|")
        for n, samples in ctx["cold"].items():
            add(f"| {n} | {fmt(median(samples))} | {', '.join(f'{x:.2f}' for x in samples)} |")
        add("")

    if 6 in sections:
        add("## 6. KV traffic (counted at the binding boundary)")
        add("")
        kv, kf = load["kv"], f["kv_failover"]
        per = lambda n, reqs: None if not reqs else n * 1000 / reqs  # noqa: E731
        refresh = ctx["refresh_s"]
        # the load runs are spread over the whole interleaved phase: count refresh intervals
        # over its wall-clock span (one read may land at each interval boundary)
        allowed = int(kv["span"] // refresh) + 1
        add(
            "| phase | requests | seconds | KV reads | KV writes | reads / 1k req | writes / 1k req | "  # noqa: E501
            "target | met? |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---|---|")
        ok = kv["put"] == 0 and kv["get"] <= allowed
        add(
            f"| steady state (all load runs) | {kv['requests']} | {fmt(kv['seconds'], 1)} "
            f"under load, {fmt(kv['span'], 0)} wall | "
            f"{kv['get']} | {kv['put']} | {fmt(per(kv['get'], kv['requests']), 3)} | "
            f"{fmt(per(kv['put'], kv['requests']), 3)} | 0 writes, ≤ 1 read per isolate per "
            f"{refresh:g} s (≤ {allowed} here, 1 isolate) | {met(ok)} |"
        )
        add(
            f"| failover (primary refusing, c=1) | {kf['requests']} | | {kf['get']} | {kf['put']} | "  # noqa: E501
            f"{fmt(per(kf['get'], kf['requests']), 3)} | {fmt(per(kf['put'], kf['requests']), 3)} | | |"  # noqa: E501
        )
        add("")
        add(
            "Steady state is counted over the gateway's load runs, which start after a cold read. "
            "Failover counts each episode from `reset` (cold isolate memory and empty KV) through the "  # noqa: E501
            "steady run with the primary marked down."
        )
        add("")

    if 7 in sections:
        add("## 7. Request size (buffered for replay)")
        add("")
        add(
            "| target | body | p50 ms | max ms | status | workerd peak RSS (VmHWM) before → after MiB |"  # noqa: E501
        )
        add("|---|---:|---:|---:|---|---|")
        for (n, size), s in ctx["size"].items():
            mib = lambda k: "n/a" if k is None else f"{k / 1024:.0f}"  # noqa: E731
            add(
                f"| {n} | {size >> 20} MiB | {fmt(s['p50'])} | {fmt(s['max'])} | "
                f"{','.join(map(str, s['statuses']))} | "
                f"{mib(s['hwm_before'])} → {mib(s['hwm_after'])} |"
            )
        add("")
    return "\n".join(L) + "\n"


def _sub(a, b):
    return None if a is None or b is None else a - b


def machine_facts(gen: LoadGen) -> dict:
    def cmd(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "n/a"

    cpu = "n/a"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mf = "n/a"
    with contextlib.suppress(OSError, ValueError):
        mf = json.loads((ROOT / "node_modules" / "miniflare" / "package.json").read_text())[
            "version"
        ]
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python (client)": platform.python_version(),
        "node": cmd(NODE, "--version"),
        "miniflare / workerd": f"{mf} (Pyodide 0.26.0a2 in the Python Workers)",
        "load generator": gen.name,
        "git": cmd("git", "rev-parse", "--short", "HEAD")
        + (" (dirty tree)" if cmd("git", "status", "--porcelain", "src") else ""),
    }


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny runs: does everything work? (wins over --quick)"
    )
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="another gateway source folder, benchmarked as gateway[LABEL] in the same run",
    )
    ap.add_argument(
        "--sections",
        default="1,2,3,4,5,6,7",
        help="comma-separated measurements to run, e.g. 1,4 for latency/throughput and CPU",
    )
    ap.add_argument("--reps", type=int, default=None, help="override the profile's repetitions")
    ap.add_argument(
        "--seconds", type=int, default=None, help="override the profile's seconds per load run"
    )
    ap.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    ap.add_argument("--asyncio", action="store_true", help="use the asyncio client, not wrk")
    args = ap.parse_args(argv)
    sections = {int(x) for x in args.sections.split(",") if x.strip()}
    prof = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.reps or args.seconds:
        prof = dataclasses.replace(
            prof, reps=args.reps or prof.reps, load_s=args.seconds or prof.load_s
        )
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()

    gen = LoadGen(install=not args.no_install)
    if args.asyncio:
        gen.wrk = None
        gen.name = "asyncio keep-alive client (bench/run.py)"
    log(f"profile {prof.name}; load generator: {gen.name}")

    fleet = FleetProc()
    servers: list[Target] = []
    try:
        direct = Target("direct", fleet.nodes[1], ECHO_PATH)
        heavy = f"/api/heavy/{ROLE}{ECHO_PATH}"
        variants = {
            "bare-py": (BENCH / "bare_py", ECHO_PATH, False, {"UPSTREAM": fleet.nodes[1]}),
            "gateway": (ROOT / "src", heavy, True, gateway_bindings(fleet)),
        }
        for spec in args.src:
            label, _, d = spec.partition("=")
            if not d:
                label, d = Path(spec).name, spec
            variants[f"gateway[{label}]"] = (
                Path(d).resolve(),
                heavy,
                True,
                gateway_bindings(fleet),
            )
        targets = [direct]
        js = start_js_worker(fleet.nodes[1])
        servers.append(js)
        targets.append(js)
        log(f"bare-js up in {js.cold_start_s[0]:.2f} s (workerd pid {js.workerd})")
        for name, (src, path, auth, binds) in variants.items():
            t = start_python_worker(name, binds, src, path, auth)
            servers.append(t)
            targets.append(t)
            log(f"{name} up in {t.cold_start_s[0]:.2f} s (workerd pid {t.workerd})")
        by_name = {t.name: t for t in targets}
        gw = by_name["gateway"]

        load_summary = sse = failover = size = None
        if sections & {1, 4, 6}:
            load = bench_load(targets, gen, prof, gw)
            load_summary = summarize_load(load["runs"], targets)
            load_summary["kv"] = load["kv"]
        if 2 in sections:
            sse = bench_sse(targets, fleet, prof)
        if sections & {3, 6}:
            failover = bench_failover(gw, fleet, gen, prof)
        if 7 in sections:
            size = bench_size([direct, by_name["bare-py"], gw], prof)
        if 5 in sections:
            bench_cold(fleet, by_name, prof, variants)
        refresh_s = float(gw.server.config["bindings"].get("HEALTH_REFRESH_S", "30"))
        ctx = {
            "profile": prof,
            "sections": sections,
            "command": command,
            "machine": machine_facts(gen),
            "names": [t.name for t in targets],
            "load": load_summary,
            "sse": sse,
            "failover": failover,
            "cold": {t.name: t.cold_start_s for t in targets if t.cold_start_s},
            "size": size,
            "refresh_s": refresh_s,
        }
        ctx["machine"]["bench wall time"] = f"{time.monotonic() - started:.0f} s"
        table = render(ctx)
    finally:
        for t in servers:
            try:
                t.server.stop()
            except Exception as exc:  # keep cleaning up
                log(f"stop {t.name}: {exc}")
        fleet.stop()
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
