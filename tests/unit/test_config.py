"""config.py: the Worker's vars and secrets -> GatewayConfig (endpoint verdicts and ROUTES
come from heady_shared, tested in test_shared_*.py; every number's declared bounds, in
test_settings.py; here: the defaults, how load_config uses the shared verdicts, keys, flags,
tokens, paths, the cooldown cap and the per-role time-outs). The fleet's env: conftest.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import load_config
from heady_shared.endpoints import parse_endpoint
from heady_shared.routes import DEFAULT_POOLS, NODE_NUMBERS, Pool, endpoint_key, parse_routes
from settings import CONFIG_KEYS

# ---- load_config -----------------------------------------------------------------------


def test_defaults(fleet):
    cfg = fleet
    assert cfg.problems == () and cfg.fatal == ()
    assert [n.number for n in cfg.nodes] == list(NODE_NUMBERS)
    assert all(n.usable and n.config == "configured" for n in cfg.nodes)
    assert cfg.node(3).base_url == "https://node3.example"
    assert cfg.roles == ("reasoning", "code", "vision", "batch")
    assert cfg.max_attempts == 4
    assert cfg.max_body_bytes == 10 * 1024 * 1024
    assert cfg.timeouts.attempt_s == 120.0
    assert cfg.timeouts.deadline_s == 900.0
    assert cfg.timeouts.attempt_for("batch") == 100.0
    assert cfg.timeouts.attempt_for("code") == 120.0
    assert cfg.health.cooldown_base_s == 30.0
    assert cfg.health.cooldown_max_s == 600.0
    assert cfg.health.stable_after_s == 1800.0
    assert cfg.health.refresh_s == 30.0
    assert cfg.health.min_write_interval_s == 120.0
    assert cfg.health.probe_path == "/health"
    assert cfg.health.metrics_path == "/metrics"
    assert cfg.health.probe_timeout_s == 5.0
    assert cfg.health.probe_up_every_s == 1800.0
    assert cfg.health.kv_timeout_s == 1.0
    assert cfg.timeouts.upload_s == 60.0
    assert cfg.upstream_paths == ("/v1/",)
    assert cfg.pools == dict(DEFAULT_POOLS)
    assert cfg.cors_origins == ("*",)
    assert cfg.auth_disabled is False
    assert cfg.node_token is None


def test_empty_env_never_raises_and_reports_nothing_fatal():
    cfg = load_config({})
    assert all(n.config == "unconfigured" and not n.usable for n in cfg.nodes)
    assert cfg.api_keys == ()
    assert cfg.fatal == ()
    # unconfigured nodes are normal (not every slot is used), not a problem
    assert cfg.problems == ()


def test_invalid_endpoint_is_a_problem_without_the_url(fleet_env):
    cfg = load_config(fleet_env(COLAB_ENDPOINT_3="https://user:topsecret@tunnel.example"))
    node = cfg.node(3)
    assert node.config == "invalid" and not node.usable and node.base_url is None
    assert "credentials" in node.reason
    assert any(p.startswith("COLAB_ENDPOINT_3:") for p in cfg.problems)
    assert "topsecret" not in repr(cfg.problems)
    assert cfg.fatal == ()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("http://node3.example", "plain http"),
        ("https://abc.trycloudflare.com", "quick tunnels"),
        ("https://node3", "no domain"),
        ("https://node3.example/a%20b", "percent-encoded"),
    ],
)
def test_endpoints_the_shared_verdict_rejects_are_invalid_nodes(raw, reason, fleet_env):
    cfg = load_config(fleet_env(COLAB_ENDPOINT_3=raw))
    assert not cfg.node(3).usable and reason in cfg.node(3).reason
    assert cfg.problems == (f"COLAB_ENDPOINT_3: {cfg.node(3).reason}",)


def test_loopback_http_is_a_usable_node(fleet_env):
    cfg = load_config(fleet_env(COLAB_ENDPOINT_3="http://127.0.0.1:8003/"))
    assert cfg.node(3).usable and cfg.node(3).base_url == "http://127.0.0.1:8003"
    assert cfg.problems == ()


endpoint_values = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "https://a.ngrok-free.app",
            "http://localhost:8000",
            "http://a.example",
            "https://x.trycloudflare.com",
            "ftp://a.example",
            "  ",
        ]
    ),
    st.text(max_size=30),
)


@given(st.fixed_dictionaries({endpoint_key(n): endpoint_values for n in NODE_NUMBERS}))
@settings(max_examples=100, deadline=None)
def test_every_node_carries_the_shared_endpoint_verdict(env):
    # one verdict: the gateway's nodes say exactly what heady_shared.endpoints says
    cfg = load_config(env)
    for node in cfg.nodes:
        ep = parse_endpoint(env[endpoint_key(node.number)])
        assert (node.config, node.base_url, node.reason) == (ep.state, ep.base_url, ep.reason)
        assert node.usable == (ep.state == "configured")
    invalid = [n for n in cfg.nodes if n.config == "invalid"]
    assert cfg.problems == tuple(f"{endpoint_key(n.number)}: {n.reason}" for n in invalid)


def test_routes_var_sets_the_pools(fleet_env):
    raw = '{"roles": {"chat": [2, 5], "embed": [6]}, "fallback": [8]}'
    cfg = load_config(fleet_env(ROUTES=raw))
    assert cfg.pools == parse_routes(raw)[0]
    assert cfg.roles == ("chat", "embed")
    assert cfg.pools["chat"] == Pool("chat", (2, 5), (8,))
    assert cfg.fatal == ()


def test_bad_routes_are_fatal(fleet_env):
    cfg = load_config(fleet_env(ROUTES='{"roles": {"code": [3, 9]}}'))
    assert cfg.pools == {}
    assert cfg.roles == ()
    assert len(cfg.fatal) == 1 and "ROUTES.roles.code" in cfg.fatal[0] and "9" in cfg.fatal[0]


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        ("a", ("a",)),
        ("a,b", ("a", "b")),
        (" a , b ,, ", ("a", "b")),
        ("a\nb\n", ("a", "b")),
        ("a,\n b,c", ("a", "b", "c")),
        ("", ()),
        (" , \n ", ()),
    ],
)
def test_api_keys_parsing(raw, keys, fleet_env):
    assert load_config(fleet_env(GATEWAY_API_KEYS=raw)).api_keys == keys


def test_api_keys_unset(fleet_env):
    env = fleet_env(GATEWAY_API_KEYS="k1")
    del env["GATEWAY_API_KEYS"]
    assert load_config(env).api_keys == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("", False),
        ("enabled", False),
        (None, False),
    ],
)
def test_auth_disabled_flag(raw, expected, fleet_env):
    assert load_config(fleet_env(AUTH_DISABLED=raw)).auth_disabled is expected


@pytest.mark.parametrize(
    ("raw", "token"),
    [
        ("tok-123_ABC.~", "tok-123_ABC.~"),
        ("  tok \n", "tok"),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_node_token_accepted(raw, token, fleet_env):
    cfg = load_config(fleet_env(NODE_TOKEN=raw))
    assert cfg.node_token == token
    assert not any("NODE_TOKEN" in p for p in cfg.problems)


@pytest.mark.parametrize("raw", ["to\nken", "to\rken", "tök", "tok\x00en", "tok\x7f", "tok€"])
def test_node_token_with_bad_chars_is_dropped_and_reported(raw, fleet_env):
    cfg = load_config(fleet_env(NODE_TOKEN=raw))
    assert cfg.node_token is None
    problems = [p for p in cfg.problems if p.startswith("NODE_TOKEN")]
    assert len(problems) == 1
    assert raw.strip() not in problems[0]  # the secret is not quoted


def test_integer_settings_are_ints(fleet_env):
    cfg = load_config(fleet_env(MAX_ATTEMPTS="2.9", MAX_BODY_BYTES="1024.5"))
    assert cfg.max_attempts == 2 and isinstance(cfg.max_attempts, int)
    assert cfg.max_body_bytes == 1024 and isinstance(cfg.max_body_bytes, int)


def test_cooldown_cap_below_base_uses_base(fleet_env):
    cfg = load_config(fleet_env(COOLDOWN_BASE_S="100", COOLDOWN_MAX_S="50"))
    assert cfg.health.cooldown_base_s == 100 and cfg.health.cooldown_max_s == 100
    assert any("COOLDOWN_MAX_S is below COOLDOWN_BASE_S" in p for p in cfg.problems)


def test_role_timeouts(fleet_env):
    cfg = load_config(fleet_env(ROLE_TIMEOUTS_S='{"code": 30, "batch": 1200.5}'))
    assert cfg.timeouts.per_role_attempt_s == {"code": 30.0, "batch": 1200.5}
    assert cfg.timeouts.attempt_for("code") == 30.0
    assert cfg.timeouts.attempt_for("vision") == 120.0
    assert cfg.problems == ()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("{", "ROLE_TIMEOUTS_S: not valid JSON"),
        ("[1]", "ROLE_TIMEOUTS_S: expected an object"),
    ],
)
def test_role_timeouts_bad_shape_uses_defaults(raw, fragment, fleet_env):
    cfg = load_config(fleet_env(ROLE_TIMEOUTS_S=raw))
    assert cfg.timeouts.per_role_attempt_s == {"batch": 100.0}
    assert any(fragment in p for p in cfg.problems)


@pytest.mark.parametrize("value", ["0", "3601", "true", '"30"', "null", "-1"])
def test_role_timeouts_bad_values_are_ignored(value, fleet_env):
    cfg = load_config(fleet_env(ROLE_TIMEOUTS_S='{"code": ' + value + ', "vision": 10}'))
    assert cfg.timeouts.per_role_attempt_s == {"vision": 10.0}
    assert cfg.problems == ("ROLE_TIMEOUTS_S.code: expected seconds 1..3600; ignored",)


@pytest.mark.parametrize(
    ("raw", "path", "problem"),
    [
        (None, "/health", False),
        ("/healthz", "/healthz", False),
        (" /v1/models ", "/v1/models", False),
        ("", "/health", False),
        ("   ", "/health", False),  # blank is unset, as for every other setting
        ("health", "/health", True),
        ("//evil.example/x", "/health", True),
        ("/a/../b", "/health", True),
        ("https://other.example/health", "/health", True),
    ],
)
def test_health_path(raw, path, problem, fleet_env):
    cfg = load_config(fleet_env(HEALTH_PATH=raw))
    assert cfg.health.probe_path == path
    assert any(p.startswith("HEALTH_PATH") for p in cfg.problems) is problem


@pytest.mark.parametrize(
    ("raw", "path", "problem"),
    [
        (None, "/metrics", False),
        ("", None, False),
        ("   ", None, False),
        ("/stats", "/stats", False),
        ("metrics", "/metrics", True),
        ("/../metrics", "/metrics", True),
        ("//evil.example/metrics", "/metrics", True),  # the same rule as HEALTH_PATH
    ],
)
def test_metrics_path(raw, path, problem, fleet_env):
    cfg = load_config(fleet_env(METRICS_PATH=raw))
    assert cfg.health.metrics_path == path
    assert any(p.startswith("METRICS_PATH") for p in cfg.problems) is problem


@pytest.mark.parametrize(
    ("raw", "origins"),
    [
        (None, ("*",)),
        ("", ("*",)),
        (" , ", ("*",)),
        ("*", ("*",)),
        ("https://a.example", ("https://a.example",)),
        ("https://a.example/, https://b.example", ("https://a.example", "https://b.example")),
    ],
)
def test_cors_origins(raw, origins, fleet_env):
    assert load_config(fleet_env(CORS_ORIGINS=raw)).cors_origins == origins


@pytest.mark.parametrize(
    ("raw", "paths", "problems"),
    [
        (None, ("/v1/",), 0),
        ("", ("/v1/",), 0),
        ("  ", ("/v1/",), 0),
        ("/v1/", ("/v1/",), 0),
        (" /v1/ , /tokenize ", ("/v1/", "/tokenize"), 0),
        ("/v1/,,/health", ("/v1/", "/health"), 0),
        ("/v1/, v2/", ("/v1/",), 1),  # not absolute
        ("/v1/, /", ("/v1/",), 1),  # everything: not a prefix
        ("/v1/, /a//b", ("/v1/",), 1),
        ("/v1/, /a/../b", ("/v1/",), 1),
        ("/v1/, /a/./b", ("/v1/",), 1),
        ("/v1/, /a?b", ("/v1/",), 1),
        ("/v1/, /a%2fb", ("/v1/",), 1),
        ("/v1/, /é", ("/v1/",), 1),
        ("/v1/, /a b", ("/v1/",), 1),
        ("nope", ("/v1/",), 2),  # ignored, then nothing usable is left
        (",,", ("/v1/",), 1),
    ],
)
def test_upstream_paths(raw, paths, problems, fleet_env):
    cfg = load_config(fleet_env(UPSTREAM_PATHS=raw))
    assert cfg.upstream_paths == paths
    found = [p for p in cfg.problems if p.startswith("UPSTREAM_PATHS")]
    assert len(found) == problems, found
    assert cfg.fatal == ()


def test_upstream_paths_problem_quotes_a_bounded_item(fleet_env):
    cfg = load_config(fleet_env(UPSTREAM_PATHS="/v1/," + "x" * 500))
    (problem,) = cfg.problems
    assert "x" * 40 in problem and "x" * 41 not in problem


def test_config_keys_lists_every_setting():
    assert len(CONFIG_KEYS) == len(set(CONFIG_KEYS))
    for name in ("COLAB_ENDPOINT_1", "COLAB_ENDPOINT_8", "ROUTES", "NODE_TOKEN", "MAX_ATTEMPTS"):
        assert name in CONFIG_KEYS


@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), st.text(max_size=40), max_size=12))
@settings(max_examples=200, deadline=None)
def test_load_config_never_raises_and_values_stay_in_range(env):
    cfg = load_config(env)
    assert 1 <= cfg.max_attempts <= 8
    assert 1 <= cfg.timeouts.attempt_s <= 3600
    assert 1 <= cfg.timeouts.deadline_s <= 7200
    assert 1 <= cfg.health.cooldown_base_s <= cfg.health.cooldown_max_s
    assert 0 <= cfg.max_body_bytes <= 100 * 1024 * 1024
    assert cfg.health.probe_path.startswith("/")
    assert 0.05 <= cfg.health.kv_timeout_s <= 30
    assert 1 <= cfg.timeouts.upload_s <= 3600
    assert cfg.upstream_paths and all(p.startswith("/") for p in cfg.upstream_paths)
    assert len(cfg.nodes) == 8
    assert all(k and k == k.strip() for k in cfg.api_keys)
    if cfg.node_token is not None:
        assert all(0x20 <= ord(c) <= 0x7E for c in cfg.node_token)
    if not cfg.fatal:
        assert cfg.pools


def test_role_timeouts_pathological_json_is_a_problem_not_an_exception(fleet_env):
    cfg = load_config(fleet_env(ROLE_TIMEOUTS_S="[" * 100_000))
    assert cfg.timeouts.per_role_attempt_s == {"batch": 100.0}
    assert any("ROLE_TIMEOUTS_S: not valid JSON" in p for p in cfg.problems)


@pytest.mark.parametrize("n", NODE_NUMBERS)
def test_each_slot_reads_its_own_secret(n, fleet_env):
    env = fleet_env(**{f"COLAB_ENDPOINT_{n}": "https://only-this.example/p/"})
    cfg = load_config(env)
    assert cfg.node(n).number == n
    assert cfg.node(n).base_url == "https://only-this.example/p"
    others = [m for m in NODE_NUMBERS if m != n]
    assert all(cfg.node(m).base_url == f"https://node{m}.example" for m in others)
    bad = load_config(fleet_env(**{f"COLAB_ENDPOINT_{n}": "https://x.example?q=1"}))
    assert [m.number for m in bad.nodes if not m.usable] == [n]
    assert bad.problems == (f"COLAB_ENDPOINT_{n}: URL must not carry a query or fragment",)


def test_stream_settings_defaults_and_bad_values(fleet_env):
    cfg = load_config(fleet_env())
    assert cfg.stream_relay == "native"
    assert cfg.timeouts.stream_idle_s == 60.0
    cfg = load_config(fleet_env(STREAM_RELAY=" Guarded ", STREAM_IDLE_S="0"))
    assert cfg.stream_relay == "guarded" and cfg.timeouts.stream_idle_s == 0.0
    assert cfg.problems == ()
    cfg = load_config(fleet_env(STREAM_RELAY="fast", STREAM_IDLE_S="-1"))
    assert cfg.stream_relay == "native" and cfg.timeouts.stream_idle_s == 60.0
    assert cfg.problems == (
        "STREAM_RELAY: 'fast' is not native or guarded; using native",
        "STREAM_IDLE_S: -1 is outside 0..3600; using 60",
    )


def test_train_nodes_default_to_the_batch_pair_and_are_checked(fleet_env):
    cfg = load_config(fleet_env())
    batch = cfg.pools["batch"].pair
    assert cfg.train_nodes == () and [n for n in range(1, 9) if cfg.may_train(n)] == list(batch)
    named = load_config(fleet_env(TRAIN_NODES=" 3, 8,3 "))
    assert named.train_nodes == (3, 8) and named.problems == ()
    assert [n for n in range(1, 9) if named.may_train(n)] == [3, 8]
    bad = load_config(fleet_env(TRAIN_NODES="9,x,2"))
    assert bad.train_nodes == (2,)
    assert [p.split(":")[0] for p in bad.problems] == ["TRAIN_NODES", "TRAIN_NODES"]
    assert all("not a node number" in p for p in bad.problems)


def test_the_training_heartbeat_stays_below_its_lease(fleet_env):
    cfg = load_config(fleet_env(FT_LEASE_S="10", FT_HEARTBEAT_S="20"))
    assert cfg.finetune.lease_s == 10 and cfg.finetune.heartbeat_s == 10 / 3
    assert any(p.startswith("FT_HEARTBEAT_S") for p in cfg.problems)
