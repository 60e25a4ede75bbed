"""Start the gateway Worker in the offline Workers runtime (workerd with embedded Pyodide).

Used by `make gateway`, `make dev`, the end-to-end tests and the benchmarks, so all of them
run the very same `src/` with the bindings declared in wrangler.toml.

    python -m harness.gateway [--port 8787] [--dev-vars .dev.vars] [--persist DIR]

Secrets and vars come from `.dev.vars` in the repository root (KEY=value lines), exactly as
`wrangler dev` reads them, layered over the [vars] of wrangler.toml.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from heady_shared.devvars import parse_dev_vars

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "harness" / "shim"
CACHE = ROOT / ".harness"
SDK_VERSION = "1.9.5"  # workers-runtime-sdk: pure Python over `js`, supports Pyodide 0.26.0a2
SDK_DIR = CACHE / f"workers-runtime-sdk-{SDK_VERSION}"
# The offline runtime only knows compatibility dates up to its own build (Nov 2024).
HARNESS_COMPAT_DATE = "2024-07-01"
NODE = os.environ.get("HEADY_NODE", "node")
# Flags newer than the offline workerd (it refuses to start with them); what each changes and
# what that leaves untested offline is in docs/client-faults.md.
FLAGS_UNKNOWN_OFFLINE = frozenset({"enable_request_signal"})
# Gateway.stop's bounded waits: for the runner to dispose workerd after stdin EOF, then after
# SIGTERM, then after SIGKILL.
DISPOSE_WAIT_S = 10.0
STOP_GRACE_S = 5.0


def ensure_sdk() -> Path:
    """The `workers` package from the pinned PyPI wheel; the offline runtime lacks it."""
    marker = SDK_DIR / "workers" / "__init__.py"
    if marker.exists():
        return SDK_DIR / "workers"
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            f"workers-runtime-sdk=={SDK_VERSION}",
        ],
        check=True,
    )
    wheel = next(wheels.glob(f"workers_runtime_sdk-{SDK_VERSION}-*.whl"))
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("workers/") and name.endswith(".py"):
                zf.extract(name, tmp)
    if SDK_DIR.exists():  # another process unpacked it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(SDK_DIR)
    return SDK_DIR / "workers"


def _python_modules(main: Path, extra_dirs: Iterator[tuple[Path, str]]) -> list[dict[str, str]]:
    """Every .py below each directory (packages such as src/heady_shared/ included), as
    wrangler bundles them; the main module first."""
    modules = [{"name": "harness_main.py", "file": str(main)}]
    for directory, prefix in extra_dirs:
        for path in sorted(directory.rglob("*.py")):
            if path != main and "__pycache__" not in path.parts:
                name = prefix + path.relative_to(directory).as_posix()
                modules.append({"name": name, "file": str(path)})
    return modules


def _rule_modules(src: Path, rules: list[dict]) -> list[dict[str, str]]:
    """The files wrangler.toml's [[rules]] bundle beside the Python modules (Text: the status
    page's HTML, CSS and script), with their type, as wrangler does."""
    return [
        {"name": path.relative_to(src).as_posix(), "file": str(path), "type": rule["type"]}
        for rule in rules
        for pattern in rule["globs"]
        for path in sorted(src.glob(pattern))
    ]


