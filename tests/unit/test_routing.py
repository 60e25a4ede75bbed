"""routing.py: split_url, parse_route (and which node paths are forwarded, with no client key
left in the query), upstream_url, route_table."""

from __future__ import annotations

from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heady_shared.routes import Pool
from routing import (
    ALLOWED_METHODS,
    MAX_PATH_BYTES,
    MAX_QUERY_BYTES,
    Route,
    RouteError,
    parse_route,
    path_allowed,
    route_table,
    split_url,
    strip_key_params,
    upstream_url,
)

ROLES = ("reasoning", "code", "vision", "batch")


def route(path: str, query: str = "", method: str = "POST", roles=ROLES, paths=("/v1/",)):
    return parse_route(method, path, query, roles, paths)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://gw.example/api/heavy/code/v1/x?a=1&b=2", ("/api/heavy/code/v1/x", "a=1&b=2")),
        ("https://gw.example/p", ("/p", "")),
        ("https://gw.example/", ("/", "")),
        ("https://gw.example", ("/", "")),
        ("https://gw.example/p?", ("/p", "")),
        ("https://gw.example/p?q#frag", ("/p", "q")),
        ("https://gw.example/p#frag?notquery", ("/p", "")),
        ("https://gw.example/p?a=%2F&b=c%20d&z", ("/p", "a=%2F&b=c%20d&z")),
        ("https://gw.example/p?x=?y", ("/p", "x=?y")),
        ("http://127.0.0.1:8787/a%2Fb/c", ("/a%2Fb/c", "")),
        ("/relative/path?q=1", ("/relative/path", "q=1")),
    ],
)
def test_split_url(url, expected):
    assert split_url(url) == expected


@pytest.mark.parametrize("role", ROLES)
def test_each_valid_role(role):
    r = route(f"/api/heavy/{role}/v1/chat/completions")
    assert r == Route(role, "/v1/chat/completions", "")


def test_role_without_rest_is_the_node_root_which_is_not_forwarded():
    for path in ("/api/heavy/code", "/api/heavy/code/"):
        r = route(path)
        assert isinstance(r, RouteError) and (r.status, r.type) == (404, "not_forwarded")
    assert route("/api/heavy/code", paths=("/",)) == Route("code", "/", "")
    assert route("/api/heavy/code/", paths=("/",)) == Route("code", "/", "")


def test_default_upstream_paths_argument_is_v1():
    assert parse_route("GET", "/api/heavy/code/v1/models", "", ROLES) == Route(
        "code", "/v1/models", ""
    )
    assert isinstance(parse_route("GET", "/api/heavy/code/tokenize", "", ROLES), RouteError)


def test_rest_keeps_percent_encoding_and_query_is_raw():
    r = route("/api/heavy/code/v1/echo/a%20b", "x=1&y=%2F&z&w=%00")
    assert r == Route("code", "/v1/echo/a%20b", "x=1&y=%2F&z&w=%00")


def test_trailing_slash_in_rest_is_kept():
    assert route("/api/heavy/code/v1/models/").rest == "/v1/models/"


@pytest.mark.parametrize("method", sorted(ALLOWED_METHODS))
def test_allowed_methods(method):
    assert isinstance(route("/api/heavy/code/v1/x", method=method), Route)


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "get", "PROPFIND", "", "X" * 100])
def test_bad_method_is_405(method):
    r = route("/api/heavy/code/x", method=method)
    assert isinstance(r, RouteError)
    assert (r.status, r.type) == (405, "method_not_allowed")
    assert len(r.message) < 80  # the method is quoted truncated


@pytest.mark.parametrize("role", ["poetry", "CODE", "cod", "code2", "", "c%6fde"])
def test_unknown_role_is_404_listing_valid_roles(role):
    r = route(f"/api/heavy/{role}/v1/x")
    assert isinstance(r, RouteError)
    assert (r.status, r.type) == (404, "unknown_role")
    assert "valid roles: batch, code, reasoning, vision" in r.message


