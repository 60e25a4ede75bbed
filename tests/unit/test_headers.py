"""headers.py: what reaches a node, what reaches the client, request ids, keys and the auth
decision, CORS."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headers import (
    CORS_METHODS,
    HOP_BY_HOP,
    REQUEST_ID_MAX,
    auth_problem,
    connection_tokens,
    cors_headers,
    header_bytes,
    key_matches,
    preflight_headers,
    presented_key,
    request_headers_for_node,
    request_id,
    response_header_drop,
)

CLIENT = {
    "host": "gw.example",
    "authorization": "Bearer client-key",
    "x-api-key": "client-key",
    "cookie": "session=abc",
    "content-type": "application/json",
    "content-length": "12",
    "accept": "text/event-stream",
    "x-custom": "kept",
    "user-agent": "ua/1",
    "x-request-id": "rid-1",
    "cf-connecting-ip": "203.0.113.9",
    "cf-ray": "abc",
    "x-forwarded-for": "203.0.113.9",
    "x-forwarded-proto": "https",
    "x-real-ip": "203.0.113.9",
    "true-client-ip": "203.0.113.9",
    "forwarded": "for=203.0.113.9",
    "cdn-loop": "cloudflare",
}


def test_forwarded_headers_keep_the_request_and_drop_the_client():
    out = request_headers_for_node(CLIENT, "node-token")
    assert out == {
        "content-type": "application/json",
        "accept": "text/event-stream",
        "x-custom": "kept",
        "user-agent": "ua/1",
        "authorization": "Bearer node-token",
        "ngrok-skip-browser-warning": "1",
    }


def test_without_a_node_token_no_authorization_at_all():
    out = request_headers_for_node(CLIENT, None)
    assert "authorization" not in out
    assert "client-key" not in repr(out)
    assert out["ngrok-skip-browser-warning"] == "1"
    assert "authorization" not in request_headers_for_node(CLIENT, "")


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_hop_by_hop_headers_never_forwarded(name):
    out = request_headers_for_node({name: "v", "x-ok": "1"}, None)
    assert name not in out and out["x-ok"] == "1"


def test_connection_listed_headers_are_hop_by_hop():
    client = {"connection": "keep-alive, X-Hop ,x-other", "x-hop": "1", "x-other": "2", "x-k": "3"}
    out = request_headers_for_node(client, None)
    assert "x-hop" not in out and "x-other" not in out and "connection" not in out
    assert out["x-k"] == "3"


def test_client_cannot_override_the_node_token_or_ngrok_header():
    out = request_headers_for_node(
        {"authorization": "Bearer mine", "ngrok-skip-browser-warning": "0"}, "tok"
    )
    assert out["authorization"] == "Bearer tok"
    assert out["ngrok-skip-browser-warning"] == "1"


def test_input_is_not_mutated():
    client = dict(CLIENT)
    request_headers_for_node(client, "tok")
    assert client == CLIENT


@given(
    st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
        st.text(max_size=10),
        max_size=10,
    )
)
@settings(max_examples=200, deadline=None)
def test_forwarded_headers_property(client):
    out = request_headers_for_node(client, "tok")
    for name in ("host", "cookie", "x-api-key", "content-length", "proxy-authorization"):
        assert name not in out
    assert out["authorization"] == "Bearer tok"
    assert not any(k.startswith(("cf-", "x-forwarded-")) for k in out)
    for k, v in out.items():
        if k not in ("authorization", "ngrok-skip-browser-warning"):
            assert client[k] == v


def test_connection_tokens():
    assert connection_tokens(None) == set()
    assert connection_tokens("") == set()
    assert connection_tokens("close") == {"close"}
    assert connection_tokens(" Keep-Alive , , X-A") == {"keep-alive", "x-a"}


def test_response_header_drop():
    names = [
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "server",
        "via",
        "alt-svc",
        "set-cookie",
        "report-to",
        "nel",
        "ngrok-error-code",
        "ngrok-trace-id",
        "cf-ray",
        "cf-cache-status",
        "x-sim-node",
        "x-heady-node",
        "x-listed",
        "x-request-id",
        "retry-after",
        "cache-control",
    ]
    dropped = response_header_drop(names, "x-listed")
    assert set(dropped) == set(names) - {
        "content-type",
        "content-length",
        "x-request-id",
        "retry-after",
        "cache-control",
    }
    assert response_header_drop(["content-type", "x-listed"], None) == []


@pytest.mark.parametrize(
    "value", ["abc", "client-id-42", "a.b:c_d-e", "x" * REQUEST_ID_MAX, "  padded  ", "0"]
)
def test_sane_request_id_is_kept(value):
    assert request_id(value) == value.strip()


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "x" * (REQUEST_ID_MAX + 1),
        "has space",
        "semi;colon",
        "new\nline",
        "ünïcode",
        "<script>",
        "a/b",
        'a"b',
        "١٢٣",
    ],
)
def test_bad_request_id_is_replaced(value):
    rid = request_id(value)
    assert rid != value
    assert len(rid) == 24 and all(c in "0123456789abcdef" for c in rid)


def test_minted_ids_differ():
    assert len({request_id(None) for _ in range(50)}) == 50


def test_header_bytes():
    assert header_bytes({}) == 0
    assert header_bytes({"ab": "cde"}) == 2 + 3 + 4
    assert header_bytes({"a": "", "b": "xy"}) == 5 + 7


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer k1"}, "k1"),
        ({"authorization": "bearer k1"}, "k1"),
        ({"authorization": "BEARER   k1  "}, "k1"),
        ({"authorization": "  Bearer k1"}, "k1"),
        ({"x-api-key": " k2 "}, "k2"),
        ({"authorization": "Bearer k1", "x-api-key": "k2"}, "k1"),
        ({"authorization": "Basic Zm9vOmJhcg==", "x-api-key": "k2"}, "k2"),
        ({"authorization": "Bearer ", "x-api-key": "k2"}, "k2"),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "k1"}, None),
        ({"authorization": "Basic Zm9v"}, None),
        ({"x-api-key": "   "}, None),
        ({}, None),
    ],
)
def test_presented_key(headers, key):
    assert presented_key(headers) == key


@pytest.mark.parametrize(
    ("presented", "keys", "ok"),
    [
        ("k1", ("k1",), True),
        ("k2", ("k1", "k2"), True),
        ("k1", ("k1", "k2"), True),
        ("k", ("k1",), False),
        ("k1x", ("k1",), False),
        ("K1", ("k1",), False),
        ("", ("k1",), False),
        (None, ("k1",), False),
        ("k1", (), False),
        (None, (), False),
        ("ключ", ("ключ",), True),
        ("ключ", ("ключи",), False),
    ],
)
def test_key_matches(presented, keys, ok):
    assert key_matches(presented, keys) is ok


def test_key_matches_compares_every_key(monkeypatch):
    import headers

    calls = []
    real = headers.hmac.compare_digest

    def spy(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(headers.hmac, "compare_digest", spy)
    assert key_matches("k1", ("k1", "k2", "k3"))
    assert calls == [b"k1", b"k2", b"k3"]  # no early exit on the first match
    calls.clear()
    assert not key_matches("nope", ("k1", "k2"))
    assert len(calls) == 2


@given(st.text(max_size=20), st.lists(st.text(min_size=1, max_size=20), max_size=4))
@settings(max_examples=200, deadline=None)
def test_key_matches_is_membership(presented, keys):
    assert key_matches(presented, tuple(keys)) is (presented in keys)


@pytest.mark.parametrize(
    ("headers", "keys", "disabled", "status"),
    [
        ({"authorization": "Bearer k1"}, ("k1",), False, None),
        ({"x-api-key": "k2"}, ("k1", "k2"), False, None),
        ({}, ("k1",), False, 401),
        ({"authorization": "Bearer k9"}, ("k1",), False, 401),
        ({"authorization": "Basic azE="}, ("k1",), False, 401),
        ({"authorization": "Bearer k1"}, (), False, 503),  # no keys: closed, and it says why
        ({}, (), False, 503),
        ({}, (), True, None),  # AUTH_DISABLED (local use) lets everything through
        ({"authorization": "Bearer wrong"}, ("k1",), True, None),
    ],
)
def test_auth_problem(headers, keys, disabled, status):
    problem = auth_problem(headers, keys, disabled)
    if status is None:
        assert problem is None
        return
    got_status, type_, message = problem
    assert got_status == status
    if status == 401:
        assert (type_, message) == ("unauthorized", "missing or invalid API key")
    else:
        assert type_ == "not_configured" and "GATEWAY_API_KEYS" in message


secretish = st.text(alphabet="0123456789#_", min_size=4, max_size=12)  # not in any message


@given(
    st.dictionaries(
        st.sampled_from(["authorization", "x-api-key", "cookie"]),
        st.one_of(secretish, secretish.map(lambda k: "Bearer " + k)),
    ),
    st.lists(secretish, max_size=3).map(tuple),
)
@settings(max_examples=200, deadline=None)
def test_auth_problem_never_quotes_a_key(headers, keys):
    problem = auth_problem(headers, keys, False)
    if problem is None:
        assert key_matches(presented_key(headers), keys)
    else:
        assert problem[0] == (401 if keys else 503)
        shown = [*keys, *(v.removeprefix("Bearer ") for v in headers.values())]
        assert not any(k in problem[2] for k in shown)


def test_cors_any_origin():
    h = cors_headers("https://x.example", ("*",))
    assert h["access-control-allow-origin"] == "*"
    assert "x-heady-node" in h["access-control-expose-headers"]
    assert "retry-after" in h["access-control-expose-headers"]
    assert "vary" not in h
    assert cors_headers(None, ("*",))["access-control-allow-origin"] == "*"


def test_cors_listed_origin_is_echoed_with_vary():
    allowed = ("https://app.example", "https://b.example")
    h = cors_headers("https://app.example", allowed)
    assert h["access-control-allow-origin"] == "https://app.example"
    assert h["vary"] == "Origin"
    assert cors_headers("https://app.example/", allowed)["access-control-allow-origin"]


@pytest.mark.parametrize(
    "origin", [None, "", "https://evil.example", "https://app.example.evil", "http://app.example"]
)
def test_cors_other_origin_gets_nothing(origin):
    assert cors_headers(origin, ("https://app.example",)) == {"vary": "Origin"}


def test_preflight():
    h = preflight_headers("https://app.example", ("https://app.example",))
    assert h["access-control-allow-origin"] == "https://app.example"
    assert h["access-control-allow-methods"] == CORS_METHODS
    assert "POST" in h["access-control-allow-methods"]
    for name in ("authorization", "content-type", "x-api-key", "x-request-id"):
        assert name in h["access-control-allow-headers"]
    assert h["access-control-max-age"] == "86400"
    denied = preflight_headers("https://evil.example", ("https://app.example",))
    assert denied == {"vary": "Origin"}