def build_config(
    *,
    bindings: Mapping[str, str],
    port: int = 0,
    persist: str | None = None,
    src: Path = ROOT / "src",
    verbose: bool = False,
    worker_logs: bool = True,
) -> dict:
    wrangler = tomllib.loads((ROOT / "wrangler.toml").read_text())
    sdk = ensure_sdk()
    dirs = [(SHIM, ""), (src, ""), (sdk, "workers/")]
    merged = {k: str(v) for k, v in wrangler.get("vars", {}).items()}
    merged.update(bindings)
    return {
        "modulesRoot": str(CACHE / "modules"),
        "modules": _python_modules(SHIM / "harness_main.py", iter(dirs))
        + _rule_modules(src, wrangler.get("rules", [])),
        "compatibilityDate": HARNESS_COMPAT_DATE,
        "compatibilityFlags": [
            f
            for f in wrangler.get("compatibility_flags", ["python_workers"])
            if f not in FLAGS_UNKNOWN_OFFLINE
        ],
        "bindings": merged,
        "kvNamespaces": {ns["binding"]: ns["id"] for ns in wrangler.get("kv_namespaces", [])},
        "r2Buckets": {b["binding"]: b["bucket_name"] for b in wrangler.get("r2_buckets", [])},
        "d1Databases": {d["binding"]: d["database_id"] for d in wrangler.get("d1_databases", [])},
        # Applied by the runner after start, tracked in d1_migrations as wrangler does.
        "d1Migrations": {
            d["binding"]: str(ROOT / d["migrations_dir"])
            for d in wrangler.get("d1_databases", [])
            if d.get("migrations_dir")
        },
        # R2 and D1 persist beside the KV folder (.wrangler/state/{kv,r2,d1}, as wrangler's).
        "kvPersist": persist or False,
        "r2Persist": str(Path(persist).parent / "r2") if persist else False,
        "d1Persist": str(Path(persist).parent / "d1") if persist else False,
        "host": "127.0.0.1",
        "port": port,
        "verbose": verbose,
        "workerLogs": worker_logs,
        "crons": wrangler.get("triggers", {}).get("crons", []),
    }


