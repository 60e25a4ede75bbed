"""The things measured: the simulated node itself and the Workers in front of it.

  direct   the simulated node
  bare-js  bench/bare_js/worker.mjs, a pass-through JS Worker (same harness runner)
  bare-py  bench/bare_py/entry.py, a pass-through Python Worker (harness adapter)
  gateway  src/ (plus one `gateway[LABEL]` per `--src LABEL=DIR`, another source tree)

Every Worker runs in the same offline workerd the end-to-end tests use, started by the harness.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import one_request
from bench.common import API_KEY, BENCH, NODE_TOKEN, POST_PATH, ROLE, ROOT, SMALL_BODY
from bench.probes import find_workerd
from harness.bindings import fleet_env
from harness.gateway import CACHE, Gateway, build_config
from sim.fleet import FleetProcess

HEAVY_PATH = f"/api/heavy/{ROLE}{POST_PATH}"


class WorkerProcess(Gateway):
    """The harness's Worker process, ready once the Worker answers anything at all: the
    pass-through Workers relay the node's own 404 for the harness's `/healthz` probe."""

    def _wait_first_answer(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=30):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"no answer from {self.url}")


@dataclass
class Target:
    name: str
    url: str  # base URL
    path: str  # path of the small JSON POST
    auth: bool = False
    server: WorkerProcess | None = None  # None for direct
    workerd: int | None = None  # pid, for CPU and memory
    cold_start_s: list[float] = field(default_factory=list)

    @property
    def post_url(self) -> str:
        return self.url + self.path

    def url_for(self, upstream_path: str) -> str:
        """The URL that reaches `upstream_path` on the node through this target."""
        return self.url + self.path.replace(POST_PATH, upstream_path)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass(frozen=True)
class Variant:
    """How to start one Python Worker target (so it can be started again: cold starts, memory)."""

    name: str
    src: Path
    path: str
    auth: bool
    bindings: dict[str, str]

    def start(self, *, worker_logs: bool = False, name: str | None = None) -> Target:
        config = build_config(bindings=self.bindings, src=self.src, worker_logs=worker_logs)
        return start_worker(name or self.name, config, self.path, self.auth)


def gateway_bindings(fleet: FleetProcess) -> dict[str, str]:
    """Production's bindings, with time-outs short enough to measure failover in seconds."""
    return fleet_env(
        fleet,
        node_token=NODE_TOKEN,
        api_keys=API_KEY,
        ATTEMPT_TIMEOUT_S="1",
        ROLE_TIMEOUTS_S='{"batch": 1}',
        KV_MIN_WRITE_INTERVAL_S="1",
    )


def python_variants(fleet: FleetProcess, extra_src: list[str]) -> dict[str, Variant]:
    """bare-py, gateway, and one gateway[LABEL] per `--src LABEL=DIR` (or just DIR)."""
    upstream = {"UPSTREAM": fleet.url(1)}
    out = {
        "bare-py": Variant("bare-py", BENCH / "bare_py", POST_PATH, False, upstream),
        "gateway": Variant("gateway", ROOT / "src", HEAVY_PATH, True, gateway_bindings(fleet)),
    }
    for spec in extra_src:
        label, _, d = spec.partition("=")
        if not d:
            label, d = Path(spec).name, spec
        name = f"gateway[{label}]"
        out[name] = Variant(name, Path(d).resolve(), HEAVY_PATH, True, gateway_bindings(fleet))
    return out


def js_worker_config(upstream: str) -> dict:
    """The bare JS Worker, run by the same harness runner (and workerd) as the Python ones."""
    worker = {"name": "worker.mjs", "file": str(BENCH / "bare_js" / "worker.mjs")}
    return {
        "modulesRoot": str(CACHE / "modules-js"),
        "modules": [worker | {"type": "ESModule"}],
        "compatibilityDate": "2024-07-01",
        "compatibilityFlags": [],
        "bindings": {"UPSTREAM": upstream},
        "kvNamespaces": {},
        "host": "127.0.0.1",
        "port": 0,
        "workerLogs": False,
        "crons": [],
    }


def start_worker(name: str, config: dict, path: str, auth: bool) -> Target:
    """Start one Worker; process start to the first 200 on the small POST is its cold start."""
    t0 = time.monotonic()
    gw = WorkerProcess(config).start(timeout=180)
    target = Target(name, gw.url, path, auth, gw)
    try:
        body = SMALL_BODY.encode()
        status = asyncio.run(one_request(target.post_url, "POST", body, auth))[0]
        target.cold_start_s.append(time.monotonic() - t0)
        if status != 200:
            raise RuntimeError(f"{name}: small POST answered {status}")
        assert gw.proc is not None
        target.workerd = find_workerd(gw.proc.pid)
    except BaseException:
        gw.stop()
        raise
    return target


def start_js_worker(upstream: str) -> Target:
    return start_worker("bare-js", js_worker_config(upstream), POST_PATH, False)
