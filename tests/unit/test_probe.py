"""probe.py: cron period, sparse probe scheduling, load parsing (vLLM metrics and JSON)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from config import NODE_NUMBERS, load_config
from health import HealthState, HealthView
from probe import cron_period_s, nodes_to_probe, parse_load, running

SLOT = 1800.0
BASE = 1_700_001_000.0 // SLOT * SLOT  # a slot boundary


def cfg(unusable=(), **extra):
    env = {
        f"COLAB_ENDPOINT_{n}": f"https://node{n}.example" for n in NODE_NUMBERS if n not in unusable
    }
    env.update(extra)
    return load_config(env)


CFG = cfg()


@pytest.mark.parametrize(
    ("cron", "period"),
    [
        ("*/5 * * * *", 300.0),
        ("*/1 * * * *", 60.0),
        ("*/30 * * * *", 1800.0),
        ("*/60 * * * *", 3600.0),
        ("* * * * *", 60.0),
        ("  */10   *  *  *  *  ", 600.0),
        ("*/0 * * * *", 86400.0),
        ("*/61 * * * *", 86400.0),
        ("*/x * * * *", 86400.0),
        ("*/5 1 * * *", 86400.0),
        ("*/5 * * *", 86400.0),
        ("0,30 * * * *", 86400.0),
        ("5 * * * *", 3600.0),
        ("0 * * * *", 3600.0),
        ("60 * * * *", 86400.0),
        ("", 86400.0),
        (None, 86400.0),
        ("garbage", 86400.0),
    ],
)
def test_cron_period(cron, period):
    assert cron_period_s(cron) == period


def up() -> HealthState:
    return HealthState("up", since=BASE - 5000, at=BASE - 5000)


def view(**states: HealthState) -> HealthView:
    v = HealthView()
    for k, h in states.items():
        v.nodes[int(k[1:])] = h
    return v


ALL_UP = {f"n{n}": up() for n in NODE_NUMBERS}


@pytest.mark.parametrize("cron", ["0,30 * * * *", "7 * * * *", "*/5 1 * * *"])
def test_odd_cron_forms_never_starve_healthy_nodes(cron):
    # every node is up, so only the sparse slot can select them: with an hourly or odd
    # schedule each run must still fall on a slot (the period is over- not underestimated)
    for t in (BASE + 17.0, BASE + 900.0, BASE + 1799.0):
        assert nodes_to_probe(CFG, view(**ALL_UP), t, cron_period_s(cron)) == list(range(1, 9))


def test_unknown_nodes_are_probed_every_run():
    assert nodes_to_probe(CFG, HealthView(), BASE + 900, 300) == list(NODE_NUMBERS)


def test_healthy_nodes_only_when_a_slot_begins_within_the_period():
    v = view(**ALL_UP)
    assert nodes_to_probe(CFG, v, BASE + 900, 300) == []
    assert nodes_to_probe(CFG, v, BASE + 1200, 300) == []
    assert nodes_to_probe(CFG, v, BASE + 1500, 300) == []
    assert nodes_to_probe(CFG, v, BASE + SLOT, 300) == list(NODE_NUMBERS)
    assert nodes_to_probe(CFG, v, BASE + SLOT + 100, 300) == list(NODE_NUMBERS)
    assert nodes_to_probe(CFG, v, BASE + SLOT + 300, 300) == []


def test_down_nodes_every_run_and_expired_down_nodes_too():
    v = view(**ALL_UP)
    v.nodes[6] = HealthState("down", until=BASE + 10_000, at=BASE)
    v.nodes[2] = HealthState("down", until=BASE + 100, at=BASE)  # cooldown over: probation
    assert nodes_to_probe(CFG, v, BASE + 1200, 300) == [2, 6]


def test_unusable_nodes_are_never_probed():
    c = cfg(unusable=(3, 4), COLAB_ENDPOINT_4="ftp://bad.example")
    assert nodes_to_probe(c, HealthView(), BASE, 300) == [1, 2, 5, 6, 7, 8]


def test_probe_up_every_setting_is_used():
    c = cfg(PROBE_UP_EVERY_S="600")
    v = view(**ALL_UP)
    due = [t for t in range(0, 3600, 300) if nodes_to_probe(c, v, BASE + t, 300)]
    assert due == [0, 600, 1200, 1800, 2400, 3000]


@given(
    start=st.integers(0, 10**6),
    period=st.sampled_from([60, 300, 600, 900]),
    every=st.sampled_from([600, 1800, 3600, 7200]),
)
@settings(max_examples=100, deadline=None)
def test_healthy_nodes_probed_once_per_slot(start, period, every):
    assume(every % period == 0)  # the cron period divides the slot
    c = cfg(PROBE_UP_EVERY_S=str(every))
    v = view(**ALL_UP)
    t0 = BASE + start * 60
    runs = [t0 + i * period for i in range(int(4 * every // period))]
    due = [t for t in runs if nodes_to_probe(c, v, t, period)]
    assert len(due) == 4  # exactly once in every slot of `every` seconds, no state kept
    assert len({int(t // every) for t in due}) == 4


# ---- load parsing ----------------------------------------------------------------------

VLLM = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 5.0
vllm:num_requests_waiting_total{model_name="m"} 99.0
"""


