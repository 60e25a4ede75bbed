"""heady_shared: the facts the Worker, the CLI and the node package share — route table and
served roles, the endpoint verdict, the failure rules, vLLM metrics and .dev.vars."""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heady_shared.devvars import DevVarsError, parse_dev_vars
from heady_shared.endpoints import MAX_URL_LENGTH, Endpoint, parse_endpoint
from heady_shared.failures import (
    EXPLAIN,
    HEAD_FIELDS,
    NO_RESPONSE_EXPLAIN,
    RULES,
    connection_error_kind,
    match,
)
from heady_shared.metrics import MAX_LOAD, RUNNING, WAITING, gauge, parse_metrics, queue_depth
from heady_shared.routes import (
    DEFAULT_FALLBACK,
    DEFAULT_POOLS,
    DEFAULT_ROUTES,
    NODE_COUNT,
    NODE_NUMBERS,
    Pool,
    endpoint_key,
    nodes_for_role,
    parse_routes,
    role_of,
    roles_served_by,
    valid_role_name,
)
from heady_shared.schedule import UNKNOWN_PERIOD_S, cron_period_s

# ---- nodes, roles and the route table ---------------------------------------------------


def test_node_numbering():
    assert NODE_COUNT == 8
    assert NODE_NUMBERS == (1, 2, 3, 4, 5, 6, 7, 8)
    assert [endpoint_key(n) for n in (1, 8)] == ["COLAB_ENDPOINT_1", "COLAB_ENDPOINT_8"]


def test_default_pools_are_what_an_unset_routes_var_gives():
    pools, errors = parse_routes(None)
    assert errors == [] and pools == dict(DEFAULT_POOLS)
    assert {r: p.pair for r, p in DEFAULT_POOLS.items()} == DEFAULT_ROUTES


def test_pool_chain_is_pair_then_fallback_each_node_once():
    assert Pool("code", (3, 4), (1, 2)).chain == (3, 4, 1, 2)
    assert Pool("reasoning", (1, 2), (1, 2)).chain == (1, 2)
    assert Pool("r", (2, 5), (5, 8, 2)).chain == (2, 5, 8)
    assert Pool("solo", (6,), ()).chain == (6,)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("code", True),
        ("x-1", True),
        ("a" * 32, True),
        ("a" * 33, False),
        ("", False),
        ("Code", False),
        ("co de", False),
        ("co_de", False),
        ("cöde", False),
        ("٣", False),  # a digit, but not an ASCII one
        (3, False),
        (None, False),
    ],
)
def test_valid_role_name(name, ok):
    assert valid_role_name(name) is ok


@pytest.mark.parametrize(
    ("node", "roles"),
    [
        (1, ("reasoning", "code", "vision", "batch")),  # its own pair and every fallback
        (2, ("reasoning", "code", "vision", "batch")),
        (3, ("code",)),
        (4, ("code",)),
        (5, ("vision",)),
        (6, ("vision",)),
        (7, ("batch",)),
        (8, ("batch",)),
    ],
)
def test_roles_served_by_default_routes(node, roles):
    assert roles_served_by(node) == roles


REMAPPED = '{"roles": {"chat": [2, 5], "embed": [6]}, "fallback": [8]}'


@pytest.mark.parametrize(
    ("node", "roles", "own"),
    [
        (2, ("chat",), "chat"),
        (5, ("chat",), "chat"),
        (6, ("embed",), "embed"),
        (8, ("chat", "embed"), None),  # fallback only: serves both, owns neither
        (1, (), None),  # outside every pair and chain: serves nothing
        (3, (), None),
        (4, (), None),
        (7, (), None),
    ],
)
def test_roles_served_by_remapped_routes(node, roles, own):
    pools, errors = parse_routes(REMAPPED)
    assert errors == []
    assert roles_served_by(node, pools) == roles
    assert role_of(node, pools) == own


def test_empty_fallback_leaves_nodes_1_and_2_their_own_role_only():
    pools, _ = parse_routes('{"fallback": []}')
    assert roles_served_by(1, pools) == ("reasoning",)
    assert roles_served_by(3, pools) == ("code",)


