"""Node behaviour per mode, as a gateway (an httpx client) sees it over real loopback sockets."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import httpx
import pytest

from sim.fleet import Fleet
from sim.node import parse_mode

# -- healthy: vLLM-like endpoints -------------------------------------------------------------


def test_health_is_empty_200_and_every_response_names_its_node(
    fleet: Fleet, client: httpx.Client
) -> None:
    for n in (1, 2, 3):
        r = client.get(fleet.url(n) + "/health")
        assert r.status_code == 200
        assert r.content == b""
        assert r.headers["x-sim-node"] == str(n)


def test_metrics_report_the_load(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set_load(2, 5)
    text = client.get(fleet.url(2) + "/metrics").text
    name = fleet.served_names(2)[0]  # vLLM labels its metrics with the first served name
    assert f'vllm:num_requests_waiting{{model_name="{name}"}} 5.0' in text
    assert f'vllm:num_requests_running{{model_name="{name}"}}' in text
    name1 = fleet.served_names(1)[0]
    assert (
        f'vllm:num_requests_waiting{{model_name="{name1}"}} 0.0'
        in client.get(fleet.url(1) + "/metrics").text
    )
    with pytest.raises(ValueError):
        fleet.set_load(2, -1)


def test_models(fleet: Fleet, client: httpx.Client) -> None:
    body = client.get(fleet.url(1) + "/v1/models").json()
    assert body["object"] == "list"
    assert [c["id"] for c in body["data"]] == list(fleet.served_names(1))
    assert body["data"][0]["object"] == "model"


def test_chat_completion(fleet: Fleet, client: httpx.Client) -> None:
    payload = {"model": "code", "messages": [{"role": "user", "content": "hi there"}]}
    r = client.post(fleet.url(3) + "/v1/chat/completions", json=payload)
    body = r.json()
    assert r.status_code == 200
    assert body["object"] == "chat.completion"
    assert body["node"] == 3
    assert body["model"] == "code"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "node 3" in body["choices"][0]["message"]["content"]
    assert body["usage"]["total_tokens"] > 0
    assert fleet.requests(3)[-1].json() == payload


def test_completion(fleet: Fleet, client: httpx.Client) -> None:
    r = client.post(fleet.url(1) + "/v1/completions", json={"prompt": "say", "max_tokens": 2})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_chat_completion_stream(fleet: Fleet, client: httpx.Client) -> None:
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", fleet.url(2) + "/v1/chat/completions", json=payload) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["node"] == 2 for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello from sim node 2."
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_completion_rejects_bad_json(fleet: Fleet, client: httpx.Client) -> None:
    json_type = {"content-type": "application/json"}
    r = client.post(fleet.url(1) + "/v1/chat/completions", content=b"{not json", headers=json_type)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "Bad Request"  # FastAPI validation, as vLLM words it
    assert (err["code"], err["param"]) == (400, "body.0")
    assert "json_invalid" in err["message"]
    r = client.post(fleet.url(1) + "/v1/chat/completions", json={"messages": []})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "body.messages")


# -- what the node recorded ------------------------------------------------------------------


def test_record_of_a_binary_body_query_and_headers(fleet: Fleet, client: httpx.Client) -> None:
    body = b"\x00\xffbinary\x80"
    r = client.request(
        "PATCH",
        fleet.url(1) + "/some/where",
        params=[("a", "1"), ("b", "x y")],
        headers={"X-Custom": "Value", "X-Dup": "one"},
        content=body,
    )
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    rec = fleet.requests(1)[-1]
    assert (rec.node, rec.method, rec.path, rec.query) == (1, "PATCH", "/some/where", "a=1&b=x+y")
    assert ("x-custom", "Value") in rec.headers and ("x-dup", "one") in rec.headers
    assert rec.body == body
    summary = rec.to_dict()
    assert summary["body_len"] == len(body)
    assert summary["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert summary["body"] is None  # not UTF-8
    assert (summary["declared"], summary["received"], summary["complete"]) == (9, 9, True)


def test_record_keeps_repeated_headers_and_chunked_bodies(
    fleet: Fleet, client: httpx.Client
) -> None:
    headers = [("x-dup", "one"), ("x-dup", "two")]
    client.post(fleet.url(1) + "/t", headers=headers, content="héllo".encode())
    rec = fleet.requests(1)[-1]
    assert [h for h in rec.headers if h[0] == "x-dup"] == [("x-dup", "one"), ("x-dup", "two")]
    assert rec.to_dict()["body"] == "héllo"
    parts = [b"alpha-", b"\x00\xff", b"-omega"]
    client.post(fleet.url(2) + "/upload", content=iter(parts))  # iterator: sent chunked
    rec = fleet.requests(2)[-1]
    assert ("transfer-encoding", "chunked") in rec.headers
    assert (rec.body, rec.declared, rec.received) == (b"".join(parts), None, 14)


# -- api key ----------------------------------------------------------------------------------


def test_api_key_checks_the_bearer_token(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set_api_key(1, "sekrit")
    url = fleet.url(1)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        r = client.get(url + "/v1/models", headers=headers)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
    ok = {"Authorization": "Bearer sekrit"}
    assert client.get(url + "/v1/models", headers=ok).status_code == 200
    # vLLM compares the scheme case-insensitively
    ok = {"Authorization": "bearer sekrit"}
    assert client.get(url + "/v1/models", headers=ok).status_code == 200
    chat = client.post(url + "/v1/chat/completions", json={"messages": [{"content": "x"}]})
    assert chat.status_code == 401


def test_fleet_wide_api_key() -> None:
    with Fleet(count=1, api_key="k") as fleet, httpx.Client(timeout=5) as c:
        assert c.get(fleet.url(1) + "/v1/models").status_code == 401
        r = c.get(fleet.url(1) + "/v1/models", headers={"authorization": "Bearer k"})
        assert r.status_code == 200


# -- failure modes ----------------------------------------------------------------------------


def test_refuse_then_recover_on_same_port(fleet: Fleet, client: httpx.Client) -> None:
    url, port = fleet.url(2), fleet.port(2)
    assert client.get(url + "/health").status_code == 200  # leaves a pooled keep-alive conn
    fleet.set(2, "refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    with pytest.raises(httpx.ConnectError):
        client.get(url + "/health")
    fleet.set(2, "healthy")
    assert fleet.port(2) == port
    assert fleet.url(2) == url
    assert client.get(url + "/health").status_code == 200
    # and again, to be sure the re-bound socket can be closed and re-bound too
    fleet.set(2, "refuse")
    with pytest.raises(httpx.ConnectError):
        client.get(url + "/health")
    fleet.set(2, "status", status=503)
    assert client.get(url + "/health").status_code == 503


def test_hang_until_client_timeout_then_recover(fleet: Fleet) -> None:
    fleet.set(1, "hang")
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fleet.url(1) + "/v1/chat/completions", json={"x": 1}, timeout=0.3)
    assert time.monotonic() - start >= 0.25
    assert fleet.requests(1)[-1].path == "/v1/chat/completions"  # it was read, just not answered
    fleet.set(1, "healthy")
    assert httpx.get(fleet.url(1) + "/health", timeout=2).status_code == 200


def test_leaving_hang_drops_hung_connections(fleet: Fleet) -> None:
    fleet.set(3, "hang")
    outcome: list[BaseException | int] = []

    def call() -> None:
        try:
            outcome.append(httpx.get(fleet.url(3) + "/x", timeout=5).status_code)
        except httpx.HTTPError as e:
            outcome.append(e)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 2
    while not fleet.requests(3) and time.monotonic() < deadline:
        time.sleep(0.01)
    fleet.set(3, "healthy")
    t.join(3)
    assert not t.is_alive()
    assert isinstance(outcome[0], httpx.RemoteProtocolError | httpx.ReadError)


def test_slow_headers_delay(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set(2, "slow_headers", delay=0.3)
    start = time.monotonic()
    r = client.get(fleet.url(2) + "/v1/models")
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == fleet.served_names(2)[0]
    assert 0.3 <= elapsed < 2.0


def test_status_with_retry_after(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set(1, "status", status=429, headers={"Retry-After": "7"})
    r = client.post(fleet.url(1) + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert r.headers["x-sim-node"] == "1"
    assert r.json()["error"]["code"] == 429
    assert client.get(fleet.url(1) + "/health").status_code == 429  # the whole node is sick


@pytest.mark.parametrize("status", [400, 500, 503])
def test_status_codes_and_custom_body(fleet: Fleet, client: httpx.Client, status: int) -> None:
    fleet.set(3, "status", status=status, body="boom")
    r = client.get(fleet.url(3) + "/v1/models")
    assert (r.status_code, r.text) == (status, "boom")
    assert r.headers["content-type"].startswith("text/plain")


def test_ngrok_offline_signature(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set(2, "ngrok_offline")
    r = client.post(fleet.url(2) + "/v1/chat/completions", json={})
    assert r.status_code == 404
    assert r.headers["content-type"] == "text/html"
    assert r.headers["ngrok-error-code"] == "ERR_NGROK_3200"
    assert "offline" in r.text
    assert "ERR_NGROK_3200" in r.text


def test_cf_tunnel_down_signature(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set(3, "cf_tunnel_down")
    r = client.get(fleet.url(3) + "/health")
    assert r.status_code == 530
    assert r.headers["content-type"] == "text/html"
    assert "error code: 1033" in r.text
    assert r.headers["cf-ray"]
    assert r.headers["x-sim-node"] == "3"


def test_sse_events_are_spaced_and_unbuffered(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set(1, "sse", events=10, interval=0.05)
    arrivals: list[float] = []
    events: list[str] = []
    start = time.monotonic()
    with client.stream("GET", fleet.url(1) + "/anything") as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert [p["i"] for p in payloads] == list(range(10))
    # 9 intervals of 50 ms: the first event must arrive long before the last (no buffering).
    assert arrivals[-2] - arrivals[0] >= 0.3
    assert payloads[-1]["t"] - payloads[0]["t"] >= 0.3
    assert arrivals[0] < 0.2


def test_sse_default_parameters() -> None:
    assert parse_mode("sse").params == {"events": 200, "interval": 0.01}


# -- bookkeeping ------------------------------------------------------------------------------


def test_requests_are_recorded_per_node(fleet: Fleet, client: httpx.Client) -> None:
    client.post(fleet.url(1) + "/p?q=1", content=b"abc", headers={"X-Trace": "T"})
    client.get(fleet.url(2) + "/g")
    [rec] = fleet.requests(1)
    assert (rec.node, rec.method, rec.path, rec.query, rec.body) == (1, "POST", "/p", "q=1", b"abc")
    assert rec.header("X-Trace") == "T"
    assert ("x-trace", "T") in rec.headers
    assert rec.arrived <= time.monotonic()
    assert [r.path for r in fleet.requests(2)] == ["/g"]
    assert fleet.requests(3) == []
    fleet.clear_requests(1)
    assert fleet.requests(1) == []
    assert len(fleet.requests(2)) == 1
    fleet.clear_requests()
    assert fleet.requests(2) == []


def test_request_log_keeps_the_last_1000(fleet: Fleet) -> None:
    total = 1010
    batch = b"".join(b"GET /r%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(total))
    with socket.create_connection(("127.0.0.1", fleet.port(3)), timeout=5) as sock:
        sock.sendall(batch + b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        while sock.recv(1 << 20):
            pass
    log = fleet.requests(3)
    assert len(log) == 1000
    assert log[-1].path == "/last"
    assert log[0].path == f"/r{total + 1 - 1000}"
    assert fleet.node(3).request_count == total + 1


def test_reset_restores_everything(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set(1, "refuse")
    fleet.set(2, "hang")
    fleet.set_load(3, 9)
    client.get(fleet.url(3) + "/x")
    fleet.reset()
    assert [fleet.mode(n) for n in (1, 2, 3)] == ["healthy"] * 3
    assert fleet.requests(3) == []
    assert all(client.get(fleet.url(n) + "/health").status_code == 200 for n in (1, 2, 3))
    assert "} 0.0" in client.get(fleet.url(3) + "/metrics").text


def test_invalid_settings_are_rejected(fleet: Fleet) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        fleet.set(1, "sleepy")
    with pytest.raises(ValueError, match="no parameter"):
        fleet.set(1, "healthy", delay=1)
    with pytest.raises(ValueError):
        fleet.set(1, "status", status=99)
    with pytest.raises(ValueError):
        fleet.set(1, "sse", events=-1)
    with pytest.raises(ValueError):
        fleet.set(1, "status", headers={"x": "a\r\nInjected: 1"})
    with pytest.raises(ValueError, match="no node"):
        fleet.set(9, "healthy")
    assert fleet.mode(1) == "healthy"


def test_standalone_fleet_stops_cleanly() -> None:
    fleet = Fleet(count=2)
    fleet.start()
    port = fleet.port(1)
    fleet.set(2, "hang")
    hung = socket.create_connection(("127.0.0.1", fleet.port(2)), timeout=5)
    hung.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    time.sleep(0.05)
    fleet.stop()
    fleet.stop()  # idempotent
    assert hung.recv(10) == b""  # the hung connection was dropped, not left dangling
    hung.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_client_leaving_mid_stream_is_cleaned_up(fleet: Fleet, client: httpx.Client) -> None:
    fleet.set(2, "sse", events=1000, interval=0.01)
    with client.stream("GET", fleet.url(2) + "/s") as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # closing the stream dropped the connection: the server-side handler must be gone too
    deadline = time.monotonic() + 2
    while fleet.node(2)._server.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fleet.node(2)._server.connections
    fleet.set(2, "healthy")
    assert client.get(fleet.url(2) + "/health").status_code == 200
