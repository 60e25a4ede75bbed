"""config.py: endpoint shapes, ROUTES parsing, numbers, keys, flags and tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import (
    CONFIG_KEYS,
    DEFAULT_FALLBACK,
    DEFAULT_ROUTES,
    NODE_NUMBERS,
    Pool,
    load_config,
    parse_endpoint,
    parse_routes,
)

SECRET_URL = "https://secret-tunnel-abc.ngrok-free.app"


def full_env(**extra: str | None) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        f"COLAB_ENDPOINT_{n}": f"https://node{n}.example" for n in NODE_NUMBERS
    }
    env["GATEWAY_API_KEYS"] = "k1"
    env.update(extra)
    return env


# ---- COLAB_ENDPOINT_n ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "base"),
    [
        ("https://abc.ngrok-free.app", "https://abc.ngrok-free.app"),
        ("https://abc.ngrok-free.app/", "https://abc.ngrok-free.app"),
        ("https://abc.ngrok-free.app///", "https://abc.ngrok-free.app"),
        ("  https://abc.example/  \n", "https://abc.example"),
        ("https://abc.example/prefix", "https://abc.example/prefix"),
        ("https://abc.example/a/b/", "https://abc.example/a/b"),
        ("https://abc.example//a//b", "https://abc.example/a/b"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("https://h.example:65535", "https://h.example:65535"),
        ("https://h.example:1", "https://h.example:1"),
        ("HTTPS://ABC.Example/Path", "https://abc.example/Path"),
        ("http://[::1]:8080/v", "http://[::1]:8080/v"),
        ("http://[::1]", "http://[::1]"),
    ],
)
def test_endpoint_valid_shapes_are_normalised(raw, base):
    assert parse_endpoint(raw) == ("configured", base, None)


@pytest.mark.parametrize("raw", [None, "", "   ", "\n\t"])
def test_endpoint_missing_is_unconfigured(raw):
    assert parse_endpoint(raw) == ("unconfigured", None, "secret not set")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("ftp://abc.example", "scheme"),
        ("ws://abc.example", "scheme"),
        ("abc.example", "scheme"),
        ("//abc.example", "scheme"),
        ("https://user:pw@abc.example", "credentials"),
        ("https://user@abc.example/x", "credentials"),
        ("https://abc .example", "spaces"),
        ("https://abc.example/a b", "spaces"),
        ("https://abc.example/\x00", "spaces"),
        ("https://abc.example/a\tb", "spaces"),
        ('https://abc.example/"x"', "not allowed"),
        ("https://abc.example/a\\b", "not allowed"),
        ("https://abc.example/{x}", "not allowed"),
        ("https://abc.example?x=1", "query"),
        ("https://abc.example/p?x=1", "query"),
        ("https://abc.example/#frag", "query or fragment"),
        ("https://abc.example:0", "port"),
        ("https://abc.example:65536", "port"),
        ("https://abc.example:99999", "port"),
        ("https://abc.example:", "port"),
        ("https://abc.example:http", "port"),
        ("https://abc.example:-1", "port"),
        ("https://", "host"),
        ("https:///path", "host"),
        ("https://:8080", "host"),
        ("https://.example", "host"),
        ("https://example.", "host"),
        ("https://abc.example/a/../b", "'..'"),
        ("https://abc.example/./b", "'.'"),
        ("https://abc.example/" + "a" * 3000, "too long"),
    ],
)
def test_endpoint_invalid_shapes_have_a_reason(raw, words):
    state, base, reason = parse_endpoint(raw)
    assert state == "invalid"
    assert base is None
    assert reason and words in reason


@pytest.mark.parametrize(
    "raw",
    ["https://user:hunter2@abc.example", "ftp://hunter2.example", "https://hunter2.example?q"],
)
def test_endpoint_reason_never_quotes_the_secret(raw):
    _, _, reason = parse_endpoint(raw)
    assert "hunter2" not in reason


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_endpoint_never_raises_and_is_consistent(raw):
    state, base, reason = parse_endpoint(raw)
    if state == "configured":
        assert reason is None
        assert base is not None
        assert base.startswith(("http://", "https://"))
        assert not base.endswith("/")
        assert "?" not in base and "#" not in base and "@" not in base
        assert " " not in base
        # normalising again is a fixed point
        assert parse_endpoint(base) == ("configured", base, None)
    else:
        assert base is None and reason


# ---- ROUTES ----------------------------------------------------------------------------


def test_routes_default_when_unset_or_blank():
    for raw in (None, "", "   "):
        pools, errors = parse_routes(raw)
        assert errors == []
        assert {name: p.pair for name, p in pools.items()} == DEFAULT_ROUTES
        assert all(p.fallback == DEFAULT_FALLBACK for p in pools.values())
        assert all(p.role == name for name, p in pools.items())


def test_routes_override_roles_and_fallback():
    pools, errors = parse_routes('{"roles": {"chat": [2, 5], "embed": [6]}, "fallback": [8]}')
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


# ---- load_config -----------------------------------------------------------------------


def test_defaults():
    cfg = load_config(full_env())
    assert cfg.problems == () and cfg.fatal == ()
    assert [n.number for n in cfg.nodes] == list(NODE_NUMBERS)
    assert all(n.usable and n.config == "configured" for n in cfg.nodes)
    assert cfg.node(3).base_url == "https://node3.example"
    assert cfg.roles == ("reasoning", "code", "vision", "batch")
    assert cfg.max_attempts == 4
    assert cfg.max_body_bytes == 10 * 1024 * 1024
    assert cfg.timeouts.attempt_s == 120.0
    assert cfg.timeouts.deadline_s == 900.0
    assert cfg.timeouts.attempt_for("batch") == 600.0
    assert cfg.timeouts.attempt_for("code") == 120.0
    assert cfg.health.cooldown_base_s == 30.0
    assert cfg.health.cooldown_max_s == 600.0
    assert cfg.health.stable_after_s == 1800.0
    assert cfg.health.probe_path == "/health"
    assert cfg.health.metrics_path == "/metrics"
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


def test_invalid_endpoint_is_a_problem_without_the_url():
    cfg = load_config(full_env(COLAB_ENDPOINT_3="https://user:topsecret@tunnel.example"))
    node = cfg.node(3)
    assert node.config == "invalid" and not node.usable and node.base_url is None
    assert "credentials" in node.reason
    assert any(p.startswith("COLAB_ENDPOINT_3:") for p in cfg.problems)
    assert "topsecret" not in repr(cfg.problems)
    assert cfg.fatal == ()


def test_bad_routes_are_fatal():
    cfg = load_config(full_env(ROUTES='{"roles": {"code": [3, 9]}}'))
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
def test_api_keys_parsing(raw, keys):
    assert load_config(full_env(GATEWAY_API_KEYS=raw)).api_keys == keys


def test_api_keys_unset():
    env = full_env()
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
def test_auth_disabled_flag(raw, expected):
    assert load_config(full_env(AUTH_DISABLED=raw)).auth_disabled is expected


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
def test_node_token_accepted(raw, token):
    cfg = load_config(full_env(NODE_TOKEN=raw))
    assert cfg.node_token == token
    assert not any("NODE_TOKEN" in p for p in cfg.problems)


@pytest.mark.parametrize("raw", ["to\nken", "to\rken", "tök", "tok\x00en", "tok\x7f", "tok€"])
def test_node_token_with_bad_chars_is_dropped_and_reported(raw):
    cfg = load_config(full_env(NODE_TOKEN=raw))
    assert cfg.node_token is None
    problems = [p for p in cfg.problems if p.startswith("NODE_TOKEN")]
    assert len(problems) == 1
    assert raw.strip() not in problems[0]  # the secret is not quoted


NUMBERS = [
    # name, attribute getter, default, lo, hi
    ("ATTEMPT_TIMEOUT_S", lambda c: c.timeouts.attempt_s, 120.0, 1, 3600),
    ("DEADLINE_S", lambda c: c.timeouts.deadline_s, 900.0, 1, 7200),
    ("COOLDOWN_BASE_S", lambda c: c.health.cooldown_base_s, 30.0, 1, 3600),
    ("STABLE_AFTER_S", lambda c: c.health.stable_after_s, 1800.0, 0, 86400),
    ("HEALTH_REFRESH_S", lambda c: c.health.refresh_s, 30.0, 1, 3600),
    ("KV_MIN_WRITE_INTERVAL_S", lambda c: c.health.min_write_interval_s, 120.0, 1, 86400),
    ("PROBE_TIMEOUT_S", lambda c: c.health.probe_timeout_s, 5.0, 0.5, 60),
    ("PROBE_UP_EVERY_S", lambda c: c.health.probe_up_every_s, 1800.0, 60, 86400),
    ("MAX_BODY_BYTES", lambda c: c.max_body_bytes, 10 * 1024 * 1024, 0, 100 * 1024 * 1024),
    ("MAX_ATTEMPTS", lambda c: c.max_attempts, 4, 1, 8),
]


@pytest.mark.parametrize(("name", "get", "default", "lo", "hi"), NUMBERS)
def test_numbers_in_range_are_used(name, get, default, lo, hi):
    for value in (lo, hi):
        cfg = load_config(full_env(**{name: f" {value} ", "COOLDOWN_MAX_S": "86400"}))
        assert get(cfg) == value
        assert cfg.problems == ()


@pytest.mark.parametrize(("name", "get", "default", "lo", "hi"), NUMBERS)
def test_numbers_out_of_range_are_reported_and_defaulted(name, get, default, lo, hi):
    for raw in (str(lo - 1 if lo >= 1 else lo - 0.25), str(hi + 1), "-5", "1e999", "nan", "inf"):
        cfg = load_config(full_env(**{name: raw}))
        assert get(cfg) == default, (name, raw)
        (problem,) = cfg.problems
        assert problem.startswith(f"{name}:")
        assert "outside" in problem and "using" in problem


@pytest.mark.parametrize(("name", "get", "default", "lo", "hi"), NUMBERS)
def test_numbers_not_numeric_are_reported_and_defaulted(name, get, default, lo, hi):
    cfg = load_config(full_env(**{name: "ten"}))
    assert get(cfg) == default
    (problem,) = cfg.problems
    assert problem.startswith(f"{name}:") and "'ten' is not a number" in problem


@pytest.mark.parametrize(("name", "get", "default", "lo", "hi"), NUMBERS)
def test_numbers_blank_is_default_silently(name, get, default, lo, hi):
    cfg = load_config(full_env(**{name: "  "}))
    assert get(cfg) == default
    assert cfg.problems == ()


def test_integer_settings_are_ints():
    cfg = load_config(full_env(MAX_ATTEMPTS="2.9", MAX_BODY_BYTES="1024.5"))
    assert cfg.max_attempts == 2 and isinstance(cfg.max_attempts, int)
    assert cfg.max_body_bytes == 1024 and isinstance(cfg.max_body_bytes, int)


def test_cooldown_cap_below_base_uses_base():
    cfg = load_config(full_env(COOLDOWN_BASE_S="100", COOLDOWN_MAX_S="50"))
    assert cfg.health.cooldown_base_s == 100 and cfg.health.cooldown_max_s == 100
    assert any("COOLDOWN_MAX_S is below COOLDOWN_BASE_S" in p for p in cfg.problems)


def test_cooldown_cap_range():
    cfg = load_config(full_env(COOLDOWN_MAX_S="86401"))
    assert cfg.health.cooldown_max_s == 600.0
    assert any(p.startswith("COOLDOWN_MAX_S:") for p in cfg.problems)


def test_role_timeouts():
    cfg = load_config(full_env(ROLE_TIMEOUTS_S='{"code": 30, "batch": 1200.5}'))
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
def test_role_timeouts_bad_shape_uses_defaults(raw, fragment):
    cfg = load_config(full_env(ROLE_TIMEOUTS_S=raw))
    assert cfg.timeouts.per_role_attempt_s == {"batch": 600.0}
    assert any(fragment in p for p in cfg.problems)


@pytest.mark.parametrize("value", ["0", "3601", "true", '"30"', "null", "-1"])
def test_role_timeouts_bad_values_are_ignored(value):
    cfg = load_config(full_env(ROLE_TIMEOUTS_S='{"code": ' + value + ', "vision": 10}'))
    assert cfg.timeouts.per_role_attempt_s == {"vision": 10.0}
    assert cfg.problems == ("ROLE_TIMEOUTS_S.code: expected seconds 1..3600; ignored",)


@pytest.mark.parametrize(
    ("raw", "path", "problem"),
    [
        (None, "/health", False),
        ("/healthz", "/healthz", False),
        (" /v1/models ", "/v1/models", False),
        ("", "/health", False),
        ("health", "/health", True),
        ("//evil.example/x", "/health", True),
        ("/a/../b", "/health", True),
        ("https://other.example/health", "/health", True),
    ],
)
def test_health_path(raw, path, problem):
    cfg = load_config(full_env(HEALTH_PATH=raw))
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
    ],
)
def test_metrics_path(raw, path, problem):
    cfg = load_config(full_env(METRICS_PATH=raw))
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
def test_cors_origins(raw, origins):
    assert load_config(full_env(CORS_ORIGINS=raw)).cors_origins == origins


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
    assert len(cfg.nodes) == 8
    assert all(k and k == k.strip() for k in cfg.api_keys)
    if cfg.node_token is not None:
        assert all(0x20 <= ord(c) <= 0x7E for c in cfg.node_token)
    if not cfg.fatal:
        assert cfg.pools


def test_role_timeouts_pathological_json_is_a_problem_not_an_exception():
    cfg = load_config(full_env(ROLE_TIMEOUTS_S="[" * 100_000))
    assert cfg.timeouts.per_role_attempt_s == {"batch": 600.0}
    assert any("ROLE_TIMEOUTS_S: not valid JSON" in p for p in cfg.problems)


@pytest.mark.parametrize("n", NODE_NUMBERS)
def test_each_slot_reads_its_own_secret(n):
    env = full_env(**{f"COLAB_ENDPOINT_{n}": "https://only-this.example/p/"})
    cfg = load_config(env)
    assert cfg.node(n).number == n
    assert cfg.node(n).base_url == "https://only-this.example/p"
    others = [m for m in NODE_NUMBERS if m != n]
    assert all(cfg.node(m).base_url == f"https://node{m}.example" for m in others)
    bad = load_config(full_env(**{f"COLAB_ENDPOINT_{n}": "https://x.example?q=1"}))
    assert [m.number for m in bad.nodes if not m.usable] == [n]
    assert bad.problems == (f"COLAB_ENDPOINT_{n}: URL must not carry a query or fragment",)
