"""Routing, balancing, pass-through and headers, end to end in the real runtime."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.e2e.conftest import API_KEY, NODE_TOKEN

PAIRS = {"reasoning": (1, 2), "code": (3, 4), "vision": (5, 6), "batch": (7, 8)}


def test_healthz_is_public(client):
    r = client.get("/healthz", auth=False)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("role", sorted(PAIRS))
def test_each_role_reaches_its_pair_and_balances(client, fleet, role):
    seen = []
    for _ in range(6):
        r = client.get(f"/api/heavy/{role}/v1/models")
        assert r.status_code == 200
        assert r.headers["x-heady-role"] == role
        assert r.headers["x-heady-fallback"] == "false"
        assert r.headers["x-heady-attempts"] == "1"
        seen.append(int(r.headers["x-heady-node"]))
        assert r.json()["data"][0]["id"] in fleet.served_names(seen[-1])
    assert set(seen) == set(PAIRS[role])  # both nodes of the pair served
    assert abs(seen.count(PAIRS[role][0]) - seen.count(PAIRS[role][1])) <= 1
    others = [n for n in range(1, 9) if n not in PAIRS[role]]
    assert all(not fleet.requests(n) for n in others)


def test_request_passes_through_intact(client, fleet):
    body = json.dumps({"model": "code", "prompt": "\u00e9\u0000" + "b" * 10_000}).encode()
    r = client.post(
        "/api/heavy/code/v1/completions?x=1&y=%2F&z",
        content=body,
        headers={
            "content-type": "application/json",
            "x-custom": "kept",
            "x-request-id": "client-id-42",
            "cookie": "session=abc",
            "connection": "keep-alive, x-hop",
            "x-hop": "dropped",
        },
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-id-42"
    n = int(r.headers["x-heady-node"])
    (got,) = fleet.requests(n)
    assert got.method == "POST"
    assert got.path == "/v1/completions"
    assert got.query == "x=1&y=%2F&z"
    assert got.body == body and got.complete
    assert hashlib.sha256(got.body).hexdigest() == hashlib.sha256(body).hexdigest()
    assert r.json()["model"] == "code"
    assert got.header("x-custom") == "kept"
    assert got.header("content-type") == "application/json"
    # the node gets the cluster token, never the client's key, cookie or hop-by-hop headers
    assert got.header("authorization") == f"Bearer {NODE_TOKEN}"
    assert API_KEY not in repr(got.headers)
    assert got.header("cookie") is None
    assert got.header("x-hop") is None
    assert got.header("ngrok-skip-browser-warning") == "1"
    assert got.header("host") == f"127.0.0.1:{fleet.port(n)}"


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "HEAD"])
def test_any_method_is_forwarded(client, fleet, method):
    # The node's own answer to a method it does not serve (FastAPI's 405) passes through.
    r = client.request(method, "/api/heavy/batch/v1/models")
    assert r.status_code == 405
    n = int(r.headers["x-heady-node"])
    assert fleet.requests(n)[-1].method == method


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500])
def test_model_server_errors_pass_through_unchanged(client, fleet, status):
    fleet.set(3, "status", status=status, body='{"detail": "from the model server"}')
    fleet.set(4, "status", status=status, body='{"detail": "from the model server"}')
    r = client.post("/api/heavy/code/v1/chat/completions", json={"x": 1})
    assert r.status_code == status
    assert r.json() == {"detail": "from the model server"}
    assert r.headers["x-heady-attempts"] == "1"


def test_response_headers_are_cleaned_and_tagged(client):
    r = client.get("/api/heavy/vision/v1/models", headers={"origin": "https://app.example"})
    assert r.status_code == 200
    assert "x-sim-node" not in r.headers  # node-internal headers stripped
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-heady-node" in r.headers["access-control-expose-headers"]
    assert r.json()["object"] == "list"


def test_cors_preflight(client):
    r = client.request(
        "OPTIONS",
        "/api/heavy/code/v1/chat/completions",
        auth=False,
        headers={"origin": "https://app.example", "access-control-request-method": "POST"},
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"]
    other = client.request(
        "OPTIONS", "/api/heavy/code/x", auth=False, headers={"origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_sse_streams_event_by_event(client, fleet):
    import time

    for n in (1, 2):
        fleet.set(n, "sse", events=40, interval=0.05)
    started = time.monotonic()
    first = None
    events = 0
    with client.http.stream(
        "POST",
        "/api/heavy/reasoning/v1/chat/completions",
        headers={"authorization": f"Bearer {API_KEY}"},
        json={"stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events += 1
                if first is None:
                    first = time.monotonic() - started
    total = time.monotonic() - started
    assert events == 40
    assert total >= 1.9  # the node spaces 40 events 50 ms apart
    assert first is not None and first < 0.5, f"first event after {first:.3f}s of {total:.3f}s"


@pytest.mark.parametrize("bad", ["has space", "x" * 200, "semi;colon", "<script>"])
def test_insane_request_ids_are_replaced(client, bad):
    r = client.get("/api/heavy/code/v1/models", headers={"x-request-id": bad})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid != bad and len(rid) == 24 and rid.isalnum()


def test_streams_may_outlast_the_attempt_timeout(client, fleet):
    # ATTEMPT_TIMEOUT_S=2 bounds the wait for response headers only: a stream that has
    # started must not be cut when that time-out passes.
    for n in (3, 4):
        fleet.set(n, "sse", events=30, interval=0.1)
    with client.http.stream(
        "POST",
        "/api/heavy/code/v1/chat/completions",
        headers={"authorization": f"Bearer {API_KEY}"},
        json={"stream": True},
    ) as r:
        assert r.status_code == 200
        events = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
    assert events == 30


def test_streamed_first_attempt_reaches_the_node_whole(client, fleet):
    body = json.dumps({"model": "reasoning", "prompt": "z" * 50_000}).encode()
    r = client.post(
        "/api/heavy/reasoning/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200
    got = fleet.requests(int(r.headers["x-heady-node"]))[-1]
    assert got.body == body
    framing = got.header("content-length") or got.header("transfer-encoding")
    assert framing in (str(len(body)), "chunked")
