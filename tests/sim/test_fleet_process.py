"""``sim.fleet.FleetProcess``: the fleet in a child process, driven over its control API."""

from __future__ import annotations

import socket
import subprocess

import httpx
import pytest

from sim.fleet import FleetProcess, FleetProcessError, default_served_names


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_fleet_process_runs_and_controls_the_nodes() -> None:
    with FleetProcess(count=2, api_key="tok") as fleet, httpx.Client(timeout=5) as c:
        assert sorted(fleet.urls) == [1, 2] and fleet.nodes is fleet.urls
        assert fleet.url(2) == fleet.urls[2]
        assert c.get(fleet.control_url + "/health").json() == {"ok": True}
        auth = {"authorization": "Bearer tok"}
        assert c.get(fleet.url(1) + "/v1/models").status_code == 401
        assert c.get(fleet.url(1) + "/v1/models", headers=auth).status_code == 200

        assert fleet.set(2, "status", status=429)["mode"] == "status"
        assert c.get(fleet.url(2) + "/v1/models", headers=auth).status_code == 429
        fleet.set_all("refuse")
        for n in (1, 2):
            with pytest.raises(httpx.ConnectError):  # a new connection (no pooled one)
                httpx.get(fleet.url(n) + "/health", timeout=5)
        assert fleet.set_load(1, 3)["load"] == 3
        state = fleet.reset()
        assert {s["mode"] for s in state.values()} == {"healthy"}
        assert {s["load"] for s in state.values()} == {0}
        assert fleet.requests(1) == []
        c.get(fleet.url(1) + "/health")
        assert [r["path"] for r in fleet.requests(1)] == ["/health"]
        assert fleet.state()["1"]["requests"] == 1

        with pytest.raises(FleetProcessError, match="HTTP 400"):
            fleet.set(1, "bogus")
        with pytest.raises(ValueError, match="no node 3"):
            fleet.set(3, "healthy")
        proc = fleet.proc
    assert proc is not None and proc.returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", _port(fleet.urls[1])), timeout=2)


def test_fleet_process_stop_is_idempotent_and_kills_a_stuck_child() -> None:
    fleet = FleetProcess(count=1).start()
    proc = fleet.proc
    assert proc is not None
    proc.send_signal(19)  # SIGSTOP: it can no longer notice stdin closing
    fleet.stop(timeout=0.5)
    assert proc.returncode == -9 and fleet.proc is None
    fleet.stop()  # again: nothing to do
    with pytest.raises(FleetProcessError, match="not running"):
        fleet.reset()


def test_fleet_process_reports_a_child_that_cannot_start() -> None:
    bad = FleetProcess(count=1, args=["--count", "0"], stderr=subprocess.DEVNULL)
    with pytest.raises(FleetProcessError, match="exited before listening"):
        bad.start()
    assert bad.proc is None


def test_fleet_process_served_names_and_dev_mode() -> None:
    names = {1: ["org/Custom-7B", "code"]}
    with FleetProcess(count=2, served_names=names, dev_mode=True) as fleet:
        with httpx.Client(timeout=5) as c:
            ids = [m["id"] for m in c.get(fleet.url(1) + "/v1/models").json()["data"]]
            assert ids == names[1]
            assert fleet.state()["2"]["served_names"] == list(default_served_names(2))
            assert c.post(fleet.url(2) + "/sleep").status_code == 200  # dev mode is on
            assert fleet.set_served_names(2, ["x"])["served_names"] == ["x"]
            ok = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
            assert c.post(fleet.url(2) + "/v1/chat/completions", json=ok).status_code == 200
            assert fleet.reset()["2"]["served_names"] == list(default_served_names(2))
        with pytest.raises(FleetProcessError, match="served_names"):
            fleet.set_served_names(1, [])


def test_fleet_process_rejects_a_malformed_served_name_flag() -> None:
    bad = FleetProcess(count=1, args=["--served-model-name", "one"], stderr=subprocess.DEVNULL)
    with pytest.raises(FleetProcessError, match="exited before listening"):
        bad.start()
