"""The fleet runs the real batch workers beside nodes 7-8 and kills/revives a node together with
its worker (what `make dev` and the batch chaos bench rely on).

The "gateway" here is a small recording HTTP server answering 204 (no work) to lease requests:
enough to see which worker asks, with which credential and model names, and when it stops."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from heady_shared.nodeauth import node_of
from sim.fleet import FleetProcess, FleetProcessError
from tests.support.local import alive, serving, wait_for

SECRET = "s3cret-for-tests"


class _Recorder(ThreadingHTTPServer):
    asks: list[tuple[int | None, list[str]]]


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/api/nodes/v1/leases":
            cred = (self.headers.get("authorization") or "").removeprefix("Bearer ")
            self.server.asks.append((node_of(SECRET, cred), json.loads(body)["models"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[_Recorder]:
    server = _Recorder(("127.0.0.1", 0), _Handler)
    server.asks = []
    with serving(server):
        yield server


def test_workers_run_beside_7_and_8_and_die_and_revive_with_their_node(
    gateway: _Recorder, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{gateway.server_address[1]}"
    with FleetProcess(api_key="tok") as fleet:
        workers = fleet.start_workers(url, SECRET, log_dir=tmp_path)
        assert sorted(workers) == ["7", "8"] and all(w["alive"] for w in workers.values())
        # Each asks for work as its own node, with the model names its engine serves.
        wait_for(lambda: {n for n, _ in gateway.asks} == {7, 8}, timeout=20)
        models = dict(gateway.asks)
        assert "batch" in models[7] and "batch" in models[8]

        pid7 = workers["7"]["pid"]
        state = fleet.kill(7)
        assert state["mode"] == "refuse" and state["worker"]["alive"] is False
        assert not alive(pid7)  # the whole process group is gone, not just asked to leave
        with pytest.raises(httpx.ConnectError):
            httpx.get(fleet.url(7) + "/health", timeout=5)
        assert fleet.workers()["8"]["alive"] is True  # the partner is untouched

        gateway.asks.clear()
        state = fleet.revive(7)
        assert state["mode"] == "healthy" and state["worker"]["alive"] is True
        assert state["worker"]["pid"] != pid7
        wait_for(lambda: 7 in {n for n, _ in gateway.asks}, timeout=20)
        assert httpx.get(fleet.url(7) + "/health", timeout=5).status_code == 200

        fleet.kill(8)
        fleet.reset()  # every node healthy and every dead worker started again
        assert all(w["alive"] for w in fleet.workers().values())
        assert "batch-worker" in (tmp_path / "worker-7.log").read_text()

        with pytest.raises(FleetProcessError, match="HTTP 400"):
            fleet.start_workers("http://example.com", SECRET)  # plain http off this machine
        pids = [w["pid"] for w in fleet.workers().values()]
    for pid in pids:  # stopping the fleet stops its workers
        wait_for(lambda pid=pid: not alive(pid), timeout=10)