class Gateway:
    """A running gateway process. `start()` returns once it can serve; `stop()` always cleans up."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self._cfg_file: Path | None = None
        self.lines: list[str] = []  # the Worker's log lines (stdout of workerd)
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 90.0) -> Gateway:
        CACHE.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="gateway-", suffix=".json", dir=CACHE)
        with os.fdopen(fd, "w") as f:
            json.dump(self.config, f)
        self._cfg_file = Path(name)
        # Unbuffered binary pipes: the reader thread reads the raw fd (os.read), so no
        # Python I/O lock is ever held across its blocking read, and nothing that closes or
        # flushes these files (stop, interpreter exit) can wait on that thread.
        self.proc = subprocess.Popen(
            [NODE, str(ROOT / "harness" / "runner.mjs"), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
        )
        deadline = time.monotonic() + timeout
        ready: list[str] = []
        event = threading.Event()

        def on_line(line: str) -> None:
            if not ready and line.startswith('{"ready"'):
                ready.append(json.loads(line)["ready"])
                event.set()
                return
            self.lines.append(line)
            if len(self.lines) > 20000:
                del self.lines[:10000]

        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=_pump, args=(self.proc.stdout.fileno(), on_line, event.set), daemon=True
        )
        self._reader.start()
        event.wait(max(0.0, deadline - time.monotonic()))
        if not ready:
            tail = "\n".join(self.lines[-30:])
            self.stop()
            raise RuntimeError(f"gateway did not start:\n{tail}")
        self.url = ready[0]
        self._wait_first_answer(deadline)
        return self

    def _wait_first_answer(self, deadline: float) -> None:
        """`ready` means workerd listens; Pyodide may still be starting. Wait until the Worker
        itself answers: a 200, or one of its own JSON errors (a test may break it on purpose)."""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=30) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if b'"request_id"' in exc.read():
                    return
                time.sleep(0.1)
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gateway never answered /healthz")

    def scheduled(self, cron: str = "*/5 * * * *", at: float | None = None) -> dict:
        """Run the Worker's scheduled() handler now (the harness's stand-in for a cron tick);
        `at` (epoch seconds) sets the controller's scheduledTime."""
        query = f"cron={urllib.request.quote(cron)}" + (f"&at={at * 1000:.0f}" if at else "")
        req = urllib.request.Request(f"{self.url}/__harness/scheduled?{query}", method="POST")
        before = self._probe_lines()
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        # The handler's log line reaches us through the runtime's stdout a moment after the
        # answer: wait for it (bounded), so a caller reading log_records() sees this tick's.
        deadline = time.monotonic() + 10
        while self._probe_lines() == before and time.monotonic() < deadline:
            time.sleep(0.02)
        return answer

    def _probe_lines(self) -> int:
        return sum('"msg":"probe"' in line for line in list(self.lines))

    def kv_stats(self, reset: bool = False) -> dict[str, int]:
        with urllib.request.urlopen(
            f"{self.url}/__harness/kv-stats" + ("?reset=1" if reset else ""), timeout=30
        ) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/__harness/reset", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
        self.lines.clear()

    def kv_value(self) -> dict | None:
        with urllib.request.urlopen(f"{self.url}/__harness/kv-value", timeout=30) as r:
            raw = json.loads(r.read())["value"]
        return None if raw is None else json.loads(raw)

    def log_records(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            start = line.find("{")
            if start < 0:
                continue
            try:
                out.append(json.loads(line[start:]))
            except ValueError:
                continue
        return out

    def stop(self) -> None:
        """End the runner (and its workerd) within a bounded time, whatever state it is in:
        stdin EOF asks it to dispose workerd, then SIGTERM, then SIGKILL. Every wait has a
        time-out; nothing here waits on the reader thread (a daemon) or a lock it holds."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()  # the runner disposes workerd on stdin EOF
                proc.wait(timeout=DISPOSE_WAIT_S)
            except (subprocess.TimeoutExpired, OSError):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=STOP_GRACE_S)
        if self._cfg_file is not None:
            self._cfg_file.unlink(missing_ok=True)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8787")))
    ap.add_argument("--dev-vars", default=str(ROOT / ".dev.vars"))
    ap.add_argument(
        "--persist",
        default=str(ROOT / ".wrangler" / "state" / "kv"),
        help="folder for the local KV, with R2 and D1 beside it (use '' for in-memory)",
    )
    ap.add_argument(
        "--cron-every",
        type=float,
        default=None,
        help="seconds between local cron ticks (default: from wrangler.toml)",
    )
    args = ap.parse_args(argv)
    dev_vars = Path(args.dev_vars)
    bindings = parse_dev_vars(dev_vars.read_text()) if dev_vars.exists() else {}
    if not dev_vars.exists():
        print(
            f"note: {dev_vars} not found; running with wrangler.toml [vars] only", file=sys.stderr
        )
    cfg = build_config(bindings=bindings, port=args.port, persist=args.persist or None)
    gw = Gateway(cfg)
    gw.start()
    return serve_until_signal(gw, cfg, args.cron_every)


def serve_until_signal(gw: Gateway, cfg: dict, cron_every: float | None, cleanup=()) -> int:
    from harness.cron import cron_loop  # local stand-in for Cloudflare's cron triggers

    # The handlers only append to a list. Anything that takes a lock — Event.set() included
    # — can deadlock in a handler: it runs in the main thread between two bytecodes, maybe
    # while that thread holds the very lock (inside Event.wait, say), and then waits on
    # itself forever (the mechanism of python/cpython#126434; the likely cause of the one
    # hung `make gateway`). The main loop polls the list and stops the others itself.
    signalled: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: signalled.append(signum))
    stop = threading.Event()
    print(f"ready {gw.url}", flush=True)
    printed = 0
    threading.Thread(
        target=cron_loop, args=(gw, cfg["crons"], cron_every, stop), daemon=True
    ).start()
    try:
        while not signalled and gw.proc and gw.proc.poll() is None:
            lines = gw.lines
            for line in lines[printed:]:
                print(line, flush=True)
            printed = len(lines)
            time.sleep(0.2)
    finally:
        stop.set()  # the cron thread's wait ends; it is a daemon either way
        gw.stop()
        for fn in cleanup:
            fn()
    return 0


def _pump(fd: int, on_line, on_end) -> None:
    """Read a pipe's raw fd line by line until EOF (the reader thread)."""
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            on_line(raw.decode("utf-8", "replace").rstrip("\r"))
    if pending:
        on_line(pending.decode("utf-8", "replace"))
    on_end()


if __name__ == "__main__":
    sys.exit(main())