@pytest.mark.parametrize(
    ("node", "role"),
    [(1, "reasoning"), (2, "reasoning"), (3, "code"), (6, "vision"), (8, "batch"), (9, None)],
)
def test_role_of_default(node, role):
    assert role_of(node) == role


def test_nodes_for_role():
    assert nodes_for_role("code") == (3, 4)
    pools, _ = parse_routes(REMAPPED)
    assert nodes_for_role("embed", pools) == (6,)
    with pytest.raises(ValueError, match="unknown role 'code'; expected one of chat, embed"):
        nodes_for_role("code", pools)


node_lists = st.lists(st.sampled_from(NODE_NUMBERS), unique=True, max_size=4)
pool_maps = st.dictionaries(
    st.text(alphabet="abc-", min_size=1, max_size=4), node_lists.filter(bool), min_size=1
).flatmap(
    lambda roles: node_lists.map(
        lambda fb: {r: Pool(r, tuple(pair), tuple(fb)) for r, pair in roles.items()}
    )
)


@given(pool_maps)
@settings(max_examples=200, deadline=None)
def test_served_roles_are_exactly_the_chains_that_reach_the_node(pools):
    for n in NODE_NUMBERS:
        served = roles_served_by(n, pools)
        assert served == tuple(r for r, p in pools.items() if n in p.pair or n in p.fallback)
        own = role_of(n, pools)
        assert (own is None) == all(n not in p.pair for p in pools.values())
        if own is not None:
            assert own in served and n in pools[own].pair


# ---- ROUTES ----------------------------------------------------------------------------


def test_routes_default_when_unset_or_blank():
    for raw in (None, "", "   "):
        pools, errors = parse_routes(raw)
        assert errors == []
        assert {name: p.pair for name, p in pools.items()} == DEFAULT_ROUTES
        assert all(p.fallback == DEFAULT_FALLBACK for p in pools.values())
        assert all(p.role == name for name, p in pools.items())


def test_routes_override_roles_and_fallback():
    pools, errors = parse_routes(REMAPPED)
    assert errors == []
    assert pools == {"chat": Pool("chat", (2, 5), (8,)), "embed": Pool("embed", (6,), (8,))}


def test_routes_roles_only_keeps_default_fallback():
    pools, errors = parse_routes('{"roles": {"x-1": [7, 8]}}')
    assert errors == []
    assert pools == {"x-1": Pool("x-1", (7, 8), DEFAULT_FALLBACK)}


def test_routes_fallback_only_keeps_default_roles():
    pools, errors = parse_routes('{"fallback": [3]}')
    assert errors == []
    assert set(pools) == set(DEFAULT_ROUTES)
    assert all(p.fallback == (3,) for p in pools.values())


def test_routes_empty_fallback_means_none():
    pools, errors = parse_routes('{"fallback": []}')
    assert errors == []
    assert all(p.fallback == () for p in pools.values())


