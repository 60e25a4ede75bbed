"""The simulated node tells the truth: each test pins one vLLM behaviour the gateway depends on.

Sources (vllm-project/vllm): vllm/entrypoints/openai/models/serving.py (model check, model
cards), vllm/entrypoints/openai/engine/serving.py (_check_model, ErrorResponse),
vllm/entrypoints/serve/utils/server_utils.py (AuthenticationMiddleware, GUARDED_PREFIX),
vllm/entrypoints/serve/{rlhf,sleep}/api_router.py (pause/resume, dev-mode routes),
docs/usage/security.md ("API Key Authentication Limitations").
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from heady_shared.routes import DEFAULT_POOLS, roles_served_by
from sim.fleet import NODE_MODELS, Fleet, default_served_names
from sim.node import VLLM_VERSION

KEY = "node-key"
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def vfleet() -> Iterator[Fleet]:
    """The default 8-node fleet, with the node token and dev mode (every route exposed)."""
    with Fleet(count=8, api_key=KEY, dev_mode=True) as f:
        yield f


@pytest.fixture
def nodes(vfleet: Fleet) -> Iterator[Fleet]:
    vfleet.reset()
    yield vfleet
    vfleet.reset()


@pytest.fixture
def c() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def _not_found(model: str) -> dict:
    return {
        "error": {
            "message": f"The model `{model}` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


# -- served names -----------------------------------------------------------------------------


def test_default_fleet_serves_repo_id_and_fallback_roles() -> None:
    # As the node side starts vLLM: its checkpoint, then each role whose plan can reach it.
    for n in range(1, 9):
        assert default_served_names(n) == (NODE_MODELS[n], *roles_served_by(n, DEFAULT_POOLS))
    assert set(default_served_names(1)) >= {"reasoning", "code", "vision", "batch"}
    assert default_served_names(3)[1:] == ("code",)
    assert default_served_names(7)[1:] == ("batch",)
    assert NODE_MODELS[3] != NODE_MODELS[4]  # a pair whose nodes got different GPUs


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/invocations"])
def test_unknown_model_is_vllms_404(nodes: Fleet, c: httpx.Client, path: str) -> None:
    body = {"model": "reasoning", **(CHAT if "chat" in path or path == "/invocations" else {})}
    if path == "/v1/completions":
        body["prompt"] = "hi"
    r = c.post(nodes.url(3) + path, json=body, headers=AUTH)
    assert (r.status_code, r.json()) == (404, _not_found("reasoning"))


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_v1_inference_needs_a_json_content_type(nodes: Fleet, c: httpx.Client, ctype) -> None:
    # vLLM's validate_json_request: `curl -d` without `-H content-type: ...` is refused.
    headers = {**AUTH, **({"content-type": ctype} if ctype else {})}
    body = json.dumps({"model": "code", **CHAT}).encode()
    r = c.post(nodes.url(3) + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("Bad Request", 400)
    assert "Unsupported Media Type: Only 'application/json' is allowed" in err["message"]
    ok = {**AUTH, "content-type": "application/json; charset=utf-8"}
    assert c.post(nodes.url(3) + "/v1/chat/completions", content=body, headers=ok).is_success


def test_body_is_validated_before_the_model_is_checked(nodes: Fleet, c: httpx.Client) -> None:
    r = c.post(nodes.url(3) + "/v1/chat/completions", json={"model": "nope"}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "body.messages")


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenizer_endpoints_check_the_model_too(nodes: Fleet, c: httpx.Client, path: str) -> None:
    body = {"model": "x", "prompt": "hi", "tokens": [104, 105]}
    r = c.post(nodes.url(3) + path, json=body)
    assert (r.status_code, r.json()) == (404, _not_found("x"))


def test_every_served_name_answers_and_is_echoed(nodes: Fleet, c: httpx.Client) -> None:
    for name in nodes.served_names(1):
        r = c.post(
            nodes.url(1) + "/v1/chat/completions", json={"model": name, **CHAT}, headers=AUTH
        )
        assert (r.status_code, r.json()["model"]) == (200, name)


def test_missing_model_is_served_by_the_first_name(nodes: Fleet, c: httpx.Client) -> None:
    for body in (CHAT, {"model": None, **CHAT}, {"model": "", **CHAT}):
        r = c.post(nodes.url(4) + "/v1/chat/completions", json=body, headers=AUTH)
        assert (r.status_code, r.json()["model"]) == (200, NODE_MODELS[4])


def test_models_lists_one_card_per_name_rooted_at_the_checkpoint(
    nodes: Fleet, c: httpx.Client
) -> None:
    cards = c.get(nodes.url(1) + "/v1/models", headers=AUTH).json()["data"]
    assert [card["id"] for card in cards] == list(nodes.served_names(1))
    assert {card["root"] for card in cards} == {NODE_MODELS[1]}
    assert {card["owned_by"] for card in cards} == {"vllm"}


def test_served_names_can_be_overridden_and_reset(nodes: Fleet, c: httpx.Client) -> None:
    nodes.set_served_names(4, ["other/Model", "code"])
    r = c.post(
        nodes.url(4) + "/v1/chat/completions", json={"model": NODE_MODELS[4], **CHAT}, headers=AUTH
    )
    assert r.status_code == 404
    ids = [m["id"] for m in c.get(nodes.url(4) + "/v1/models", headers=AUTH).json()["data"]]
    assert ids == ["other/Model", "code"]
    nodes.reset()
    assert nodes.served_names(4) == default_served_names(4)


def test_served_names_per_node_at_start() -> None:
    with Fleet(count=2, served_names={2: ["a", "b"]}) as f, httpx.Client(timeout=5) as c:
        assert f.served_names(1) == default_served_names(1)
        assert [m["id"] for m in c.get(f.url(2) + "/v1/models").json()["data"]] == ["a", "b"]


# -- the API key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/models", "/v1/nothing-here", "/v1x", "/v2/x", "/inference/v1/generate", "/cohere/x"],
)
def test_api_key_guards_only_vllms_prefixes(nodes: Fleet, c: httpx.Client, path: str) -> None:
    r = c.get(nodes.url(2) + path)
    assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/health", 200),
        ("GET", "/metrics", 200),
        ("GET", "/version", 200),
        ("POST", "/invocations", 200),  # inference, with no key at all
        ("POST", "/tokenize", 200),
        ("POST", "/pause", 200),
        ("POST", "/collective_rpc", 200),
        ("GET", "/nowhere", 404),
    ],
)
def test_everything_else_is_open_even_with_a_key(
    nodes: Fleet, c: httpx.Client, method: str, path: str, status: int
) -> None:
    r = c.request(method, nodes.url(2) + path, json={"model": "code", "prompt": "hi"})
    assert r.status_code == status
    c.post(nodes.url(2) + "/resume")


def test_options_is_never_authenticated(nodes: Fleet, c: httpx.Client) -> None:
    preflight = {"origin": "https://x.example", "access-control-request-method": "POST"}
    r = c.options(nodes.url(2) + "/v1/chat/completions", headers=preflight)
    assert (r.status_code, r.headers["access-control-allow-origin"]) == (200, "*")
    # a bare OPTIONS skips the key check too and reaches the router: 405
    r = c.options(nodes.url(2) + "/v1/chat/completions")
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})


def test_unknown_v1_path_with_the_key_is_fastapis_404(nodes: Fleet, c: httpx.Client) -> None:
    r = c.get(nodes.url(2) + "/v1/echo", headers=AUTH)
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})


# -- the other endpoints ----------------------------------------------------------------------


def test_operational_endpoints(nodes: Fleet, c: httpx.Client) -> None:
    url = nodes.url(5)
    assert c.get(url + "/version").json() == {"version": VLLM_VERSION}
    assert c.get(url + "/ping").status_code == 200 and c.post(url + "/ping").status_code == 200
    assert c.get(url + "/load").json() == {"server_load": 0}
    tok = c.post(url + "/tokenize", json={"prompt": "héllo"}).json()
    assert tok["count"] == len(tok["tokens"]) == len("héllo".encode())
    back = c.post(url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back == {"prompt": "héllo"}
    inv = c.post(url + "/invocations", json={"model": "vision", **CHAT}).json()
    assert (inv["object"], inv["model"]) == ("chat.completion", "vision")
    r = c.post(url + "/invocations", json={"model": "vision"})
    assert r.status_code == 400


def test_wrong_method_is_405_and_health_has_no_head(nodes: Fleet, c: httpx.Client) -> None:
    for method, path in (
        ("HEAD", "/health"),
        ("POST", "/health"),
        ("GET", "/invocations"),
        ("GET", "/pause"),
    ):
        r = c.request(method, nodes.url(5) + path)
        assert r.status_code == 405, (method, path)
        assert "allow" in r.headers


def test_metrics_answer_any_method(nodes: Fleet, c: httpx.Client) -> None:
    # vLLM mounts prometheus' ASGI app at /metrics, which ignores the method.
    assert "vllm:num_requests_running" in c.post(nodes.url(5) + "/metrics").text


def test_pause_holds_inference_until_resume(nodes: Fleet, c: httpx.Client) -> None:
    url = nodes.url(6)
    assert c.post(url + "/pause").json() == {"status": "paused"}
    assert c.get(url + "/is_paused").json() == {"is_paused": True}
    with pytest.raises(httpx.ReadTimeout):
        c.post(url + "/invocations", json={"model": "vision", **CHAT}, timeout=0.3)
    assert c.post(url + "/resume").json() == {"status": "resumed"}
    assert c.post(url + "/invocations", json={"model": "vision", **CHAT}).status_code == 200


def test_dev_mode_routes_exist_only_in_dev_mode(nodes: Fleet, c: httpx.Client) -> None:
    dev = [
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/reset_prefix_cache"),
        ("POST", "/collective_rpc"),
        ("GET", "/server_info"),
    ]
    for method, path in dev:
        assert c.request(method, nodes.url(7) + path, json={}).status_code == 200, path
    c.post(nodes.url(7) + "/sleep")
    assert c.get(nodes.url(7) + "/is_sleeping").json() == {"is_sleeping": True}
    with Fleet(count=1) as plain, httpx.Client(timeout=5) as c2:
        for method, path in dev:
            r = c2.request(method, plain.url(1) + path, json={})
            assert (r.status_code, r.json()) == (404, {"detail": "Not Found"}), path


# -- streams and their failures ---------------------------------------------------------------


def _raw_stream(port: int, body: dict, *, key: str = KEY) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {key}\r\ncontent-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _read_all(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
            if out.endswith(b"0\r\n\r\n"):
                return out, None
    except OSError as e:
        return out, e
    return out, None


def test_a_vllm_stream_ends_with_done(nodes: Fleet, c: httpx.Client) -> None:
    body = {"model": "code", "stream": True, **CHAT}
    with c.stream("POST", nodes.url(3) + "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        data = [line for line in r.iter_lines() if line]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "stop"


def test_stream_reset_sends_k_events_then_a_tcp_reset(nodes: Fleet) -> None:
    nodes.set(3, "stream_reset", after=3)
    with _raw_stream(nodes.port(3), {"model": "code", "stream": True, **CHAT}) as sock:
        out, err = _read_all(sock)
    assert isinstance(err, ConnectionResetError)
    assert out.count(b"data: ") == 3 and b"[DONE]" not in out
    assert not out.endswith(b"0\r\n\r\n")  # never a clean end of the chunked body


def test_stream_eof_ends_cleanly_without_done(nodes: Fleet, c: httpx.Client) -> None:
    nodes.set(3, "stream_eof", after=4)
    body = {"model": "code", "stream": True, **CHAT}
    with c.stream("POST", nodes.url(3) + "/v1/chat/completions", json=body, headers=AUTH) as r:
        events = [line for line in r.iter_lines() if line]
    assert len(events) == 4 and all(e.startswith("data: {") for e in events)
    # ended like `transformers serve` ends: cleanly, and the connection stays usable
    assert c.get(nodes.url(3) + "/health").status_code == 200


def test_streams_outside_the_mode_are_whole(nodes: Fleet, c: httpx.Client) -> None:
    nodes.set(3, "stream_reset", after=1)
    r = c.post(nodes.url(3) + "/v1/chat/completions", json={"model": "code", **CHAT}, headers=AUTH)
    assert r.status_code == 200  # a non-streamed answer is whole
    assert c.get(nodes.url(3) + "/health").status_code == 200  # probes still pass


def test_body_cut_promises_more_than_it_sends(nodes: Fleet) -> None:
    nodes.set(3, "body_cut", size=100_000)
    with _raw_stream(nodes.port(3), {"model": "code", **CHAT}) as sock:
        out, err = _read_all(sock)
    head, _, body = out.partition(b"\r\n\r\n")
    declared = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    assert declared > 100_000
    assert 0 < len(body) < declared  # half of it, then the connection died
    assert isinstance(err, ConnectionResetError) or err is None


def _chunked_answer(nodes: Fleet, n: int) -> tuple[bytes, BaseException | None]:
    """A chat answer from node `n` read raw, after checking it is framed by chunks and not
    by a Content-Length: (the raw chunked body, how the connection ended)."""
    with _raw_stream(nodes.port(n), {"model": "code", **CHAT}) as sock:
        out, err = _read_all(sock)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = [h.lower() for h in head.split(b"\r\n")]
    assert b"transfer-encoding: chunked" in lines
    assert not any(h.startswith(b"content-length") for h in lines)
    return body, err


def test_chunked_body_cut_never_sends_the_last_chunk(nodes: Fleet) -> None:
    """A chunked answer that dies half-way: no Content-Length, and the zero-size chunk that
    ends a chunked body (RFC 9112 §7.1) never comes; only the reset says it broke."""
    nodes.set(3, "body_cut", size=100_000, chunked=True)
    body, err = _chunked_answer(nodes, 3)
    assert len(body) > 50_000  # half of the answer arrived
    assert not body.endswith(b"0\r\n\r\n")
    assert isinstance(err, ConnectionResetError) or err is None


def test_chunked_json_is_whole_without_content_length(nodes: Fleet) -> None:
    nodes.set(3, "chunked_json")
    body, _ = _chunked_answer(nodes, 3)
    assert body.endswith(b"0\r\n\r\n")  # the final chunk: a whole answer


def test_sim_modes_have_safe_defaults() -> None:
    from sim.node import parse_mode

    assert parse_mode("stream_reset").params == {"after": 2, "interval": 0.0}
    assert parse_mode("stream_eof").params == {"after": 2, "interval": 0.0}
    assert parse_mode("body_cut").params == {"size": 256 * 1024, "chunked": False}
    with pytest.raises(ValueError):
        parse_mode("body_cut", {"chunked": "yes"})
    with pytest.raises(ValueError):
        parse_mode("body_cut", {"size": 10})
    with pytest.raises(ValueError):
        parse_mode("stream_reset", {"after": -1})


# -- records: body completeness and connection close ------------------------------------------


def test_record_of_a_body_that_never_completed(nodes: Fleet) -> None:
    sock = socket.create_connection(("127.0.0.1", nodes.port(8)), timeout=5)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789"
    )
    deadline = time.monotonic() + 2
    while not nodes.requests(8) and time.monotonic() < deadline:
        time.sleep(0.01)
    [rec] = nodes.requests(8)
    assert (rec.path, rec.complete, rec.closed) == ("/v1/completions", False, None)
    left = time.monotonic()
    sock.close()
    while rec.closed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.closed is not None and left <= rec.closed < left + 1
    assert (rec.declared, rec.received, rec.complete) == (100, 10, False)


def test_record_shows_when_a_streaming_client_left(nodes: Fleet, c: httpx.Client) -> None:
    nodes.set(8, "stream_eof", after=10_000, interval=0.01)
    body = {"model": "batch", "stream": True, **CHAT}
    with c.stream("POST", nodes.url(8) + "/v1/chat/completions", json=body, headers=AUTH) as r:
        next(r.iter_lines())
        left = time.monotonic()
    rec = nodes.requests(8)[-1]
    deadline = time.monotonic() + 2
    while rec.closed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.complete and rec.closed is not None and rec.closed - left < 0.5
