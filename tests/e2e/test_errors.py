"""Bad input and bad configuration: always a clear JSON error with a request id."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from harness.gateway import Gateway, build_config
from tests.e2e.conftest import API_KEY, CHAT_PATH, Client, chat, fleet_bindings


def assert_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= {"type", "message", "request_id"}
    assert err["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    if type_:
        assert err["type"] == type_
    return err


def test_missing_key_is_401(client):
    r = client.get("/api/heavy/code/v1/models", auth=False)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_wrong_key_is_401(client, fleet):
    r = client.get(
        "/api/heavy/code/v1/models",
        auth=False,
        headers={"authorization": "Bearer " + API_KEY[:-1] + "X"},
    )
    assert_error(r, 401)
    assert not any(fleet.requests(n) for n in range(1, 9))


def test_x_api_key_header_and_second_key_work(client):
    assert (
        client.get(
            "/api/heavy/code/v1/models", auth=False, headers={"x-api-key": API_KEY}
        ).status_code
        == 200
    )
    assert (
        client.get(
            "/api/heavy/code/v1/models", auth=False, headers={"authorization": "Bearer other-key"}
        ).status_code
        == 200
    )


def test_unknown_role_is_404_naming_valid_roles(client):
    err = assert_error(client.get("/api/heavy/poetry/v1/x"), 404, "unknown_role")
    for role in ("reasoning", "code", "vision", "batch"):
        assert role in err["message"]


def test_unknown_endpoint_is_404(client):
    assert_error(client.get("/admin"), 404, "not_found")


def test_body_over_limit_is_413(client, fleet):
    r = client.post("/api/heavy/code/v1/completions", content=b"a" * (64 * 1024 + 1))
    assert_error(r, 413, "payload_too_large")
    assert not fleet.requests(3) and not fleet.requests(4)


def test_chunked_body_over_limit_is_413(client, fleet):
    def chunks():
        for _ in range(20):
            yield b"b" * 8192

    r = client.post("/api/heavy/code/v1/completions", content=chunks())
    assert_error(r, 413)
    assert not fleet.requests(3) and not fleet.requests(4)


# Bodies up to 64 KiB declared (body.FIRST_READ_BYTES) are read in one call, larger ones in
# growing steps (body.next_read_size): every size up to the limit (64 KiB here) arrives
# byte-exact. (tests/e2e/test_client_faults.py sends bigger ones to a 1 MiB limit.)
@pytest.mark.parametrize("size", [1, 1024, 16 * 1024, 16 * 1024 + 1, 40_000, 64 * 1024])
def test_declared_body_of_any_size_is_forwarded_byte_exact(client, fleet, size):
    skeleton = json.dumps({"model": "code", "prompt": ""}).encode()
    if size < len(skeleton):
        body = b" " * size  # not JSON: the node's 400 is relayed, the bytes still count
    else:
        body = json.dumps({"model": "code", "prompt": "p" * (size - len(skeleton))}).encode()
    assert len(body) == size
    r = client.post(
        "/api/heavy/code/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code in (200, 400), r.text
    got = fleet.requests(int(r.headers["x-heady-node"]))[-1]
    assert got.complete and got.declared == size and got.body == body


def test_chunked_body_under_limit_is_forwarded_whole(client, fleet):
    body = json.dumps({"model": "code", "prompt": "p" * 4000}).encode()

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = client.post(
        "/api/heavy/code/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200
    got = fleet.requests(int(r.headers["x-heady-node"]))[-1]
    assert got.body == body and got.complete


def raw_request(url: str, target: str, extra: str = "") -> tuple[int, bytes]:
    """Send a request line exactly as written (httpx would normalise the path)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {API_KEY}"
            f"\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        # Read exactly the announced body: the server may keep the socket open regardless.
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        while length is not None and len(body) < length and (chunk := s.recv(65536)):
            body += chunk
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/api/heavy/code/a%2Fb",
        "/api/heavy/code/a%5cb",
        "/api/heavy/code//evil.example/x",
        "/api/heavy/code/a/%2e%2e%2fx",
        "/api/heavy/code/x%00y",
    ],
)
def test_malformed_paths_are_400(client, fleet, target):
    status, body = raw_request(client.gw.url, target)
    assert status == 400, body
    assert b'"request_id"' in body
    assert not any(fleet.requests(n) for n in range(1, 9))


def test_dot_segments_cannot_escape_the_role(client, fleet):
    # The runtime resolves '..' before the Worker sees the path; whatever remains must not
    # reach a node outside /api/heavy/<role>/.
    status, body = raw_request(client.gw.url, "/api/heavy/code/../../../admin")
    assert status == 404 and b'"request_id"' in body
    status, _ = raw_request(client.gw.url, "/api/heavy/code/%2e%2e/%2e%2e/admin")
    assert status in (400, 404)
    assert not any(fleet.requests(n) for n in range(1, 9))


def test_huge_path_is_414(client):
    status, body = raw_request(client.gw.url, "/api/heavy/code/" + "a" * 5000)
    assert status == 414 and b'"request_id"' in body


def test_huge_headers_are_rejected_as_json(client):
    extra = "".join(f"x-filler-{i}: {'v' * 1000}\r\n" for i in range(40))
    status, body = raw_request(client.gw.url, "/api/heavy/code/x", extra)
    assert status == 431 and b'"request_id"' in body


def test_unsupported_method_is_405(client):
    assert_error(client.request("TRACE", "/api/heavy/code/x"), 405)


def test_status_needs_a_key(client):
    assert_error(client.get("/api/status", auth=False), 401)


