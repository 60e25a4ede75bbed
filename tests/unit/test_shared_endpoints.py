"""heady_shared.endpoints: the one verdict on a COLAB_ENDPOINT_n value."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heady_shared.endpoints import MAX_URL_LENGTH, Endpoint, is_quick_tunnel, parse_endpoint

# ---- endpoint verdict --------------------------------------------------------------------
# The one verdict on a COLAB_ENDPOINT_n value: the gateway's config and `heady probe` read it.


@pytest.mark.parametrize(
    ("raw", "base"),
    [
        # ngrok (free and paid domains)
        ("https://abc-12-34.ngrok-free.app", "https://abc-12-34.ngrok-free.app"),
        ("https://abc.ngrok-free.app/", "https://abc.ngrok-free.app"),
        ("https://abc.ngrok-free.app///", "https://abc.ngrok-free.app"),
        ("https://ABC.NGROK-FREE.APP/", "https://abc.ngrok-free.app"),
        ("https://heady-node-3.ngrok.app", "https://heady-node-3.ngrok.app"),
        ("https://abc.ngrok.io", "https://abc.ngrok.io"),
        # named Cloudflare tunnels: a hostname in the operator's own zone
        ("https://node1.heady.example.com", "https://node1.heady.example.com"),
        ("https://gpu-3.example.org/", "https://gpu-3.example.org"),
        ("  https://abc.example/  \n", "https://abc.example"),
        # a path prefix (a reverse proxy in front of vLLM) is kept, normalised
        ("https://abc.example/prefix", "https://abc.example/prefix"),
        ("https://abc.example/a/b/", "https://abc.example/a/b"),
        ("https://abc.example//a//b", "https://abc.example/a/b"),
        ("HTTPS://ABC.Example/Path", "https://abc.example/Path"),
        ("https://h.example:65535", "https://h.example:65535"),
        ("https://h.example:1", "https://h.example:1"),
        ("https://1.2.3.4:8443", "https://1.2.3.4:8443"),
        ("https://trycloudflare.com", "https://trycloudflare.com"),  # not a quick tunnel
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),  # an IDN, encoded
        ("https://Node-1.Example.COM", "https://node-1.example.com"),
        ("https://" + "a" * 63 + ".example", "https://" + "a" * 63 + ".example"),
        # loopback: plain http allowed (the simulated fleet, an SSH port forward)
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("http://localhost:8000/v", "http://localhost:8000/v"),
        ("http://LOCALHOST:8000", "http://localhost:8000"),
        ("http://[::1]:8080/v", "http://[::1]:8080/v"),
        ("http://[::1]", "http://[::1]"),
        ("https://localhost", "https://localhost"),
    ],
)
def test_endpoint_valid_shapes_are_normalised(raw, base):
    assert parse_endpoint(raw) == Endpoint("configured", base, None)


@pytest.mark.parametrize("raw", [None, "", "   ", "\n\t"])
def test_endpoint_missing_is_unconfigured(raw):
    assert parse_endpoint(raw) == Endpoint("unconfigured", None, "secret not set")


INVALID = [
    # (raw, words in the reason)
    ("https://abc.example/" + "a" * MAX_URL_LENGTH, "too long"),
    ("https://abc .example", "spaces"),
    ("https://abc.example/a b", "spaces"),
    ("https://abc.example/\x00", "spaces"),
    ("https://abc.example/a\tb", "spaces"),
    ('https://abc.example/"x"', "not allowed"),
    ("https://abc.example/a\\b", "not allowed"),
    ("https://abc.example/{x}", "not allowed"),
    ("https://abc.example/a|b", "not allowed"),
    ("https://héllo.example", "not allowed"),  # ASCII only (IDNs go in as xn--)
    ("https://abc.example/é", "not allowed"),
    ("abc.example", "needs a scheme"),
    ("//abc.example", "needs a scheme"),
    ("ftp://abc.example", "scheme 'ftp' is not https"),
    ("ws://abc.example", "scheme"),
    ("https://abc.example?x=1", "query"),
    ("https://abc.example/p?x=1", "query"),
    ("https://abc.example/#frag", "query or fragment"),
    ("https://user:pw@abc.example", "credentials"),
    ("https://user@abc.example/x", "credentials"),
    ("https://", "no valid host"),
    ("https:///path", "no valid host"),
    ("https://:8080", "no valid host"),
    ("https://.example", "no valid host"),
    ("https://example.", "no valid host"),
    # host names fetch() can reach: [a-z0-9-] labels of 1..63, no '-' at either end
    ("https://a..b.example", "no valid host"),
    ("https://-x.example", "no valid host"),
    ("https://x-.example", "no valid host"),
    ("https://a_b.example", "no valid host"),
    ("https://a!b.example", "no valid host"),
    ("https://" + "a" * 64 + ".example", "no valid host"),
    ("https://[]", "no valid host"),
    ("https://[::g]", "no valid host"),
    ("https://[fe80::1%25eth0]", "no valid host"),
    ("https://abc.example:0", "port"),
    ("https://abc.example:65536", "port"),
    ("https://abc.example:99999", "port"),
    ("https://abc.example:", "port"),
    ("https://abc.example:http", "port"),
    ("https://abc.example:-1", "port"),
    ("https://[::1]:x", "port"),
    ("https://abc.example/a%20b", "percent-encoded"),
    ("https://abc.example/%2e%2e/x", "percent-encoded"),
    ("https://abc.example/a/../b", "'..'"),
    ("https://abc.example/./b", "'.'"),
    # plain http only on loopback: anything else is a tunnel, and tunnels give https
    ("http://abc.ngrok-free.app", "plain http"),
    ("http://node1.example.com:8000", "plain http"),
    ("http://10.0.0.7:8000", "plain http"),
    ("http://127.0.0.2:8000", "plain http"),
    ("http://localhost.example", "plain http"),
    # a host without a domain is a typo or an internal name the edge cannot reach
    ("https://node", "no domain"),
    ("https://gpu-3:8443", "no domain"),
    # quick tunnels cannot carry SSE
    ("https://word-word-word.trycloudflare.com", "quick tunnels"),
    ("https://X.TryCloudflare.com/", "quick tunnels"),
]


@pytest.mark.parametrize(("raw", "words"), INVALID)
def test_endpoint_invalid_classes_have_a_reason(raw, words):
    got = parse_endpoint(raw)
    assert got.state == "invalid" and got.base_url is None
    assert got.reason and words in got.reason


@pytest.mark.parametrize(
    "raw",
    [
        # WHATWG URL (what workerd's fetch parses) forbids ':', '[', ']' inside a host name
        # (url.spec.whatwg.org/#forbidden-host-code-point): `new URL(...)` throws on these,
        # so a node configured with one fails every request as "error".
        "https://h.example:80:90",
        "https://a:b.example",
        "https://a[b].example",
        "https://a]b.example:8443",
        # '%' in a host is percent-decoded by the URL parser: fetch would reach aa.example,
        # not the host the verdict names.
        "https://a%41.example",
    ],
)
def test_endpoint_hosts_the_fetch_api_cannot_use_are_invalid(raw):
    assert parse_endpoint(raw).state == "invalid"


@pytest.mark.parametrize(
    "raw",
    [
        "https://user:hunter2@abc.example",
        "ftp://hunter2.example",
        "https://hunter2.example?q",
        "http://hunter2.example.com",
        "https://hunter2.trycloudflare.com",
        # a scheme-less URL whose query holds a URL: the part before '://' is the secret host
        "hunter2.ngrok-free.app/go?to=https://x.example",
    ],
)
def test_endpoint_reason_never_quotes_the_secret(raw):
    assert "hunter2" not in parse_endpoint(raw).reason


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_endpoint_never_raises_and_is_consistent(raw):
    got = parse_endpoint(raw)
    if got.state == "configured":
        base = got.base_url
        assert got.reason is None and base is not None
        assert base.startswith(("http://", "https://"))
        assert not base.endswith("/")
        assert not any(c in base for c in "?#@% \\")
        assert base.isascii()
        # normalising again is a fixed point
        assert parse_endpoint(base) == got
    else:
        assert got.base_url is None and got.reason


url_chars = st.sampled_from(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")


@given(
    st.sampled_from(["http", "https", "HTTPS", "ftp"]),
    st.text(url_chars, max_size=30),
)
@settings(max_examples=400, deadline=None)
def test_configured_endpoints_keep_the_stated_rules(scheme, rest):
    got = parse_endpoint(f"{scheme}://{rest}")
    if got.state != "configured":
        return
    scheme_out, _, after = got.base_url.partition("://")
    authority, _, path = after.partition("/")
    host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    loopback = host in ("localhost", "127.0.0.1", "[::1]")
    if not host.startswith("["):
        labels = host.split(".")
        assert all(0 < len(label) <= 63 and label.strip("-") == label for label in labels)
        assert all(c in string.ascii_lowercase + string.digits + "-" for c in "".join(labels))
    assert scheme_out in ("http", "https")
    assert scheme_out == "https" or loopback
    assert loopback or "." in host
    assert not host.endswith(".trycloudflare.com")
    assert "%" not in path and "." not in path.split("/") and ".." not in path.split("/")


@pytest.mark.parametrize(
    ("host", "quick"),
    [
        ("word-word-word.trycloudflare.com", True),
        ("X.TryCloudflare.COM", True),
        ("trycloudflare.com", False),  # the bare domain is no quick tunnel
        ("nottrycloudflare.com", False),
        ("node3.example.com", False),
    ],
)
def test_quick_tunnel_rule(host, quick):
    # The one rule: the gateway's verdict and the node's tunnel (heady_node.tunnel) both use it.
    assert is_quick_tunnel(host) is quick