def test_unknown_role_message_truncates_the_role():
    r = route("/api/heavy/" + "z" * 500 + "/x")
    assert isinstance(r, RouteError) and r.status == 404
    assert "z" * 33 not in r.message


def test_unknown_role_with_custom_roles():
    r = route("/api/heavy/code/x", roles=("embed", "chat"))
    assert isinstance(r, RouteError) and r.message.endswith("valid roles: chat, embed")


def test_no_roles_at_all_is_404():
    r = route("/api/heavy/code/x", roles=())
    assert isinstance(r, RouteError) and r.status == 404


@pytest.mark.parametrize(
    "rest",
    [
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "//evil.example/x",
        "/a//b",
        "/a/b//",
    ],
)
def test_encoded_slashes_and_empty_segments_are_400(rest):
    r = route("/api/heavy/code" + rest)
    assert isinstance(r, RouteError)
    assert (r.status, r.type) == (400, "bad_path")


def test_double_slash_right_after_the_role_is_400():
    r = route("/api/heavy/code//evil.example/x")
    assert isinstance(r, RouteError) and r.status == 400 and "//" in r.message


@pytest.mark.parametrize("rest", ["/x%00y", "/x%00", "/a\x00b", "/a\nb", "/a\rb", "/a\x7fb"])
def test_nul_and_control_characters_in_path_are_400(rest):
    r = route("/api/heavy/code" + rest)
    assert isinstance(r, RouteError) and r.status == 400
    assert "control" in r.message


@pytest.mark.parametrize(
    "rest",
    [
        "/.",
        "/..",
        "/a/..",
        "/a/../b",
        "/a/./b",
        "/%2e",
        "/%2E",
        "/%2e%2e",
        "/%2E%2e/x",
        "/.%2e/x",
        "/%2e./x",
        "/a/%2e%2e",
    ],
)
def test_dot_segments_are_400(rest):
    r = route("/api/heavy/code" + rest)
    assert isinstance(r, RouteError) and r.status == 400
    assert "'.'" in r.message


@pytest.mark.parametrize(
    "rest", ["/a.b", "/.well-known/x", "/...", "/a..b", "/v1.0/x", "/%2e%2e%2e"]
)
def test_dots_inside_names_are_fine(rest):
    assert route("/api/heavy/code/v1" + rest) == Route("code", "/v1" + rest, "")


def test_control_characters_in_query_are_400():
    r = route("/api/heavy/code/x", "a=1\r\nb=2")
    assert isinstance(r, RouteError) and r.status == 400 and "query" in r.message


def test_encoded_things_in_query_are_fine():
    r = route("/api/heavy/code/v1/x", "a=%2F%5C%00&b=..&c=//")
    assert r.query == "a=%2F%5C%00&b=..&c=//"


def test_too_long_path_is_414():
    ok = "/api/heavy/code/v1/" + "a" * (MAX_PATH_BYTES - len("/api/heavy/code/v1/"))
    assert len(ok) == MAX_PATH_BYTES
    assert isinstance(route(ok), Route)
    r = route(ok + "a")
    assert isinstance(r, RouteError) and (r.status, r.type) == (414, "uri_too_long")


def test_too_long_query_is_414():
    assert isinstance(route("/api/heavy/code/v1/x", "q" * MAX_QUERY_BYTES), Route)
    r = route("/api/heavy/code/v1/x", "q" * (MAX_QUERY_BYTES + 1))
    assert isinstance(r, RouteError) and r.status == 414


def test_method_is_checked_before_length_and_role():
    r = route("/api/heavy/nope/" + "a" * 10_000, method="TRACE")
    assert isinstance(r, RouteError) and r.status == 405


def test_length_is_checked_before_role():
    r = route("/api/heavy/nope/" + "a" * 10_000)
    assert isinstance(r, RouteError) and r.status == 414