def test_routes_invalid_json_names_position():
    pools, errors = parse_routes('{"roles": {"code": [3, 4]')
    assert pools == {}
    assert len(errors) == 1
    assert errors[0].startswith("ROUTES: not valid JSON")
    assert "at char" in errors[0]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("[1, 2]", 'keys "roles" and/or "fallback"'),
        ('"code"', 'keys "roles" and/or "fallback"'),
        ('{"roles": {"code": [3]}, "extra": 1}', 'keys "roles" and/or "fallback"'),
        ('{"roles": {}}', "ROUTES.roles: expected an object"),
        ('{"roles": [3, 4]}', "ROUTES.roles: expected an object"),
        ('{"roles": {"code": [3, 9]}}', "ROUTES.roles.code: 9 is not a node number 1-8"),
        ('{"roles": {"code": [0]}}', "ROUTES.roles.code: 0 is not a node number"),
        ('{"roles": {"code": [3, 3]}}', "ROUTES.roles.code: node 3 is listed twice"),
        ('{"roles": {"code": []}}', "ROUTES.roles.code: expected a non-empty list"),
        ('{"roles": {"code": 3}}', "ROUTES.roles.code: expected a non-empty list"),
        ('{"roles": {"code": [true]}}', "ROUTES.roles.code: True is not a node number"),
        ('{"roles": {"code": [3.0]}}', "ROUTES.roles.code: 3.0 is not a node number"),
        ('{"roles": {"code": ["3"]}}', "ROUTES.roles.code: '3' is not a node number"),
        ('{"roles": {"Code": [3]}}', "'Code' is not a valid role name"),
        ('{"roles": {"co de": [3]}}', "'co de' is not a valid role name"),
        ('{"roles": {"": [3]}}', "'' is not a valid role name"),
        ('{"roles": {"' + "a" * 33 + '": [3]}}', "is not a valid role name"),
        ('{"fallback": [9]}', "ROUTES.fallback: 9 is not a node number"),
        ('{"fallback": 1}', "ROUTES.fallback: expected a non-empty list"),
        ('{"fallback": [1, 1]}', "ROUTES.fallback: node 1 is listed twice"),
    ],
)
def test_routes_errors_are_clear(raw, fragment):
    pools, errors = parse_routes(raw)
    assert pools == {}
    assert errors, raw
    assert any(fragment in e for e in errors), errors


def test_routes_reports_every_bad_role_at_once():
    _, errors = parse_routes('{"roles": {"a": [9], "b": [1, 1], "ok": [2]}, "fallback": [0]}')
    assert len(errors) == 3
    assert any("ROUTES.roles.a" in e for e in errors)
    assert any("ROUTES.roles.b" in e for e in errors)
    assert any("ROUTES.fallback" in e for e in errors)


def test_routes_role_may_share_nodes_with_fallback():
    pools, errors = parse_routes('{"roles": {"r": [1, 2, 3]}, "fallback": [2, 4]}')
    assert errors == []
    assert pools["r"] == Pool("r", (1, 2, 3), (2, 4))
    assert pools["r"].chain == (1, 2, 3, 4)


@pytest.mark.parametrize(
    "raw",
    [
        '{"roles": {"code": [' + "1" * 5000 + "]}}",  # int too long for int() conversion
        "[" * 100_000,  # nesting deeper than the decoder's recursion limit
    ],
)
def test_routes_pathological_json_is_an_error_not_an_exception(raw):
    pools, errors = parse_routes(raw)
    assert pools == {}
    assert errors and errors[0].startswith("ROUTES")


@given(st.text(max_size=60))
@settings(max_examples=200, deadline=None)
def test_routes_never_raises(raw):
    pools, errors = parse_routes(raw)
    assert bool(pools) != bool(errors)
    assert all(e.startswith("ROUTES") for e in errors)


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


# ---- failure rules -------------------------------------------------------------------------


