"""health.py: cooldowns, transitions, the stable_after rule, HealthView and the KV record."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import HealthPolicy
from heady_shared.metrics import MAX_LOAD, WAITING, queue_depth
from health import (
    FORGET_AFTER_S,
    KV_KEY,
    LOAD_TTL_S,
    MAX_CLOCK_SKEW_S,
    MAX_COOLDOWN_S,
    MAX_FAILURES,
    MAX_LATENCY_MS,
    MIN_KV_TTL_S,
    RECORD_VERSION,
    HealthState,
    HealthView,
    bounded,
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
        "m": None,
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


@st.composite
def states(draw, lo: float = NOW - 80_000):
    """Records as the transitions produce them: every time at or before `at`, a cooldown
    ending at most MAX_COOLDOWN_S after it."""
    at = draw(st.floats(lo, NOW, allow_nan=False).filter(bool))
    before = st.one_of(st.none(), st.floats(lo / 2, at, allow_nan=False).filter(bool))
    return HealthState(
        state=draw(st.sampled_from(["up", "down", "unknown"])),
        since=draw(before),
        until=draw(st.one_of(st.none(), st.floats(lo / 2, at + MAX_COOLDOWN_S).filter(bool))),
        failures=draw(st.integers(0, MAX_FAILURES)),
        reason=draw(st.one_of(st.none(), st.text(min_size=1, max_size=64))),
        at=at,
        latency_ms=draw(st.one_of(st.none(), st.floats(0, MAX_LATENCY_MS))),
        load=draw(st.one_of(st.none(), st.integers(0, MAX_LOAD))),
        load_at=draw(before),
        checked_at=draw(before),
    )


@given(st.dictionaries(st.integers(1, 8), states(), max_size=8))
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
    # load_at may not be later than the observation that set it: clamped to `at`
    assert records[4] == HealthState(
        state="unknown", failures=0, reason="x" * 64, at=NOW - 1, load=3, load_at=NOW - 1
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


# ---- corrupt or hostile KV records: decoded safely -------------------------------------------

JS_SAFE = 2**53  # beyond this a Python int crosses into JS as a BigInt


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _strict(body: str):
    """JSON as JS's JSON.parse reads it: NaN / Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(body, parse_constant=refuse)


def assert_writable(records: dict[int, HealthState], now: float) -> None:
    """What `encode` accepts: strict finite JSON, JS-safe numbers, an int TTL KV takes, and
    a value that reads back as exactly these records."""
    v = HealthView()
    v.nodes.update(records)
    body, ttl = encode(v, now)
    data = _strict(body)
    for x in _numbers(data):
        assert math.isfinite(x) and abs(x) < JS_SAFE
    assert isinstance(ttl, int) and MIN_KV_TTL_S <= ttl <= MAX_COOLDOWN_S + FORGET_AFTER_S + 1
    assert decode(body, now)[0] == {n: h for n, h in records.items() if h.at}


HUGE = 1e300


@pytest.mark.parametrize(
    ("field", "value", "expect"),
    [
        ("f", HUGE, {"failures": MAX_FAILURES}),
        ("f", 10**40, {"failures": MAX_FAILURES}),
        ("f", -5, {"failures": 0}),
        ("lat", HUGE, {"latency_ms": None}),
        ("lat", -1.0, {"latency_ms": None}),
        ("load", 10**30, {"load": None}),
        ("load", HUGE, {"load": None}),
        ("load", -3, {"load": None}),
        ("until", HUGE, {"until": NOW - 5 + MAX_COOLDOWN_S}),
        ("since", HUGE, {"since": NOW - 5}),
        ("since", -1.0, {"since": None}),
        ("load_at", HUGE, {"load_at": NOW - 5}),
        ("chk", HUGE, {"checked_at": NOW - 5}),
    ],
)
def test_decode_bounds_every_number(field, value, expect):
    rec = {"s": "down", "at": NOW - 5, field: value}
    raw = json.dumps({"v": 1, "written_at": NOW, "nodes": {"3": rec}})
    records, _ = decode(raw, NOW)
    h = records[3]
    for name, want in expect.items():
        assert getattr(h, name) == want
    assert_writable(records, NOW)


def test_decode_of_the_reported_record_keeps_status_and_writes_working():
    """The shape found by the chaos run: huge numbers and stamps far in the future."""
    rec = {
        "s": "down",
        "since": 1e308,
        "until": 1e308,
        "f": 1e308,
        "r": "refused",
        "at": 1e308,
        "lat": 1e308,
        "load": 10**300,
        "load_at": 1e308,
        "chk": 1e308,
    }
    raw = json.dumps({"v": 1, "written_at": 1e308, "nodes": {str(n): rec for n in range(1, 9)}})
    records, written_at = decode(raw, NOW)
    # A write stamped in the far future vouches for nothing: its future records go, and it
    # does not hold back this isolate's own writes.
    assert records == {} and written_at == 0.0
    v = HealthView()
    v.merge(records, written_at, NOW)
    v.apply(1, on_failure(v.get(1), NOW, "refused", P))
    assert v.may_write(NOW, P)