@pytest.fixture(scope="module")
def misconfigured(fleet):
    bindings = fleet_bindings(fleet)
    del bindings["GATEWAY_API_KEYS"]
    with Gateway(build_config(bindings=bindings)) as gw:
        yield gw


def test_no_keys_means_503_not_configured(misconfigured, fleet):
    c = Client(misconfigured, fleet)
    err = assert_error(c.get("/api/heavy/code/v1/models", auth=False), 503, "not_configured")
    assert "GATEWAY_API_KEYS" in err["message"]


@pytest.fixture(scope="module")
def open_gateway(fleet):
    bindings = fleet_bindings(fleet, AUTH_DISABLED="true")
    del bindings["GATEWAY_API_KEYS"]
    bindings["COLAB_ENDPOINT_2"] = "ftp://user:pw@example.org"
    bindings["COLAB_ENDPOINT_3"] = "https://user:secretpw@tunnel.example"
    del bindings["COLAB_ENDPOINT_4"]
    with Gateway(build_config(bindings=bindings)) as gw:
        yield gw


def test_invalid_and_unconfigured_nodes_are_excluded_and_reported(open_gateway, fleet):
    fleet.reset()
    c = Client(open_gateway, fleet)
    st = c.get("/api/status", auth=False).json()
    by = {n["node"]: n for n in st["nodes"]}
    assert by[2]["config"] == "invalid" and "scheme" in by[2]["config_reason"]
    assert by[3]["config"] == "invalid" and "credentials" in by[3]["config_reason"]
    assert by[4]["config"] == "unconfigured"
    assert by[1]["config"] == "configured"
    assert "secretpw" not in str(st) and "example.org" not in str(st)
    r = c.post(CHAT_PATH % "code", auth=False, json=chat("code"))
    assert r.headers["x-heady-node"] == "1"  # 3 invalid, 4 unset: straight to the fallback
    assert r.headers["x-heady-fallback"] == "true"


@pytest.fixture(scope="module")
def bad_routes(fleet):
    bindings = fleet_bindings(fleet, ROUTES='{"roles": {"code": [3, 9]}}')
    with Gateway(build_config(bindings=bindings)) as gw:
        yield gw


def test_invalid_routes_var_is_a_clear_503(bad_routes, fleet):
    c = Client(bad_routes, fleet)
    err = assert_error(c.get("/api/heavy/code/v1/models"), 503, "misconfigured")
    assert "ROUTES.roles.code" in err["message"] and "9" in err["message"]


@pytest.fixture(scope="module")
def custom_routes(fleet):
    routes = '{"roles": {"chat": [2, 5], "embed": [6]}, "fallback": [8]}'
    with Gateway(build_config(bindings=fleet_bindings(fleet, ROUTES=routes))) as gw:
        yield gw


def test_routes_var_overrides_roles_and_fallback(custom_routes, fleet):
    fleet.reset()
    c = Client(custom_routes, fleet)
    nodes = {c.get("/api/heavy/chat/v1/models").headers["x-heady-node"] for _ in range(4)}
    assert nodes == {"2", "5"}
    fleet.set(6, "refuse")
    r = c.get("/api/heavy/embed/v1/models")
    assert r.headers["x-heady-node"] == "8" and r.headers["x-heady-fallback"] == "true"
    assert_error(c.get("/api/heavy/code/v1/models"), 404, "unknown_role")
    routes = c.get("/api/status").json()["routes"]
    assert routes == {
        "chat": {"pair": [2, 5], "fallback": [8]},
        "embed": {"pair": [6], "fallback": [8]},
    }


@pytest.fixture(scope="module")
def faulty(fleet):
    # The harness makes reading this binding raise, as a broken runtime binding would.
    bindings = fleet_bindings(fleet, HARNESS_FAULT="GATEWAY_API_KEYS")
    with Gateway(build_config(bindings=bindings)) as gw:
        yield gw


def test_unexpected_error_is_500_json_and_logged_server_side(faulty, fleet):
    c = Client(faulty, fleet)
    r = c.get("/api/heavy/code/v1/models", headers={"x-request-id": "boom-1"})
    err = assert_error(r, 500, "internal_error")
    assert err["request_id"] == "boom-1"
    assert "harness fault" not in r.text and "Traceback" not in r.text
    end = time.monotonic() + 5
    while time.monotonic() < end:
        recs = [x for x in faulty.log_records() if x.get("request_id") == "boom-1"]
        if recs:
            break
        time.sleep(0.05)
    assert recs and recs[0]["status"] == 500
    assert "harness fault: reading binding GATEWAY_API_KEYS" in recs[0]["error"]
    assert "Traceback" in recs[0]["error"]


# vLLM serves these beside /v1, several without its API key (docs/usage/security.md, "API Key
# Authentication Limitations"); the fleet runs with VLLM_SERVER_DEV_MODE so all of them exist.
NODE_ONLY = [
    ("POST", "/invocations"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/version"),
    ("GET", "/load"),
    ("GET", "/ping"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/collective_rpc"),
    ("GET", "/server_info"),
    ("GET", "/metrics"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/v2/anything"),
]


@pytest.mark.parametrize(("method", "path"), NODE_ONLY)
def test_only_the_api_reaches_a_node(client, fleet, method, path):
    # Anything outside /v1/ is the gateway's own 404 and never reaches a node.
    r = client.request(method, f"/api/heavy/code{path}", json=chat("code", prompt="x"))
    err = assert_error(r, 404)
    assert err["request_id"]
    assert "x-heady-node" not in r.headers
    assert not any(fleet.requests(n) for n in (3, 4, 1, 2)), "reached a node"
    assert not fleet.node(3).paused and not fleet.node(4).paused