class Recording(Mapping[str, str | None]):
    """A head whose every field reads as set, remembering which fields a rule asked for."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str | None:
        self.read.add(key)
        return "x"

    def get(self, key, default=None):
        self.read.add(key)
        return "x"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.reason)
def test_every_header_a_rule_reads_is_in_head_fields(rule):
    # the shell fetches only HEAD_FIELDS across the JS boundary: a rule reading anything
    # else would silently never match in the Worker
    for status in (200, 429, 502, 503, 504, 530):
        head = Recording()
        rule.matches(status, head)
        assert head.read <= set(HEAD_FIELDS), (rule.reason, head.read)


def test_rule_reasons_are_unique_and_explained():
    reasons = [r.reason for r in RULES]
    assert len(reasons) == len(set(reasons))
    assert set(EXPLAIN) == set(reasons) | {"refused", "timeout", "error"}
    assert set(NO_RESPONSE_EXPLAIN) == {"refused", "timeout", "error"}
    assert all(text and not text.endswith(".") for text in EXPLAIN.values())


def none(**fields: str) -> dict[str, str | None]:
    return dict.fromkeys(HEAD_FIELDS) | fields


@pytest.mark.parametrize(
    ("status", "head", "reason", "reads_retry_after"),
    [
        (200, none(), None, None),
        (404, none(), None, None),
        (500, none(), None, None),
        (501, none(), None, None),
        (200, none(**{"ngrok-error-code": "ERR_NGROK_3200"}), "tunnel_offline", False),
        (503, none(**{"ngrok-error-code": "ERR_NGROK_8012"}), "tunnel_offline", False),
        (200, none(**{"ngrok-error-code": ""}), None, None),
        (530, none(), "tunnel_down", False),
        (520, none(), "tunnel_down", False),
        (526, none(), "tunnel_down", False),
        (527, none(), None, None),
        (429, none(), "busy", True),
        (503, none(), "busy", True),
        (502, none(), "http_502", True),
        (504, none(), "http_504", True),
        (503, {}, "busy", True),  # fields may be missing altogether
    ],
)
def test_match_table(status, head, reason, reads_retry_after):
    rule = match(status, head)
    if reason is None:
        assert rule is None
    else:
        assert rule is not None and rule.reason == reason
        assert rule.retry_after is reads_retry_after


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("Network connection lost.", "refused"),
        ("connect ECONNREFUSED 127.0.0.1:9", "refused"),
        ("[Errno 111] Connection refused", "refused"),
        ("httpx.ConnectError: All connection attempts failed", "refused"),
        ("internal error; reference = abc", "error"),
        ("DNS lookup failed", "error"),
        ("TLS handshake failure", "error"),
        ("", "error"),
    ],
)
def test_connection_error_kind(message, kind):
    assert connection_error_kind(message) == kind


# ---- vLLM metrics and load --------------------------------------------------------------

VLLM = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 5.0
vllm:num_requests_waiting_total{model_name="m"} 99.0
"""


def test_vllm_metrics_waiting_and_running():
    assert queue_depth(VLLM, "text/plain; version=0.0.4") == 5
    metrics = parse_metrics(VLLM)
    assert gauge(metrics, WAITING) == 5
    assert gauge(metrics, RUNNING) == 3
    assert metrics["vllm:num_requests_waiting_total"] == 99.0
    assert gauge(metrics, "vllm:absent") is None


def test_vllm_metrics_several_label_sets_are_summed():
    body = (
        'vllm:num_requests_waiting{model_name="a",engine="0"} 2.0\n'
        'vllm:num_requests_waiting{model_name="b c",engine="1"} 3.0\n'
    )
    assert queue_depth(body, "text/plain") == 5


@pytest.mark.parametrize(
    ("body", "load"),
    [
        ("vllm:num_requests_waiting 7\n", 7),
        ("vllm:num_requests_waiting{} 0.0\n", 0),
        ('vllm:num_requests_waiting{model_name="m"} 1.5e1\n', 15),
        ('vllm:num_requests_waiting{model_name="m"} 4.9\n', 4),
        ('vllm:num_requests_waiting{model_name="m"} 5.0 1700000000000\n', 5),
        ('vllm:num_requests_waiting{model_name="m"}\t6.0\n', 6),
        ("  vllm:num_requests_waiting 3\r\n", 3),  # surrounding whitespace is not a sample
        (f"vllm:num_requests_waiting {MAX_LOAD}\n", MAX_LOAD),
        # an unparseable sample is dropped, the rest still count
        ("vllm:num_requests_waiting 1-2\nvllm:num_requests_waiting 4\n", 4),
    ],
)
def test_vllm_metrics_forms(body, load):
    assert queue_depth(body, None) == load


@pytest.mark.parametrize(
    "body",
    [
        "",
        "vllm:num_requests_running 3.0\n",
        "# vllm:num_requests_waiting 3\n",
        "vllm:num_requests_waiting_total 3\n",
        "vllm:num_requests_waiting -1\n",
        "vllm:num_requests_waiting 1-2\n",
        "vllm:num_requests_waiting NaN\n",
        "vllm:num_requests_waiting +Inf\n",
        "vllm:num_requests_waiting 1e999\n",
        f"vllm:num_requests_waiting {MAX_LOAD + 1}\n",
        "<html>ngrok</html>",
        "OK",
    ],
)
def test_metrics_without_a_usable_waiting_value(body):
    assert queue_depth(body, "text/plain") is None


