"""heady_shared.routes: node numbering, the route table (ROUTES) and the roles each node serves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heady_shared.routes import (
    DEFAULT_FALLBACK,
    DEFAULT_POOLS,
    DEFAULT_ROUTES,
    NODE_COUNT,
    NODE_NUMBERS,
    Pool,
    endpoint_key,
    endpoint_node,
    parse_routes,
    role_of,
    roles_served_by,
    valid_role_name,
)

# ---- nodes, roles and the route table ---------------------------------------------------


def test_node_numbering():
    assert NODE_COUNT == 8
    assert NODE_NUMBERS == (1, 2, 3, 4, 5, 6, 7, 8)
    assert [endpoint_key(n) for n in (1, 8)] == ["COLAB_ENDPOINT_1", "COLAB_ENDPOINT_8"]


@pytest.mark.parametrize(
    ("key", "node"),
    [
        ("COLAB_ENDPOINT_1", 1),
        ("COLAB_ENDPOINT_8", 8),
        ("COLAB_ENDPOINT_12", 12),  # past NODE_COUNT: still a node number, out of range
        ("COLAB_ENDPOINT_0", None),
        ("COLAB_ENDPOINT_01", None),
        ("COLAB_ENDPOINT_", None),
        ("COLAB_ENDPOINT_1a", None),
        ("COLAB_ENDPOINT_-1", None),
        ("COLAB_ENDPOINT_\u0663", None),  # a non-ASCII digit
        ("colab_endpoint_1", None),
        ("X_COLAB_ENDPOINT_1", None),
        ("NODE_TOKEN", None),
    ],
)
def test_endpoint_node_reads_back_what_endpoint_key_writes(key, node):
    assert endpoint_node(key) == node


@given(st.integers(1, 10**6))
def test_endpoint_node_inverts_endpoint_key(n):
    assert endpoint_node(endpoint_key(n)) == n


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