@given(st.text(max_size=60), st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_parse_route_never_raises_and_routes_stay_inside_the_role(rest, query):
    r = route("/api/heavy/code/v1/" + rest, query)
    if isinstance(r, Route):
        assert r.role == "code"
        assert r.rest.startswith("/v1/")
        assert "//" not in r.rest
        low = r.rest.lower()
        assert "%2f" not in low and "%5c" not in low and "\\" not in r.rest
        segments = low.replace("%2e", ".").split("/")
        assert "." not in segments and ".." not in segments
        assert r.query == query
    else:
        assert r.status in (400, 414)


# ---- which node paths are forwarded -------------------------------------------------------


@pytest.mark.parametrize(
    "rest",
    [
        "/invocations",
        "/pause",
        "/tokenize",
        "/metrics",
        "/health",
        "/V1/models",  # compared case-sensitively, as vLLM routes
        "/v1x",
        "/v10/models",
        "/x/v1/models",
    ],
)
def test_node_paths_outside_upstream_paths_are_404(rest):
    r = route("/api/heavy/code" + rest)
    assert isinstance(r, RouteError) and (r.status, r.type) == (404, "not_forwarded")
    assert r.message == "only these node paths are served here: /v1/"


@pytest.mark.parametrize("rest", ["/v1", "/v1/", "/v1/models", "/v1/chat/completions"])
def test_v1_and_below_are_forwarded(rest):
    assert route("/api/heavy/code" + rest) == Route("code", rest, "")


def test_bad_paths_are_400_before_the_forwarding_check():
    for rest in ("/a%2fb", "/..", "/a//b"):
        r = route("/api/heavy/code" + rest)
        assert isinstance(r, RouteError) and r.status == 400, rest


def test_unknown_role_is_404_before_the_forwarding_check():
    r = route("/api/heavy/nope/invocations")
    assert isinstance(r, RouteError) and r.type == "unknown_role"


def test_custom_upstream_paths_and_their_message():
    paths = ("/v1/", "/tokenize")
    assert route("/api/heavy/code/tokenize", paths=paths) == Route("code", "/tokenize", "")
    r = route("/api/heavy/code/tokenize/x", paths=paths)  # an exact entry: nothing below it
    assert isinstance(r, RouteError) and r.message.endswith(": /v1/, /tokenize")


@pytest.mark.parametrize(
    ("rest", "paths", "ok"),
    [
        ("/v1/x", ("/v1/",), True),
        ("/v1", ("/v1/",), True),
        ("/v1/", ("/v1/",), True),
        ("/v1x", ("/v1/",), False),
        ("/v", ("/v1/",), False),
        ("/", ("/v1/",), False),
        ("/tokenize", ("/tokenize",), True),
        ("/tokenize/", ("/tokenize",), False),
        ("/tokenizer", ("/tokenize",), False),
        ("/detokenize", ("/v1/", "/tokenize"), False),
        ("/x", (), False),
    ],
)
def test_path_allowed(rest, paths, ok):
    assert path_allowed(rest, paths) is ok


@given(
    st.text(alphabet="/v1xyz", max_size=8).map(lambda t: "/" + t),
    st.lists(st.text(alphabet="/v1xyz", min_size=1, max_size=5).map(lambda t: "/" + t)),
)
@settings(max_examples=300, deadline=None)
def test_path_allowed_means_an_entry_covers_the_path(rest, paths):
    covered = any(
        rest == p or (p.endswith("/") and (rest.startswith(p) or rest == p[:-1])) for p in paths
    )
    assert path_allowed(rest, tuple(paths)) is covered


def test_upstream_url_joins_by_string():
    base = "https://node.example/prefix"
    assert upstream_url(base, Route("code", "/v1/x", "")) == "https://node.example/prefix/v1/x"
    assert upstream_url(base, Route("code", "/", "")) == "https://node.example/prefix/"
    assert upstream_url(base, Route("code", "/v1/x", "a=1&b")) == (
        "https://node.example/prefix/v1/x?a=1&b"
    )


@given(st.text(alphabet="abc@:.%2F/?#", max_size=30))
@settings(max_examples=200, deadline=None)
def test_upstream_url_never_changes_the_host(rest):
    r = route("/api/heavy/code/v1/" + rest)
    if isinstance(r, Route):
        parts = urlsplit(upstream_url("https://node.example:8443/base", r))
        assert (parts.scheme, parts.hostname, parts.port) == ("https", "node.example", 8443)
        assert parts.path.startswith("/base/v1/")


def test_route_table():
    pools = {"code": Pool("code", (3, 4), (1, 2)), "embed": Pool("embed", (6,), ())}
    assert route_table(pools) == {
        "code": {"pair": [3, 4], "fallback": [1, 2]},
        "embed": {"pair": [6], "fallback": []},
    }


# ---- strip_key_params: a client key in the query never reaches a node --------------------

KEYS = ("client-key-0123456789", "other-key")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ""),
        ("a=1", "a=1"),
        ("key=client-key-0123456789", ""),
        ("api_key=other-key&stream=true", "stream=true"),
        ("a=1&k=client-key-0123456789&b=2", "a=1&b=2"),
        ("a=1&k=other-key&k2=client-key-0123456789", "a=1"),
        ("client-key-0123456789", ""),  # the key alone, no name
        ("k=client%2Dkey%2D0123456789", ""),  # percent-encoded
        ("k=other+key", "k=other+key"),  # "+" is a space: "other key" is not a key
        ("k=client-key-012345678", "k=client-key-012345678"),  # a prefix is not the key
        ("k=client-key-01234567890", "k=client-key-01234567890"),
        ("k=", "k="),
        ("=client-key-0123456789", ""),
        ("a=%20x&&b=%zz", "a=%20x&&b=%zz"),  # others keep their exact bytes, even odd ones
        ("client-key-0123456789=1", "client-key-0123456789=1"),  # a name is not a value
    ],
)
def test_strip_key_params(query, expected):
    assert strip_key_params(query, KEYS) == expected