@pytest.mark.parametrize(
    ("body", "load"),
    [
        ('{"queue_depth": 4}', 4),
        ('{"queue": 2.0}', 2),
        ('{"num_requests_waiting": 0}', 0),
        ('{"waiting": 9, "status": "ok"}', 9),
        ('{"pending": 1}', 1),
        ('{"queue_depth": 4, "pending": 1}', 4),  # first key wins
        ('{"queue_depth": true, "waiting": 3}', 3),  # bools are not numbers
        ('{"queue_depth": "4", "waiting": 3}', 3),
        ('{"queue_depth": null, "waiting": 3}', 3),
        ('  {"queue": 6}', 6),
    ],
)
def test_json_load(body, load):
    assert queue_depth(body, "application/json") == load


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        ('{"status": "ok"}', "application/json"),
        ("[1, 2]", "application/json"),
        ("{not json", "application/json"),
        ("{not json", None),
        ('{"queue": NaN}', "application/json"),
        ('{"queue": Infinity}', "application/json"),
        ('{"queue": 1e999}', "application/json"),
        ('{"queue": null}', "application/json"),
        # the first number decides: an absurd one means "no load", not "look further"
        ('{"queue_depth": -1, "pending": 1}', "application/json"),
        (f'{{"queue": {MAX_LOAD + 1}}}', "application/json"),
        ("vllm:num_requests_waiting 3\n", "application/json"),  # says json, is not
    ],
)
def test_json_without_a_usable_load(body, ctype):
    assert queue_depth(body, ctype) is None


def test_json_detected_without_content_type():
    assert queue_depth('{"queue_depth": 3}', None) == 3
    assert queue_depth('{"queue_depth": 3}', "text/plain") == 3


def test_deeply_nested_json_is_no_load():
    assert queue_depth("{" * 100_000, "application/json") is None
    assert queue_depth('{"a":' * 100_000, None) is None


@given(
    st.text(max_size=200), st.one_of(st.none(), st.sampled_from(["application/json", "text/plain"]))
)
@settings(max_examples=300, deadline=None)
def test_queue_depth_never_raises(body, ctype):
    load = queue_depth(body, ctype)
    assert load is None or (isinstance(load, int) and 0 <= load <= MAX_LOAD)


