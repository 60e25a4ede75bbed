"""health.py: cooldowns, transitions, the stable_after rule, HealthView and the KV record."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import HealthPolicy
from health import (
    FORGET_AFTER_S,
    KV_KEY,
    LOAD_TTL_S,
    MIN_KV_TTL_S,
    RECORD_VERSION,
    HealthState,
    HealthView,
    cooldown_s,
    covers,
    decode,
    encode,
    is_transition,
    on_failure,
    on_success,
    with_probe,
)

NOW = 1_700_000_000.0
P = HealthPolicy()  # base 30, cap 600, stable_after 1800


# ---- cooldown --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(0, 30), (1, 30), (2, 60), (3, 120), (4, 240), (5, 480), (6, 600), (7, 600), (10**6, 600)],
)
def test_cooldown_grows_and_caps(failures, seconds):
    assert cooldown_s(failures, P) == seconds


def test_cooldown_respects_other_policy():
    p = HealthPolicy(cooldown_base_s=5, cooldown_max_s=17)
    assert [cooldown_s(f, p) for f in range(1, 6)] == [5, 10, 17, 17, 17]


@given(st.integers(0, 10**9), st.floats(1, 3600), st.floats(1, 86400))
def test_cooldown_bounds_and_monotonic(failures, base, cap):
    p = HealthPolicy(cooldown_base_s=base, cooldown_max_s=max(base, cap))
    c = cooldown_s(failures, p)
    assert base <= c <= max(base, cap)
    assert cooldown_s(failures + 1, p) >= c


# ---- on_failure ------------------------------------------------------------------------


def test_first_failure_marks_down_for_the_base():
    h = on_failure(HealthState(), NOW, "refused", P)
    assert h == HealthState(
        state="down", since=NOW, until=NOW + 30, failures=1, reason="refused", at=NOW
    )


def test_failure_keeps_latency_and_load():
    old = HealthState("up", since=NOW - 5000, latency_ms=12.0, load=3, load_at=NOW - 1)
    h = on_failure(old, NOW, "timeout", P)
    assert (h.latency_ms, h.load, h.load_at) == (12.0, 3, NOW - 1)


def test_failure_while_cooling_is_a_no_op():
    h = on_failure(HealthState(), NOW, "refused", P)
    for dt in (0, 1, 29.9):
        assert on_failure(h, NOW + dt, "timeout", P) is h


def test_failure_while_cooling_with_a_shorter_retry_after_is_a_no_op():
    h = on_failure(HealthState(), NOW, "refused", P)  # until NOW + 30
    assert on_failure(h, NOW + 10, "busy", P, retry_after_s=5) is h
    assert on_failure(h, NOW + 10, "busy", P, retry_after_s=20) is h  # ends exactly at until


def test_failure_while_cooling_with_a_longer_retry_after_extends_it():
    h = on_failure(HealthState(), NOW, "refused", P)
    h2 = on_failure(h, NOW + 10, "busy", P, retry_after_s=100)
    assert h2.until == NOW + 110
    assert h2.at == NOW + 10
    assert h2.failures == 1 and h2.since == NOW and h2.state == "down"
    h3 = on_failure(h2, NOW + 20, "busy", P, retry_after_s=10_000)
    assert h3.until == NOW + 20 + P.cooldown_max_s  # capped


@given(
    remaining=st.floats(0.001, 5000),
    retry_after=st.one_of(st.none(), st.floats(0, 10_000)),
    failures=st.integers(1, 20),
)
def test_failure_while_cooling_never_shortens_the_cooldown(remaining, retry_after, failures):
    h = HealthState("down", since=NOW - 50, until=NOW + remaining, failures=failures, at=NOW - 1)
    new = on_failure(h, NOW, "busy", P, retry_after_s=retry_after)
    assert new.until >= h.until
    assert new.failures == failures
    assert new.state == "down" and new.since == h.since


def test_failure_after_the_cooldown_doubles_it():
    h = on_failure(HealthState(), NOW, "refused", P)
    t = NOW
    expected = [30, 60, 120, 240, 480, 600, 600]
    for i, cool in enumerate(expected):
        if i:
            t = h.until  # cooldown just over: on probation, fails again
            h = on_failure(h, t, "refused", P)
        assert h.until - t == cool
        assert h.failures == i + 1
        assert h.since == NOW  # still the same outage


def test_retry_after_sets_the_cooldown_even_below_the_base():
    h = on_failure(HealthState(), NOW, "busy", P, retry_after_s=7)
    assert h.until == NOW + 7 and h.failures == 1
    assert on_failure(HealthState(), NOW, "busy", P, retry_after_s=0.2).until == NOW + 1
    assert on_failure(HealthState(), NOW, "busy", P, retry_after_s=10**6).until == NOW + 600


def test_flapping_node_keeps_counting_after_a_short_recovery():
    h = on_failure(HealthState(), NOW, "refused", P)
    h = on_success(h, NOW + 31)
    assert h.state == "up" and h.failures == 1
    h = on_failure(h, NOW + 31 + P.stable_after_s - 1, "refused", P)
    assert h.failures == 2
    assert h.until - h.since == 60


def test_long_recovery_restarts_the_count():
    h = on_failure(HealthState(), NOW, "refused", P)
    h = replace(h, failures=5)
    h = on_success(h, NOW + 1000)
    h = on_failure(h, NOW + 1000 + P.stable_after_s, "refused", P)
    assert h.failures == 1
    assert h.until - h.since == 30


def test_stable_after_zero_always_restarts():
    p = HealthPolicy(stable_after_s=0)
    h = on_success(on_failure(HealthState(), NOW, "refused", p), NOW + 40)
    assert on_failure(h, NOW + 40, "refused", p).failures == 1


def test_unknown_node_failure_restarts_the_count():
    # an "unknown" record (e.g. decoded from KV) with old failures starts again at one
    h = HealthState("unknown", failures=4)
    assert on_failure(h, NOW, "refused", P).failures == 1


def test_down_without_until_counts_on():
    h = HealthState("down", since=NOW - 100, until=None, failures=2)
    new = on_failure(h, NOW, "refused", P)
    assert new.failures == 3 and new.until == NOW + 120 and new.since == NOW - 100


# ---- on_success / with_probe -----------------------------------------------------------


def test_success_clears_a_down_mark_and_keeps_failures():
    h = on_failure(HealthState(latency_ms=5.0), NOW, "refused", P)
    s = on_success(h, NOW + 40, latency_ms=80.0)
    assert s.state == "up" and s.since == NOW + 40 and s.until is None and s.reason is None
    assert s.at == NOW + 40 and s.failures == 1 and s.latency_ms == 80.0
    assert on_success(h, NOW + 40).latency_ms == 5.0


def test_success_on_an_up_node_changes_only_latency():
    h = HealthState("up", since=NOW - 10, at=NOW - 10, latency_ms=1.0)
    assert on_success(h, NOW) is h
    s = on_success(h, NOW, latency_ms=9.0)
    assert s == replace(h, latency_ms=9.0)


def test_success_from_unknown():
    s = on_success(HealthState(), NOW, 3.0)
    assert (s.state, s.since, s.at, s.latency_ms) == ("up", NOW, NOW, 3.0)


def test_with_probe_records_load_and_time():
    h = with_probe(HealthState("up", latency_ms=1.0), NOW, 7, 12.5)
    assert (h.load, h.load_at, h.checked_at, h.at, h.latency_ms) == (7, NOW, NOW, NOW, 12.5)
    h2 = with_probe(h, NOW + 60, None, None)
    assert (h2.load, h2.load_at, h2.checked_at, h2.latency_ms) == (7, NOW, NOW + 60, 12.5)
    assert h2.state == "up"


# ---- transitions and covers ------------------------------------------------------------


def test_is_transition():
    unknown = HealthState()
    up = HealthState("up", since=NOW)
    down = HealthState("down", since=NOW, until=NOW + 30)
    assert not is_transition(unknown, up)
    assert is_transition(unknown, down)
    assert is_transition(up, down)
    assert is_transition(down, up)
    assert is_transition(down, unknown)
    assert not is_transition(up, up)
    assert not is_transition(up, replace(up, latency_ms=5.0, load=3))
    assert not is_transition(down, down)
    assert is_transition(down, replace(down, until=NOW + 60))
    assert not is_transition(unknown, unknown)


def test_covers():
    mine_down = HealthState("down", until=NOW + 60, at=NOW)
    assert covers(None, HealthState(), P)  # nothing observed here
    assert covers(HealthState("up", at=NOW), replace(mine_down, at=0.0), P)
    assert not covers(None, mine_down, P)
    assert covers(None, HealthState("unknown", at=NOW), P)
    assert not covers(None, HealthState("up", at=NOW), P)
    assert not covers(HealthState("up", at=NOW - 5), mine_down, P)
    # a down mark ending at most half a base cooldown earlier counts as the same outage
    assert covers(replace(mine_down, until=NOW + 60 - 15), mine_down, P)
    assert not covers(replace(mine_down, until=NOW + 60 - 15.1), mine_down, P)
    assert covers(replace(mine_down, until=NOW + 600), mine_down, P)
    assert not covers(replace(mine_down, until=None), mine_down, P)
    mine_up = HealthState("up", at=NOW, load=4)
    assert covers(HealthState("up", load=4), mine_up, P)
    assert not covers(HealthState("up", load=5), mine_up, P)
    assert not covers(HealthState("up"), mine_up, P)
    assert covers(HealthState("up", load=9), replace(mine_up, load=None), P)


# ---- HealthView ------------------------------------------------------------------------


def test_view_basics():
    v = HealthView()
    assert v.get(3) == HealthState()
    assert not v.is_down(3, NOW)
    assert v.effective_state(3, NOW) == "unknown"
    assert v.load(3, NOW) is None
    v.nodes[3] = HealthState("down", until=NOW + 10)
    assert v.is_down(3, NOW) and v.is_down(3, NOW + 9.9)
    assert not v.is_down(3, NOW + 10)
    assert v.effective_state(3, NOW) == "down"
    assert v.effective_state(3, NOW + 10) == "unknown"  # probation
    v.nodes[4] = HealthState("down", until=None)
    assert not v.is_down(4, NOW)
    v.nodes[5] = HealthState("up")
    assert v.effective_state(5, NOW) == "up"


def test_view_load_ttl():
    v = HealthView()
    v.nodes[1] = HealthState("up", load=3, load_at=NOW)
    assert v.load(1, NOW + LOAD_TTL_S) == 3
    assert v.load(1, NOW + LOAD_TTL_S + 0.1) is None
    v.nodes[2] = HealthState("up", load=3, load_at=None)
    assert v.load(2, NOW) is None


def test_view_apply_marks_dirty_on_transitions_only():
    v = HealthView()
    assert v.apply(1, HealthState("up", since=NOW, at=NOW)) is False
    assert not v.dirty and v.get(1).state == "up"
    assert v.apply(1, on_failure(v.get(1), NOW, "refused", P)) is True
    assert v.dirty


def test_view_needs_refresh():
    v = HealthView()
    assert v.needs_refresh(NOW, P)
    v.merge({}, 0.0, NOW)
    assert not v.needs_refresh(NOW + P.refresh_s - 0.1, P)
    assert v.needs_refresh(NOW + P.refresh_s, P)


def test_view_may_write_interval():
    v = HealthView()
    assert not v.may_write(NOW, P)  # nothing pending
    v.dirty = True
    assert v.may_write(NOW, P)  # never written
    v.written_at = NOW
    assert not v.may_write(NOW + P.min_write_interval_s - 0.1, P)
    assert v.may_write(NOW + P.min_write_interval_s, P)
    v.dirty = False
    assert not v.may_write(NOW + 10 * P.min_write_interval_s, P)


def test_view_merge_newer_at_wins():
    v = HealthView()
    v.nodes[1] = HealthState("down", until=NOW + 30, at=NOW)
    v.nodes[2] = HealthState("up", at=NOW)
    v.nodes[3] = HealthState("up", at=NOW)
    v.written_at = NOW - 10
    theirs = {
        1: HealthState("up", at=NOW + 1),  # newer: wins
        2: HealthState("down", until=NOW + 30, at=NOW - 1),  # older: loses
        3: HealthState("down", until=NOW + 30, at=NOW),  # tie: mine stays
        4: HealthState("up", at=NOW - 500),  # unknown to me: taken
    }
    v.merge(theirs, NOW - 20, NOW + 5)
    assert v.nodes[1].state == "up"
    assert v.nodes[2].state == "up"
    assert v.nodes[3].state == "up"
    assert v.nodes[4].state == "up"
    assert v.written_at == NOW - 10  # never goes back
    assert v.loaded_at == NOW + 5
    v.merge({}, NOW + 3, NOW + 6)
    assert v.written_at == NOW + 3


# ---- KV record -------------------------------------------------------------------------


def test_kv_key_is_one_key():
    assert KV_KEY == "health:v1"


def test_encode_shape_and_skip_unobserved():
    v = HealthView()
    v.nodes[2] = HealthState()  # nothing observed: not written
    v.nodes[3] = on_failure(HealthState(), NOW, "refused", P)
    v.nodes[5] = with_probe(HealthState("up", since=NOW), NOW, 4, 10.0)
    body, ttl = encode(v, NOW)
    data = json.loads(body)
    assert data["v"] == RECORD_VERSION and data["written_at"] == NOW
    assert set(data["nodes"]) == {"3", "5"}
    assert data["nodes"]["3"] == {
        "s": "down",
        "since": NOW,
        "until": NOW + 30,
        "f": 1,
        "r": "refused",
        "at": NOW,
        "lat": None,
        "load": None,
        "load_at": None,
        "chk": None,
    }
    assert data["nodes"]["5"]["load"] == 4 and data["nodes"]["5"]["chk"] == NOW
    assert " " not in body  # compact
    assert ttl == math.ceil(30 + FORGET_AFTER_S)


def test_encode_ttl():
    v = HealthView()
    assert encode(v, NOW)[1] >= MIN_KV_TTL_S
    v.nodes[1] = HealthState("down", until=NOW + 600, at=NOW)
    v.nodes[2] = HealthState("down", until=NOW + 100, at=NOW)
    assert encode(v, NOW)[1] == 600 + FORGET_AFTER_S
    v.nodes[1] = HealthState("down", until=NOW - 10**9, at=NOW)  # long expired, garbage
    v.nodes[2] = HealthState("down", until=NOW - 10**9, at=NOW)
    assert encode(v, NOW)[1] == MIN_KV_TTL_S


finite = st.floats(NOW - 80_000, NOW + 10_000, allow_nan=False)
opt_finite = st.one_of(st.none(), finite)
states = st.builds(
    HealthState,
    state=st.sampled_from(["up", "down", "unknown"]),
    since=opt_finite,
    until=opt_finite,
    failures=st.integers(0, 50),
    reason=st.one_of(st.none(), st.text(min_size=1, max_size=64)),
    at=st.floats(NOW - 80_000, NOW, allow_nan=False).filter(bool),
    latency_ms=st.one_of(st.none(), st.floats(0, 1e6)),
    load=st.one_of(st.none(), st.integers(0, 10**6)),
    load_at=opt_finite,
    checked_at=opt_finite,
)


@given(st.dictionaries(st.integers(1, 8), states, max_size=8))
@settings(max_examples=200, deadline=None)
def test_encode_decode_round_trip(nodes):
    v = HealthView()
    v.nodes.update(nodes)
    body, ttl = encode(v, NOW)
    assert ttl >= MIN_KV_TTL_S and isinstance(ttl, int)
    for h in nodes.values():
        if h.until is not None:
            assert ttl >= h.until - NOW  # the key outlives every cooldown
    records, written_at = decode(body, NOW)
    assert written_at == NOW
    assert records == nodes


def test_decode_drops_stale_records():
    v = HealthView()
    v.nodes[1] = HealthState("down", until=NOW - 5, at=NOW - FORGET_AFTER_S)
    v.nodes[2] = HealthState("up", at=NOW - FORGET_AFTER_S + 1)
    records, _ = decode(encode(v, NOW)[0], NOW)
    assert set(records) == {2}


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "not json",
        "[]",
        "null",
        '{"v": 2, "nodes": {"1": {"s": "up", "at": 1}}}',
        '{"nodes": {"1": {"s": "up", "at": 1}}}',
        '{"v": 1}',
        '{"v": 1, "nodes": []}',
        '{"v": 1, "nodes": "x"}',
    ],
)
def test_decode_garbage_is_empty(raw):
    assert decode(raw, NOW) == ({}, 0.0)


GOOD = {"s": "up", "at": NOW - 5}


@pytest.mark.parametrize(
    "rec",
    [
        "up",
        [1, 2],
        None,
        {"at": NOW},  # no state
        {**GOOD, "f": "many"},
        {**GOOD, "f": 1e999},
        {**GOOD, "load": "x"},
        {**GOOD, "load": 1e999},
        {**GOOD, "at": "soon"},
        {**GOOD, "at": "1e999"},
        {**GOOD, "at": 1e999},
        {**GOOD, "at": [1]},
    ],
)
def test_decode_skips_bad_node_records(rec):
    raw = json.dumps({"v": 1, "written_at": NOW, "nodes": {"1": rec, "2": GOOD}})
    records, written_at = decode(raw, NOW)
    assert set(records) == {2}
    assert written_at == NOW


@pytest.mark.parametrize("key", ["0", "9", "-1", "x", "1.5", ""])
def test_decode_skips_bad_node_numbers(key):
    raw = json.dumps({"v": 1, "nodes": {key: GOOD, "8": GOOD}})
    assert set(decode(raw, NOW)[0]) == {8}


def test_decode_sanitises_fields():
    rec = {
        "s": "exploded",
        "since": "yesterday",
        "until": True,
        "f": None,
        "r": "x" * 500,
        "at": NOW - 1,
        "lat": float("nan"),
        "load": 3.7,
        "load_at": NOW,
        "chk": "never",
    }
    raw = json.dumps({"v": 1, "written_at": "later", "nodes": {"4": rec}})
    records, written_at = decode(raw, NOW)
    assert written_at == 0.0
    assert records[4] == HealthState(
        state="unknown", failures=0, reason="x" * 64, at=NOW - 1, load=3, load_at=NOW
    )


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_decode_never_raises_on_text(raw):
    records, written_at = decode(raw, NOW)
    assert isinstance(records, dict) and isinstance(written_at, float)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.dictionaries(
        st.sampled_from(["1", "2", "9", "x"]),
        st.fixed_dictionaries(
            {},
            optional={
                k: json_values
                for k in ("s", "since", "until", "f", "r", "at", "lat", "load", "load_at", "chk")
            },
        )
        | json_values,
        max_size=4,
    )
)
@settings(max_examples=300, deadline=None)
def test_decode_never_raises_on_odd_records(nodes):
    raw = json.dumps({"v": 1, "written_at": NOW, "nodes": nodes})
    records, _ = decode(raw, NOW)
    for n, h in records.items():
        assert 1 <= n <= 8
        assert h.state in ("up", "down", "unknown")
        assert math.isfinite(h.at) and NOW - h.at < FORGET_AFTER_S


events = st.lists(
    st.tuples(
        st.sampled_from(["fail", "fail", "ok", "probe"]),
        st.floats(0, 4000),
        st.one_of(st.none(), st.floats(0, 5000)),
    ),
    max_size=30,
)


@given(events)
@settings(max_examples=200, deadline=None)
def test_event_sequences_keep_the_state_sane(seq):
    h = HealthState()
    t = NOW
    for kind, dt, retry_after in seq:
        t += dt
        before = h
        if kind == "fail":
            h = on_failure(h, t, "refused", P, retry_after)
            assert h.state == "down" and h.failures >= 1
            assert t < h.until <= t + P.cooldown_max_s or h is before
            assert h.since is not None and h.since <= t
            if before.state == "down" and before.until is not None and before.until > t:
                assert h.failures == before.failures and h.until >= before.until
        elif kind == "ok":
            h = on_success(h, t, 5.0)
            assert h.state == "up" and h.until is None and h.failures == before.failures
        else:
            h = with_probe(h, t, 1, 2.0)
            assert h.state == before.state and h.checked_at == t
        assert h.at <= t
