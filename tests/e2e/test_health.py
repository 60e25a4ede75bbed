"""Health state: KV writes on transitions only, expiring marks, cron probes, status, logs."""

from __future__ import annotations

import time

from tests.e2e.conftest import CHAT_PATH, chat


def _wait_for(predicate, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_kv_written_on_transition_only_and_expiring(client, fleet, gateway):
    for _ in range(10):  # steady state: healthy traffic writes nothing
        assert client.get("/api/heavy/code/v1/models").status_code == 200
    stats = gateway.kv_stats()
    assert stats["put"] == 0
    assert stats["get"] <= 1  # one read for the cold isolate, then memory

    fleet.set(3, "refuse")
    fleet.set(4, "refuse")
    client.get("/api/heavy/code/v1/models")  # transition: 3 and 4 go down -> one write
    stats = _wait_for(lambda: (s := gateway.kv_stats())["put"] >= 1 and s)
    assert stats["put"] == 1
    ttl = stats["last_put"]["options"]["expirationTtl"]
    assert ttl >= 60  # every mark expires; KV rejects less than 60 s
    record = gateway.kv_value()
    assert record["nodes"]["3"]["s"] == "down" and record["nodes"]["4"]["s"] == "down"
    assert record["nodes"]["3"]["until"] > time.time()
    assert "127.0.0.1" not in str(record)

    for _ in range(10):  # still down: no more writes, node 1 serves
        assert client.get("/api/heavy/code/v1/models").headers["x-heady-node"] == "1"
    time.sleep(1.2)  # past KV_MIN_WRITE_INTERVAL_S
    client.get("/api/heavy/code/v1/models")
    assert gateway.kv_stats()["put"] == 1


def test_scheduled_probe_brings_a_recovered_node_back(client, fleet, gateway):
    fleet.set(7, "refuse")
    fleet.set(8, "refuse")
    client.get("/api/heavy/batch/v1/models")
    status = client.get("/api/status").json()
    assert {n["node"]: n["state"] for n in status["nodes"]}[7] == "down"
    fleet.set(7, "healthy")
    gateway.scheduled()
    status = client.get("/api/status").json()
    node7 = {n["node"]: n for n in status["nodes"]}[7]
    assert node7["state"] == "up" and node7["checked_at"] is not None
    r = client.get("/api/heavy/batch/v1/models")
    assert r.headers["x-heady-node"] == "7"
    # the probe went to the configured health path with the node token
    probes = [q for q in fleet.requests(7) if q.path == "/health"]
    assert probes and probes[-1].header("authorization", "").startswith("Bearer ")
    # The recovery is shared too: once KV_MIN_WRITE_INTERVAL_S (1 s here) has passed since
    # the down mark was written, the next request flushes it.
    time.sleep(1.2)
    client.get("/api/heavy/batch/v1/models")
    record = _wait_for(lambda: (v := gateway.kv_value()) and v["nodes"]["7"]["s"] == "up" and v)
    assert record and record["nodes"]["7"]["s"] == "up"


def test_scheduled_probe_marks_dead_nodes_down_and_records_load(client, fleet, gateway):
    fleet.set(5, "ngrok_offline")
    fleet.set_load(3, 9)
    fleet.set_load(4, 2)
    gateway.scheduled()
    by = {n["node"]: n for n in client.get("/api/status").json()["nodes"]}
    assert by[5]["state"] == "down" and by[5]["reason"] == "tunnel_offline"
    assert by[3]["load"] == 9 and by[4]["load"] == 2
    assert by[3]["latency_ms"] is not None
    # less-loaded first when both loads are known
    assert {client.get("/api/heavy/code/v1/models").headers["x-heady-node"] for _ in range(4)} == {
        "4"
    }


def test_healthy_nodes_are_probed_sparsely(client, fleet, gateway):
    slot = 1800  # PROBE_UP_EVERY_S default; the cron runs every 300 s
    base = (time.time() // slot) * slot

    def probed() -> set[int]:
        return {n for n in range(1, 9) if any(q.path == "/health" for q in fleet.requests(n))}

    gateway.scheduled(at=base + 900)  # every node is unknown: every node is probed
    assert probed() == set(range(1, 9))
    fleet.set(6, "status", status=503)
    client.get("/api/heavy/vision/v1/models")
    client.get("/api/heavy/vision/v1/models")  # round-robin: one of the two hit node 6 -> down
    fleet.clear_requests()
    gateway.scheduled(at=base + 1200)  # node 6 is down; the healthy nodes' slot is not due
    assert probed() == {6}
    fleet.clear_requests()
    gateway.scheduled(at=base + 1500)
    assert probed() == {6}  # a down node is probed on every run
    fleet.clear_requests()
    gateway.scheduled(at=base + slot + 100)  # a new slot began within this run's period
    assert probed() == set(range(1, 9))


def test_status_reports_every_node_without_urls(client, fleet):
    fleet.set(2, "refuse")
    client.get("/api/heavy/reasoning/v1/models")
    client.get("/api/heavy/reasoning/v1/models")
    st = client.get("/api/status").json()
    assert st["gateway"]["version"]
    assert [n["node"] for n in st["nodes"]] == list(range(1, 9))
    node2 = st["nodes"][1]
    assert node2["roles"] == ["reasoning"]
    assert node2["state"] == "down" and node2["reason"] == "refused"
    assert node2["since"] and node2["until"] and node2["failures"] == 1
    assert st["routes"]["code"] == {"pair": [3, 4], "fallback": [1, 2]}


def test_one_structured_log_line_per_request(client, gateway, fleet):
    fleet.set(1, "refuse")
    r = client.post(
        CHAT_PATH % "reasoning", json=chat("reasoning"), headers={"x-request-id": "trace-me-1"}
    )
    r2 = client.post(
        CHAT_PATH % "reasoning", json=chat("reasoning"), headers={"x-request-id": "trace-me-2"}
    )
    assert r.status_code == r2.status_code == 200

    def lines():
        return [
            rec
            for rec in gateway.log_records()
            if rec.get("msg") == "request" and str(rec.get("request_id", "")).startswith("trace-me")
        ]

    recs = _wait_for(lambda: len(lines()) >= 2 and lines())
    assert len(recs) == 2
    first = (
        next(x for x in recs if len(x["attempts"]) == 2)
        if any(len(x["attempts"]) == 2 for x in recs)
        else recs[0]
    )
    assert first["role"] == "reasoning" and first["status"] == 200
    assert first["attempts"][0]["outcome"] in ("failover", "pass")
    assert isinstance(first["ms"], float | int)
    # one clock for every duration: none is ever negative
    assert all(x["ms"] >= 0 and all(a["ms"] >= 0 for a in x["attempts"]) for x in recs)
    joined = "\n".join(gateway.lines)
    assert "127.0.0.1:" + str(fleet.port(1)) not in joined  # no node URL in any log line
    assert "node-token" not in joined


def test_deadline_bounds_the_whole_request(fleet):
    from harness.gateway import Gateway, build_config
    from tests.e2e.conftest import Client, fleet_bindings

    fleet.reset()
    for n in (1, 2, 3, 4):
        fleet.set(n, "hang")
    bindings = fleet_bindings(fleet, DEADLINE_S="3", ATTEMPT_TIMEOUT_S="2")
    with Gateway(build_config(bindings=bindings)) as gw:
        c = Client(gw, fleet)
        started = time.monotonic()
        r = c.get("/api/heavy/code/v1/models")
        took = time.monotonic() - started
    fleet.reset()
    assert r.status_code == 503
    assert 2.5 <= took <= 4.5, took
    # two full attempts fit in 3 s; a third may start with the last moments, never a fourth
    assert len(r.json()["error"]["attempts"]) in (2, 3)


def test_the_cron_learns_each_nodes_model_id_and_answers_carry_it(client, fleet, gateway):
    # vLLM labels its metrics with the node's first served name (its repo id); the cron's
    # metrics read keeps it, and answers from that node say who answered.
    gateway.scheduled()
    status = {n["node"]: n for n in client.get("/api/status").json()["nodes"]}
    for n in (3, 4):
        assert status[n]["model"] == fleet.node(n).served_names[0]
    r = client.post(
        CHAT_PATH % "code", json=chat("code"), headers={"origin": "https://app.example"}
    )
    assert r.status_code == 200
    node = int(r.headers["x-heady-node"])
    assert r.headers["x-heady-model"] == fleet.node(node).served_names[0]
    assert "x-heady-model" in r.headers["access-control-expose-headers"]  # browsers see it