def test_future_stamp_within_a_sane_write_is_pinned_to_the_write():
    raw = json.dumps(
        {
            "v": 1,
            "written_at": NOW - 10,
            "nodes": {"2": {"s": "down", "until": NOW + 10**6, "at": NOW + 10**6}},
        }
    )
    records, written_at = decode(raw, NOW)
    assert written_at == NOW - 10
    assert records[2].at == NOW - 10 and records[2].until == NOW - 10 + MAX_COOLDOWN_S


def test_future_stamp_never_outranks_a_fresh_local_observation():
    """Issue 9: a record stamped in the future must not keep beating what this isolate sees
    after reading it, on this read or any later re-read of the same value."""
    raw = json.dumps(
        {
            "v": 1,
            "written_at": NOW - 10,
            "nodes": {"2": {"s": "down", "until": NOW + 10**9, "at": NOW + 10**9}},
        }
    )
    v = HealthView()
    v.merge(*decode(raw, NOW), NOW)
    assert v.is_down(2, NOW + 1)
    v.apply(2, on_success(v.get(2), NOW + 1, 5.0))
    for later in (NOW + 2, NOW + 60, NOW + 3600):
        v.merge(*decode(raw, later), later)
        assert v.get(2).state == "up", later


def test_small_clock_skew_is_tolerated_not_dropped():
    ahead = NOW + MAX_CLOCK_SKEW_S / 2
    raw = json.dumps({"v": 1, "written_at": ahead, "nodes": {"1": {"s": "up", "at": ahead}}})
    records, written_at = decode(raw, NOW)
    assert records[1].at == NOW and written_at == NOW


@pytest.mark.parametrize("written_at", [NOW + MAX_CLOCK_SKEW_S + 1, 1e308, None, "x"])
def test_future_records_without_a_sane_write_time_are_dropped(written_at):
    raw = json.dumps(
        {
            "v": 1,
            "written_at": written_at,
            "nodes": {"1": {"s": "down", "at": NOW + 100}, "2": {"s": "up", "at": NOW - 100}},
        }
    )
    records, got = decode(raw, NOW)
    assert set(records) == {2} and got == 0.0


@pytest.mark.parametrize("key", ["٣", "03", "+3", " 3", "3 ", "10"])
def test_decode_node_keys_are_plain_digits(key):
    raw = json.dumps({"v": 1, "nodes": {key: GOOD}})
    assert decode(raw, NOW)[0] == {}


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_decode_survives_deep_nesting(depth):
    assert decode("[" * depth + "]" * depth, NOW) == ({}, 0.0)
    assert decode('{"v": 1, "nodes": ' + "[" * depth, NOW) == ({}, 0.0)


def test_decode_survives_huge_integer_literals():
    raw = '{"v": 1, "written_at": ' + "9" * 5000 + ', "nodes": {"1": {"s": "up", "at": 1}}}'
    assert decode(raw, NOW) == ({}, 0.0)