@given(st.lists(st.floats(0, 10**8), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_queue_depth_sums_label_sets(values):
    body = "".join(
        f'vllm:num_requests_waiting{{model_name="m{i}"}} {v!r}\n' for i, v in enumerate(values)
    )
    assert queue_depth(body, "text/plain; version=0.0.4") == int(sum(values))


# ---- cron schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "period"),
    [
        ("*/5 * * * *", 300.0),
        ("*/1 * * * *", 60.0),
        ("*/30 * * * *", 1800.0),
        ("*/60 * * * *", 3600.0),
        ("* * * * *", 60.0),
        ("  */10   *  *  *  *  ", 600.0),
        ("5 * * * *", 3600.0),
        ("0 * * * *", 3600.0),
        # anything else counts as a day: probing healthy nodes too often, never too rarely
        ("*/0 * * * *", UNKNOWN_PERIOD_S),
        ("*/61 * * * *", UNKNOWN_PERIOD_S),
        ("*/x * * * *", UNKNOWN_PERIOD_S),
        ("*/5 1 * * *", UNKNOWN_PERIOD_S),
        ("*/5 * * *", UNKNOWN_PERIOD_S),
        ("0,30 * * * *", UNKNOWN_PERIOD_S),
        ("60 * * * *", UNKNOWN_PERIOD_S),
        ("", UNKNOWN_PERIOD_S),
        (None, UNKNOWN_PERIOD_S),
        ("garbage", UNKNOWN_PERIOD_S),
    ],
)
def test_cron_period(cron, period):
    assert UNKNOWN_PERIOD_S == 86400.0
    assert cron_period_s(cron) == period


# ---- .dev.vars -------------------------------------------------------------------------------
# Expected values are what wrangler reads (dotenv 16.3.1's parse, bundled in wrangler 4.164.0:
# node_modules/wrangler/wrangler-dist/cli.js), checked by running it on each line.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1", {"A": "1"}),
        ("export A=1", {"A": "1"}),
        ("  A = 1  ", {"A": "1"}),
        ("A=", {"A": ""}),
        ('A=""', {"A": ""}),
        ('A="x y"', {"A": "x y"}),
        ("A='x y'", {"A": "x y"}),
        ('A = "q" ', {"A": "q"}),
        ("A=x # note", {"A": "x"}),
        ('A="a\\nb"', {"A": "a\nb"}),  # \n expands in double quotes ...
        ("A='a\\nb'", {"A": "a\\nb"}),  # ... and only there
        ('A="unterminated', {"A": '"unterminated'}),
        ('A="x"y"', {"A": 'x"y'}),
        ("A=x\nA=y", {"A": "y"}),  # the later line wins
        ("# comment\n\n  # indented\nB=2\n", {"B": "2"}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        (
            "COLAB_ENDPOINT_1=https://a.ngrok-free.app\nNODE_TOKEN=t0k",
            {"COLAB_ENDPOINT_1": "https://a.ngrok-free.app", "NODE_TOKEN": "t0k"},
        ),
    ],
)
def test_dev_vars_lines(text, expected):
    assert parse_dev_vars(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a quoted value followed by a comment: wrangler reads the value without quotes, so
        # `COLAB_ENDPOINT_1="https://..."  # node 1` is a valid endpoint under `wrangler dev`
        ('A="v" # note', {"A": "v"}),
        ("A='v' # note", {"A": "v"}),
        (
            'COLAB_ENDPOINT_1="https://a.example"  # node 1',
            {"COLAB_ENDPOINT_1": "https://a.example"},
        ),
    ],
)
def test_dev_vars_quoted_value_with_a_comment(text, expected):
    assert parse_dev_vars(text) == expected


@pytest.mark.parametrize("line", ["not a setting", "1A=x", "A B=x", "=x", "NODE_TOKEN"])
def test_dev_vars_bad_line_names_the_line_and_quotes_only_its_start(line):
    text = "A=1\n" + line + "  \n"
    with pytest.raises(DevVarsError, match=r"\.dev\.vars line 2 is not KEY=value") as err:
        parse_dev_vars(text)
    assert repr(line.strip()[:12]) in str(err.value)


def test_dev_vars_error_does_not_quote_a_pasted_secret_url():
    with pytest.raises(DevVarsError) as err:
        parse_dev_vars("https://secret-tunnel-name.ngrok-free.app")
    assert "secret-tunnel-name" not in str(err.value)


# ---- the node's model id from vLLM's metrics labels -------------------------------------

from heady_shared.metrics import served_model  # noqa: E402


@pytest.mark.parametrize(
    ("text", "model"),
    [
        ('vllm:num_requests_waiting{model_name="Qwen/Qwen2.5-7B"} 0.0\n', "Qwen/Qwen2.5-7B"),
        (
            '# HELP x\nvllm:num_requests_running{engine="0",model_name="org/m-7b-awq"} 1\n',
            "org/m-7b-awq",
        ),
        ('other:metric{model_name="x"} 1\n', None),  # only vLLM's own metrics say it
        ("vllm:num_requests_waiting 3\n", None),
        ('vllm:num_requests_waiting{model_name=""} 3\n', None),
        ('vllm:num_requests_waiting{model_name="a b"} 3\n', None),
        ('vllm:num_requests_waiting{model_name="' + "x" * 129 + '"} 3\n', None),
        ("", None),
    ],
)
def test_served_model_comes_from_vllm_metric_labels(text: str, model: str | None) -> None:
    assert served_model(text) == model