def test_vllm_metrics_waiting():
    assert parse_load(VLLM, "text/plain; version=0.0.4") == 5
    assert running(VLLM) == 3


def test_vllm_metrics_several_label_sets_are_summed():
    body = (
        'vllm:num_requests_waiting{model_name="a",engine="0"} 2.0\n'
        'vllm:num_requests_waiting{model_name="b",engine="1"} 3.0\n'
    )
    assert parse_load(body, "text/plain") == 5


@pytest.mark.parametrize(
    ("body", "load"),
    [
        ("vllm:num_requests_waiting 7\n", 7),
        ("vllm:num_requests_waiting{} 0.0\n", 0),
        ('vllm:num_requests_waiting{model_name="m"} 1.5e1\n', 15),
        ('vllm:num_requests_waiting{model_name="m"} 4.9\n', 4),
        ('vllm:num_requests_waiting{model_name="m"} 5.0 1700000000000\n', 5),
        ('vllm:num_requests_waiting{model_name="m"}\t6.0\n', 6),
    ],
)
def test_vllm_metrics_forms(body, load):
    assert parse_load(body, None) == load


@pytest.mark.parametrize(
    "body",
    [
        "",
        "vllm:num_requests_running 3.0\n",
        "# vllm:num_requests_waiting 3\n",
        "  vllm:num_requests_waiting 3\n",
        "vllm:num_requests_waiting_total 3\n",
        "vllm:num_requests_waiting -1\n",
        "vllm:num_requests_waiting 1-2\n",
        "vllm:num_requests_waiting NaN\n",
        "vllm:num_requests_waiting +Inf\n",
        "vllm:num_requests_waiting 1e999\n",
        "<html>ngrok</html>",
        "OK",
    ],
)
def test_metrics_without_a_usable_waiting_value(body):
    assert parse_load(body, "text/plain") is None


@pytest.mark.parametrize(
    ("body", "load"),
    [
        ('{"queue_depth": 4}', 4),
        ('{"queue": 2.0}', 2),
        ('{"num_requests_waiting": 0}', 0),
        ('{"waiting": 9, "status": "ok"}', 9),
        ('{"pending": 1}', 1),
        ('{"queue_depth": 4, "pending": 1}', 4),  # first key wins
        ('{"queue_depth": -1, "pending": 1}', 1),  # negative skipped
        ('{"queue_depth": true, "waiting": 3}', 3),  # bools are not numbers
        ('{"queue_depth": "4", "waiting": 3}', 3),
        ('  {"queue": 6}', 6),
    ],
)
def test_json_load(body, load):
    assert parse_load(body, "application/json") == load


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
        ("vllm:num_requests_waiting 3\n", "application/json"),  # says json, is not
    ],
)
def test_json_without_a_usable_load(body, ctype):
    assert parse_load(body, ctype) is None


def test_json_detected_without_content_type():
    assert parse_load('{"queue_depth": 3}', None) == 3
    assert parse_load('{"queue_depth": 3}', "text/plain") == 3


@given(
    st.text(max_size=200), st.one_of(st.none(), st.sampled_from(["application/json", "text/plain"]))
)
@settings(max_examples=300, deadline=None)
def test_parse_load_never_raises(body, ctype):
    load = parse_load(body, ctype)
    assert load is None or (isinstance(load, int) and load >= 0)


@given(st.lists(st.floats(0, 10**9), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_parse_load_sums_label_sets(values):
    body = "".join(
        f'vllm:num_requests_waiting{{model_name="m{i}"}} {v!r}\n' for i, v in enumerate(values)
    )
    assert parse_load(body, "text/plain; version=0.0.4") == int(sum(values))


def test_deeply_nested_json_is_no_load():
    assert parse_load("{" * 100_000, "application/json") is None
    assert parse_load('{"a":' * 100_000, None) is None