wild_numbers = st.one_of(
    st.floats(),
    st.integers(-(10**40), 10**40),
    st.floats(NOW - 100_000, NOW + 100_000),
    st.sampled_from([0, -1, 1e308, -1e308, 2**53 + 1, NOW, NOW + 1e6]),
)
wild_json = st.recursive(
    st.none() | st.booleans() | wild_numbers | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = ("s", "since", "until", "f", "r", "at", "lat", "load", "load_at", "chk")
wild_record = st.fixed_dictionaries(
    {},
    optional={
        k: (st.sampled_from(["up", "down", "unknown"]) if k == "s" else wild_numbers) | wild_json
        for k in FIELDS
    },
)


@given(
    st.dictionaries(
        st.sampled_from([str(n) for n in range(0, 10)] + ["x"]), wild_record | wild_json, max_size=8
    ),
    wild_numbers | wild_json,
    st.floats(NOW - 10**6, NOW + 10**6),
)
@settings(max_examples=200, deadline=None)
def test_decode_of_any_json_gives_what_encode_accepts(nodes, written_at, now):
    """Issue 9's property: decode(any JSON) never raises, and whatever it returns is bounded,
    not from the future, and written back by encode unchanged."""
    raw = json.dumps({"v": 1, "written_at": written_at, "nodes": nodes})
    records, got_written = decode(raw, now)
    assert isinstance(got_written, float) and 0.0 <= got_written <= now
    for n, h in records.items():
        assert 1 <= n <= 8
        assert 0 < h.at <= now and now - h.at < FORGET_AFTER_S
        for t in (h.since, h.load_at, h.checked_at):
            assert t is None or 0 < t <= h.at
        assert h.until is None or 0 < h.until <= h.at + MAX_COOLDOWN_S
        assert 0 <= h.failures <= MAX_FAILURES and isinstance(h.failures, int)
        assert h.latency_ms is None or 0 <= h.latency_ms <= MAX_LATENCY_MS
        assert h.load is None or (0 <= h.load <= MAX_LOAD and isinstance(h.load, int))
        assert bounded(h, now) == h
    assert_writable(records, now)


# A record decode can keep: a state and a recent `at`, every other field anything.
live_record = st.fixed_dictionaries(
    {"s": st.sampled_from(["up", "down", "unknown"]), "at": st.floats(NOW - 100_000, NOW + 100)},
    optional={k: wild_numbers | wild_json for k in FIELDS if k not in ("s", "at")},
)


@given(
    st.dictionaries(st.integers(1, 8), wild_record | live_record, max_size=8),
    st.floats(allow_nan=False) | st.floats(NOW - 10, NOW + 10),
)
@settings(max_examples=150, deadline=None)
def test_decode_never_raises_on_any_text_shape(nodes, now):
    """Any record shapes at any clock, with no write time: what comes back is only past,
    recent, bounded records of the nodes given (what encode writes back unchanged), and no
    write time."""
    raw = json.dumps({"v": 1, "nodes": {str(k): v for k, v in nodes.items()}})
    records, written_at = decode(raw, now)
    assert written_at == 0.0
    assert set(records) <= set(nodes)
    for h in records.values():
        assert 0 < h.at <= now and now - h.at < FORGET_AFTER_S
        assert bounded(h, now) == h
    if records:
        assert_writable(records, now)


@given(
    st.builds(
        HealthState,
        state=st.sampled_from(["up", "down", "unknown"]),
        since=st.one_of(st.none(), st.floats()),
        until=st.one_of(st.none(), st.floats()),
        failures=st.integers(-(10**30), 10**30),
        reason=st.one_of(st.none(), st.text(max_size=64)),
        at=st.floats(NOW - 80_000, NOW + 10**9).filter(bool),
        latency_ms=st.one_of(st.none(), st.floats()),
        load=st.one_of(st.none(), st.integers(-(10**30), 10**30)),
        load_at=st.one_of(st.none(), st.floats()),
        checked_at=st.one_of(st.none(), st.floats()),
    )
)
@settings(max_examples=300, deadline=None)
def test_encode_never_emits_a_number_that_cannot_round_trip(h):
    """Even a state built from garbage (as a bug might produce) is written as strict JSON with
    JS-safe numbers, and reads back as its bounded self."""
    v = HealthView()
    v.nodes[4] = h
    body, ttl = encode(v, NOW)
    data = _strict(body)
    for x in _numbers(data):
        assert math.isfinite(x) and abs(x) < JS_SAFE
    assert isinstance(ttl, int) and MIN_KV_TTL_S <= ttl <= MAX_COOLDOWN_S + FORGET_AFTER_S + 1
    back = decode(body, NOW)[0]
    expected = bounded(h, NOW)
    assert back == ({4: expected} if NOW - expected.at < FORGET_AFTER_S and expected.at else {})


def test_every_load_a_probe_reads_survives_the_kv_record():
    # one bound for a load: what a probe believes, the shared record keeps (and nothing more)
    for reported, load in ((MAX_LOAD, MAX_LOAD), (MAX_LOAD + 1, None)):
        assert queue_depth(f"{WAITING} {reported}\n", "text/plain") == load
        v = HealthView()
        v.nodes[3] = with_probe(HealthState("up", since=NOW, at=NOW), NOW, load, 5.0)
        body, _ = encode(v, NOW)
        assert decode(body, NOW)[0][3].load == load


def test_the_model_id_round_trips_and_junk_is_dropped():
    v = HealthView()
    v.nodes[2] = HealthState("up", since=NOW - 5, at=NOW - 5, checked_at=NOW - 5, model="org/m")
    body, _ = encode(v, NOW)
    assert decode(body, NOW)[0][2].model == "org/m"
    for junk in ("", "a b", "x" * 129, 7, ["org/m"], "é"):
        raw = json.loads(body)
        raw["nodes"]["2"]["m"] = junk
        assert decode(json.dumps(raw), NOW)[0][2].model is None, junk
