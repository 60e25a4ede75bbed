"""routing.make_plan: ordering, balancing, failover order and its invariants (hypothesis)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from heady_shared.routes import NODE_NUMBERS, Pool
from health import LOAD_TTL_S, HealthState, HealthView
from routing import Plan, make_plan
from tests.unit.conftest import Slot, fleet_config

NOW = 1_700_000_000.0


def config(max_attempts: int = 4, states: dict[int, Slot] | None = None, **extra: str):
    cfg = fleet_config(slots=states, MAX_ATTEMPTS=str(max_attempts), **extra)
    assert cfg.fatal == ()
    return cfg


def down(until_in: float = 60.0) -> HealthState:
    return HealthState(state="down", since=NOW - 10, until=NOW + until_in, failures=1, at=NOW)


def up(load: int | None = None, load_age: float = 0.0) -> HealthState:
    return HealthState(
        state="up",
        since=NOW - 100,
        at=NOW - 100,
        load=load,
        load_at=None if load is None else NOW - load_age,
    )


def view_of(states: dict[int, HealthState]) -> HealthView:
    v = HealthView()
    v.nodes.update(states)
    return v


CFG = config()
CODE = CFG.pools["code"]


def plan(pool=CODE, cfg=CFG, states=None, turn=0, now=NOW) -> Plan:
    return make_plan(pool, cfg, view_of(states or {}), now, turn)


# ---- examples --------------------------------------------------------------------------


def test_healthy_fleet_pair_then_fallback():
    assert plan(turn=0) == Plan("code", (3, 4, 1, 2), (3, 4))
    assert plan(turn=1).nodes == (4, 3, 1, 2)


@pytest.mark.parametrize(("role", "pair"), [("reasoning", (1, 2)), ("batch", (7, 8))])
def test_roles_use_their_own_pair(role, pair):
    p = plan(CFG.pools[role])
    assert p.nodes[:2] == pair
    assert p.pair == pair
    assert not p.is_fallback(pair[0]) and not p.is_fallback(pair[1])


def test_reasoning_pair_is_its_own_fallback_no_duplicates():
    p = plan(CFG.pools["reasoning"], turn=1)
    assert p.nodes == (2, 1)


def test_pair_down_goes_to_fallback_first():
    p = plan(CFG.pools["vision"], states={5: down(), 6: down()})
    assert p.nodes == (1, 2, 5, 6)
    assert p.is_fallback(1) and p.is_fallback(2)


def test_one_pair_node_down_goes_behind_everything():
    assert plan(states={3: down()}, turn=0).nodes == (4, 1, 2, 3)
    assert plan(states={3: down()}, turn=1).nodes == (4, 1, 2, 3)


def test_expired_cooldown_is_available_again():
    assert plan(states={3: down(until_in=-1)}, turn=0).nodes == (3, 4, 1, 2)
    assert plan(states={3: down(until_in=0)}, turn=0).nodes == (3, 4, 1, 2)


def test_all_down_are_still_tried_in_the_same_order():
    # rather than failing fast: a cooldown is a guess, the node may be back
    states = {n: down() for n in NODE_NUMBERS}
    assert plan(states=states, turn=0).nodes == (3, 4, 1, 2)
    assert plan(states=states, turn=1).nodes == (4, 3, 1, 2)


def test_max_attempts_truncates():
    assert plan(cfg=config(max_attempts=1)).nodes == (3,)
    assert plan(cfg=config(max_attempts=3), states={3: down()}).nodes == (4, 1, 2)


def test_invalid_and_unconfigured_nodes_are_never_planned():
    cfg = config(states={3: "invalid", 4: "unconfigured"})
    p = plan(cfg.pools["code"], cfg)
    assert p.nodes == (1, 2)
    assert p.pair == (3, 4)  # the role's own nodes, even if unusable: 1 and 2 are fallbacks
    assert p.is_fallback(1)


def test_no_usable_node_gives_an_empty_plan():
    cfg = config(states={n: "unconfigured" for n in (1, 2, 3, 4)})
    p = plan(cfg.pools["code"], cfg)
    assert p.nodes == ()


def test_custom_fallback_chain_order_is_kept():
    pool = Pool("x", (6,), (8, 2, 5))
    assert plan(pool).nodes == (6, 8, 2, 5)
    assert plan(pool, states={8: down()}).nodes == (6, 2, 5, 8)


def test_less_loaded_first_when_both_loads_fresh():
    states = {3: up(load=9), 4: up(load=2)}
    for turn in range(6):
        assert plan(states=states, turn=turn).nodes[:2] == (4, 3)


def test_equal_loads_round_robin():
    states = {3: up(load=5), 4: up(load=5)}
    assert {plan(states=states, turn=t).nodes[0] for t in range(2)} == {3, 4}


def test_one_load_unknown_round_robin():
    states = {3: up(load=9)}
    assert [plan(states=states, turn=t).nodes[0] for t in range(4)] == [3, 4, 3, 4]


def test_stale_load_round_robin():
    states = {3: up(load=9, load_age=LOAD_TTL_S + 1), 4: up(load=2)}
    assert [plan(states=states, turn=t).nodes[0] for t in range(4)] == [3, 4, 3, 4]
    fresh = {3: up(load=9, load_age=LOAD_TTL_S), 4: up(load=2)}
    assert [plan(states=fresh, turn=t).nodes[0] for t in range(4)] == [4, 4, 4, 4]


def test_less_loaded_but_down_node_still_goes_last():
    states = {3: up(load=9), 4: HealthState("down", NOW, NOW + 60, 1, load=0, load_at=NOW)}
    assert plan(states=states).nodes == (3, 1, 2, 4)


def test_pair_of_three_rotates_over_all():
    pool = Pool("trio", (5, 6, 7), (1,))
    leads = [plan(pool, turn=t).nodes[0] for t in range(6)]
    assert leads == [5, 6, 7, 5, 6, 7]
    assert plan(pool, turn=1).nodes == (6, 7, 5, 1)


def test_single_node_role():
    pool = Pool("solo", (6,), (1, 2))
    assert plan(pool, turn=0).nodes == plan(pool, turn=1).nodes == (6, 1, 2)


# ---- properties ------------------------------------------------------------------------

config_states = st.fixed_dictionaries(
    {
        n: st.sampled_from(["configured", "configured", "invalid", "unconfigured"])
        for n in NODE_NUMBERS
    }
)
node_lists = st.lists(st.sampled_from(NODE_NUMBERS), unique=True)
health_states = st.one_of(
    st.none(),
    st.builds(lambda: down()),
    st.builds(lambda: down(until_in=-5)),
    st.builds(up, st.one_of(st.none(), st.integers(0, 20)), st.sampled_from([0.0, 2 * LOAD_TTL_S])),
)
views = st.fixed_dictionaries({n: health_states for n in NODE_NUMBERS}).map(
    lambda d: {n: h for n, h in d.items() if h is not None}
)
CONFIGS: dict[tuple, object] = {}


def cached_config(states: dict[int, str], max_attempts: int):
    key = (tuple(sorted(states.items())), max_attempts)
    if key not in CONFIGS:
        CONFIGS[key] = config(max_attempts, states)
    return CONFIGS[key]


@given(
    states=config_states,
    pair=node_lists.filter(bool).map(lambda x: x[:3]),
    fallback=node_lists.map(lambda x: x[:4]),
    health=views,
    max_attempts=st.integers(1, 8),
    turn=st.integers(0, 1000),
)
@settings(max_examples=400, deadline=None)
def test_plan_invariants(states, pair, fallback, health, max_attempts, turn):
    cfg = cached_config(states, max_attempts)
    pool = Pool("r", tuple(pair), tuple(fallback))
    view = view_of(health)
    p = make_plan(pool, cfg, view, NOW, turn)
    usable = {n for n in NODE_NUMBERS if states[n] == "configured"}
    candidates = list(dict.fromkeys(n for n in (*pair, *fallback) if n in usable))
    is_down = {n: view.is_down(n, NOW) for n in NODE_NUMBERS}

    assert p.role == "r" and p.pair == tuple(pair)
    # no duplicate node
    assert len(set(p.nodes)) == len(p.nodes)
    # never an unconfigured or invalid node
    assert set(p.nodes) <= usable
    # bounded by max_attempts, and every candidate is there up to it
    assert len(p.nodes) == min(len(candidates), max_attempts)
    assert set(p.nodes) <= set(candidates)
    if len(candidates) <= max_attempts:
        assert set(p.nodes) == set(candidates)
    # down nodes after every available one
    flags = [is_down[n] for n in p.nodes]
    assert flags == sorted(flags)
    # when every candidate is down they are all still tried (up to max_attempts)
    available = [n for n in candidates if not is_down[n]]
    if candidates and not available:
        assert p.nodes and all(is_down[n] for n in p.nodes)
    # available nodes are never cut in favour of down ones
    usable_pair = [n for n in pair if n in usable]
    avail_part = [n for n in p.nodes if not is_down[n]]
    assert len(avail_part) == min(len(available), len(p.nodes))
    for part, pool_part in (
        (avail_part, available),
        ([n for n in p.nodes if is_down[n]], [n for n in candidates if is_down[n]]),
    ):
        # within each group: the role's pair nodes first, then the fallback chain in order
        in_pair = [n for n in part if n in usable_pair]
        assert part == in_pair + [n for n in part if n not in usable_pair]
        chain = [n for n in pool_part if n not in usable_pair]
        assert part[len(in_pair) :] == chain[: len(part) - len(in_pair)]
        if len(part) > len(in_pair):  # the pair is complete before any fallback comes
            assert set(in_pair) == {n for n in pool_part if n in usable_pair}
    # when none is down the role's usable pair nodes lead, then the fallback chain in order
    if not any(is_down[n] for n in candidates):
        k = min(len(usable_pair), len(p.nodes))
        assert set(p.nodes[:k]) <= set(usable_pair)
        chain = [n for n in candidates if n not in usable_pair]
        assert list(p.nodes[k:]) == chain[: len(p.nodes) - k]
    # is_fallback means "not one of the role's own nodes"
    for n in p.nodes:
        assert p.is_fallback(n) == (n not in pair)


@given(
    pair=node_lists.filter(lambda x: len(x) >= 2).map(lambda x: x[:3]),
    start=st.integers(0, 10_000),
    rounds=st.integers(1, 5),
    loads=st.sampled_from(["none", "equal", "one", "stale"]),
)
@settings(max_examples=150, deadline=None)
def test_round_robin_leads_equally(pair, start, rounds, loads):
    if loads == "none":
        health = {}
    elif loads == "equal":
        health = {n: up(load=4) for n in pair}
    elif loads == "one":
        health = {pair[0]: up(load=4)}
    else:
        health = {n: up(load=i, load_age=LOAD_TTL_S + 1) for i, n in enumerate(pair)}
    pool = Pool("r", tuple(pair), ())
    view = view_of(health)
    turns = range(start, start + rounds * len(pair))
    leads = Counter(make_plan(pool, CFG, view, NOW, t).nodes[0] for t in turns)
    assert leads == dict.fromkeys(pair, rounds)
    # consecutive turns never lead with the same node
    firsts = [make_plan(pool, CFG, view, NOW, t).nodes[0] for t in turns]
    assert all(a != b for a, b in itertools.pairwise(firsts))


@given(
    pair=node_lists.filter(lambda x: len(x) >= 2).map(lambda x: x[:3]),
    loads=st.lists(st.integers(0, 50), min_size=3, max_size=3),
    turn=st.integers(0, 100),
)
@settings(max_examples=150, deadline=None)
def test_less_loaded_first_when_loads_fresh_and_differ(pair, loads, turn):
    loads = loads[: len(pair)]
    assume(len(set(loads)) > 1)
    health = {n: up(load=load) for n, load in zip(pair, loads, strict=True)}
    p = make_plan(Pool("r", tuple(pair), ()), CFG, view_of(health), NOW, turn)
    got = [health[n].load for n in p.nodes]
    assert got == sorted(loads)
    assert health[p.nodes[0]].load == min(loads)