def test_plus_as_space_is_also_compared():
    assert strip_key_params("k=my+key&x=1", ("my key",)) == "x=1"


def test_no_keys_keeps_the_query():
    assert strip_key_params("k=client-key-0123456789", ()) == "k=client-key-0123456789"
    assert strip_key_params("k=", ("",)) == "k="


key_text = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20)
param = st.tuples(st.text(st.characters(min_codepoint=97, max_codepoint=122), max_size=5), key_text)


@given(st.lists(param, max_size=6), st.lists(key_text, min_size=1, max_size=3), st.data())
@settings(max_examples=300, deadline=None)
def test_no_key_survives_in_any_encoding(params, keys, data):
    """Whatever the mix and encoding, no value equal to a key is left, and every other
    parameter is kept exactly, in order. (A value counts as a key when any reading of it is
    one: as sent, percent-decoded, or with "+" as a space.)"""
    parts = []
    expect = []
    for name, value in params:
        is_key = data.draw(st.booleans())
        value = data.draw(st.sampled_from(keys)) if is_key else value
        enc = data.draw(st.sampled_from([quote, quote_plus]))
        part = f"{name}={enc(value, safe='')}"
        parts.append(part)
        raw = part.partition("=")[2]
        if not {raw, unquote(raw), unquote_plus(raw)} & set(keys):
            expect.append(part)
        else:
            assert value in keys or raw in keys or unquote(raw) in keys
    assert strip_key_params("&".join(parts), keys) == "&".join(expect)


def test_parse_route_strips_client_keys_from_the_query():
    got = parse_route("GET", "/api/heavy/code/v1/models", "a=1&key=other-key", ROLES, keys=KEYS)
    assert got == Route("code", "/v1/models", "a=1")
    assert route("/api/heavy/code/v1/models", "a=1&key=other-key").query == "a=1&key=other-key"
