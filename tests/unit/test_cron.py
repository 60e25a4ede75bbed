"""cron.py: sparse probe scheduling (the cron period itself is in test_shared_schedule.py), what a
probe answer means (the failure rules, the load from a health body or the metrics path) and
how answers are recorded in health."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import health as hl
from attempt import Head
from config import load_config
from cron import ProbeResult, nodes_to_probe, probe, probe_all, record_probes
from heady_shared.routes import NODE_NUMBERS
from heady_shared.schedule import cron_period_s
from health import HealthState, HealthView
from tests.unit.conftest import fleet_config

SLOT = 1800.0
BASE = 1_700_001_000.0 // SLOT * SLOT  # a slot boundary
NOW = BASE + 17.0


def cfg(unusable=(), **extra):
    return fleet_config(slots=dict.fromkeys(unusable, "unconfigured"), **extra)


CFG = cfg()
POLICY = CFG.health


# ---- fakes ---------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Answer:
    """One scripted answer of a node path: a response or a no-response kind."""

    status: int = 200
    body: str = ""
    content_type: str | None = None
    ngrok: str | None = None
    took_s: float = 0.01


@dataclass
class FakeProber:
    """cron.Prober with scripted answers per (node, path); records every call."""

    clock: Clock
    answers: dict[tuple[int, str], Answer | str] = field(default_factory=dict)
    default: Answer | str = field(default_factory=Answer)
    calls: list[tuple[int, str, float]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def get(self, node: int, path: str, timeout_s: float):
        self.calls.append((node, path, timeout_s))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let the other probes start: they run concurrently
        self.in_flight -= 1
        answer = self.answers.get((node, path), self.default)
        if isinstance(answer, str):
            return answer
        self.clock.t += answer.took_s
        fields = {
            "ngrok-error-code": answer.ngrok,
            "retry-after": None,
            "content-type": answer.content_type,
        }
        head = Head(answer.status, fields)
        # as the shell does: a non-2xx body is discarded, not read
        return head, answer.body if 200 <= answer.status < 300 else ""


def run_probe(answers, default=None, config=CFG, node=3, clock=None):
    clock = clock or Clock()
    prober = FakeProber(clock, answers, default if default is not None else Answer())
    result = asyncio.run(probe(config, prober, node, clock))
    return result, prober


# ---- which nodes -----------------------------------------------------------


def up(**kw) -> HealthState:
    return HealthState("up", since=BASE - 5000, at=BASE - 5000, **kw)


def view(states: dict[int, HealthState] | None = None) -> HealthView:
    v = HealthView()
    v.nodes.update(states or {})
    return v


ALL_UP = {n: up() for n in NODE_NUMBERS}


@pytest.mark.parametrize("cron", ["0,30 * * * *", "7 * * * *", "*/5 1 * * *"])
def test_odd_cron_forms_never_starve_healthy_nodes(cron):
    # every node is up, so only the sparse slot can select them: with an hourly or odd
    # schedule each run must still fall on a slot (the period is over- not underestimated)
    for t in (BASE + 17.0, BASE + 900.0, BASE + 1799.0):
        assert nodes_to_probe(CFG, view(ALL_UP), t, cron_period_s(cron)) == list(range(1, 9))


def test_unknown_nodes_are_probed_every_run():
    assert nodes_to_probe(CFG, HealthView(), BASE + 900, 300) == list(NODE_NUMBERS)


def test_healthy_nodes_only_when_a_slot_begins_within_the_period():
    v = view(ALL_UP)
    assert nodes_to_probe(CFG, v, BASE + 900, 300) == []
    assert nodes_to_probe(CFG, v, BASE + 1200, 300) == []
    assert nodes_to_probe(CFG, v, BASE + 1500, 300) == []
    assert nodes_to_probe(CFG, v, BASE + SLOT, 300) == list(NODE_NUMBERS)
    assert nodes_to_probe(CFG, v, BASE + SLOT + 100, 300) == list(NODE_NUMBERS)
    assert nodes_to_probe(CFG, v, BASE + SLOT + 300, 300) == []


def test_down_nodes_every_run_and_expired_down_nodes_too():
    v = view(ALL_UP)
    v.nodes[6] = HealthState("down", until=BASE + 10_000, at=BASE)
    v.nodes[2] = HealthState("down", until=BASE + 100, at=BASE)  # cooldown over: probation
    assert nodes_to_probe(CFG, v, BASE + 1200, 300) == [2, 6]


def test_unusable_nodes_are_never_probed():
    c = cfg(unusable=(3, 4), COLAB_ENDPOINT_4="ftp://bad.example")
    assert nodes_to_probe(c, HealthView(), BASE, 300) == [1, 2, 5, 6, 7, 8]


def test_probe_up_every_setting_is_used():
    c = cfg(PROBE_UP_EVERY_S="600")
    v = view(ALL_UP)
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
    v = view(ALL_UP)
    t0 = BASE + start * 60
    runs = [t0 + i * period for i in range(int(4 * every // period))]
    due = [t for t in runs if nodes_to_probe(c, v, t, period)]
    assert len(due) == 4  # exactly once in every slot of `every` seconds, no state kept
    assert len({int(t // every) for t in due}) == 4


# ---- one probe: what the answer means --------------------------------------------------------

PROM = 'vllm:num_requests_waiting{model_name="m"} 4.0\nvllm:num_requests_running 2\n'


def test_healthy_vllm_node_takes_its_load_from_metrics():
    # vLLM's /health answers 200 with an empty body; the load is on /metrics
    result, prober = run_probe(
        {(3, "/health"): Answer(took_s=0.0425), (3, "/metrics"): Answer(body=PROM)}
    )
    # ... and the model id from its labels (vLLM labels metrics with the first served name)
    assert result == ProbeResult(3, True, "ok", 42.5, 4, "m")
    assert prober.calls == [(3, "/health", 5.0), (3, "/metrics", 5.0)]


def test_load_in_the_health_body_saves_the_metrics_request():
    result, prober = run_probe(
        {(3, "/health"): Answer(body='{"queue_depth": 7}', content_type="application/json")}
    )
    assert (result.ok, result.load) == (True, 7)
    assert [c[1] for c in prober.calls] == ["/health"]


@pytest.mark.parametrize(
    "metrics",
    [
        "timeout",
        "refused",
        Answer(status=404),
        Answer(status=503),
        Answer(status=200, ngrok="ERR_NGROK_3200"),
        Answer(body="<html>not metrics</html>"),
    ],
)
def test_a_failing_metrics_path_leaves_the_node_up_without_a_load(metrics):
    result, _ = run_probe({(3, "/health"): Answer(), (3, "/metrics"): metrics})
    assert (result.ok, result.reason, result.load) == (True, "ok", None)


def test_no_metrics_path_means_one_request():
    c = cfg(METRICS_PATH="")
    result, prober = run_probe({}, config=c)
    assert (result.ok, result.load) == (True, None)
    assert [c[1] for c in prober.calls] == ["/health"]


def test_probe_uses_the_configured_path_and_time_out():
    c = cfg(HEALTH_PATH="/v1/models", PROBE_TIMEOUT_S="2.5", METRICS_PATH="/stats")
    _, prober = run_probe({}, config=c, node=6)
    assert prober.calls == [(6, "/v1/models", 2.5), (6, "/stats", 2.5)]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("timeout", "timeout"),
        ("refused", "refused"),
        ("error", "error"),
        (Answer(status=530), "tunnel_down"),
        (Answer(status=522), "tunnel_down"),
        (Answer(status=200, ngrok="ERR_NGROK_3200"), "tunnel_offline"),
        (Answer(status=404, ngrok="ERR_NGROK_3200"), "tunnel_offline"),
        (Answer(status=503), "busy"),
        (Answer(status=429), "busy"),
        (Answer(status=502), "http_502"),
        (Answer(status=504), "http_504"),
        # not a failure rule, but not healthy either: the model server says no
        (Answer(status=404), "http_404"),
        (Answer(status=401), "http_401"),
        (Answer(status=500), "http_500"),
        (Answer(status=301), "http_301"),
        (Answer(status=101), "http_101"),
    ],
)
def test_failure_rules_and_non_2xx_make_a_failed_probe(answer, reason):
    result, prober = run_probe({(3, "/health"): answer})
    assert result == ProbeResult(3, False, reason, None, None)
    assert [c[1] for c in prober.calls] == ["/health"]  # no metrics for a failed node


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_any_2xx_is_up(status):
    result, _ = run_probe({(3, "/health"): Answer(status=status)})
    assert result.ok and result.reason == "ok"


def test_probe_ms_never_negative_when_the_clock_steps_back():
    result, _ = run_probe({(3, "/health"): Answer(took_s=-5.0)})
    assert result.ms == 0.0


# ---- record_probes: answers into health ---------------------------------------------------


def recorded(old: HealthState | None, result: ProbeResult, now: float = NOW) -> HealthView:
    v = view({} if old is None else {result.node: old})
    record_probes(v, [result], now, CFG)
    return v


def test_first_success_on_an_unknown_node_is_up_but_not_news():
    v = recorded(None, ProbeResult(3, True, "ok", 12.0))
    h = v.get(3)
    assert (h.state, h.since, h.latency_ms, h.checked_at, h.at) == ("up", NOW, 12.0, NOW, NOW)
    assert not v.dirty  # an unknown node is tried anyway: nothing to share


def test_first_success_with_a_load_is_worth_sharing():
    v = recorded(None, ProbeResult(3, True, "ok", 12.0, 5))
    assert (v.get(3).load, v.get(3).load_at) == (5, NOW)
    assert v.dirty


def test_failure_marks_down_with_the_base_cooldown():
    v = recorded(up(), ProbeResult(3, False, "tunnel_down"))
    h = v.get(3)
    assert (h.state, h.reason, h.failures) == ("down", "tunnel_down", 1)
    assert h.until == NOW + POLICY.cooldown_base_s
    assert h.checked_at == NOW
    assert v.dirty


def test_failure_on_an_unknown_node_marks_it_down():
    v = recorded(None, ProbeResult(5, False, "refused"))
    assert v.is_down(5, NOW) and v.dirty


def test_failure_while_cooling_down_changes_nothing_worth_sharing():
    old = HealthState("down", since=NOW - 10, until=NOW + 20, failures=2, reason="busy", at=NOW)
    v = recorded(old, ProbeResult(3, False, "timeout"))
    h = v.get(3)
    assert (h.state, h.until, h.failures, h.reason) == ("down", NOW + 20, 2, "busy")
    assert h.checked_at == NOW
    assert not v.dirty


def test_failure_after_an_expired_cooldown_grows_the_next_one():
    old = HealthState("down", since=NOW - 100, until=NOW - 1, failures=2, at=NOW - 100)
    v = recorded(old, ProbeResult(3, False, "timeout"))
    h = v.get(3)
    assert h.failures == 3 and h.until == NOW + hl.cooldown_s(3, POLICY)
    assert v.dirty


def test_success_on_a_down_node_brings_it_up():
    old = HealthState("down", since=NOW - 100, until=NOW + 50, failures=2, at=NOW - 100)
    v = recorded(old, ProbeResult(3, True, "ok", 8.0, 1))
    h = v.get(3)
    assert (h.state, h.since, h.until, h.reason, h.load) == ("up", NOW, None, None, 1)
    assert v.dirty


@pytest.mark.parametrize(
    ("old_load", "new_load", "dirty"),
    [(3, 3, False), (3, 4, True), (None, 0, True), (3, None, False)],
)
def test_an_up_node_is_worth_sharing_only_when_its_load_changed(old_load, new_load, dirty):
    old = up(load=old_load, load_at=None if old_load is None else BASE)
    v = recorded(old, ProbeResult(3, True, "ok", 9.0, new_load))
    h = v.get(3)
    assert h.state == "up" and h.latency_ms == 9.0 and h.checked_at == NOW
    # an unreadable load keeps the last known one (and its age)
    assert h.load == (old_load if new_load is None else new_load)
    assert v.dirty is dirty


def test_fold_touches_only_the_probed_nodes():
    other = up(load=2, load_at=BASE)
    v = view({4: other})
    record_probes(v, [ProbeResult(3, False, "refused")], NOW, CFG)
    assert v.get(4) == other and set(v.nodes) == {3, 4}


# ---- a whole cron run ----------------------------------------------------------------------------


def test_probe_all_probes_the_due_nodes_in_parallel_and_folds_them():
    clock = Clock(BASE + 900)  # mid-slot: healthy nodes are not due
    v = view({n: up() for n in (1, 2, 3, 4)})
    v.nodes[7] = HealthState("down", since=BASE, until=BASE + 10_000, failures=1, at=BASE)
    answers = {(5, "/health"): "refused", (8, "/health"): Answer(status=530)}
    prober = FakeProber(clock, answers, Answer(body='{"queue_depth": 1}'))
    results = asyncio.run(probe_all(CFG, v, prober, clock.t, "*/5 * * * *", clock))
    assert [r.node for r in results] == [5, 6, 7, 8]  # unknown and down ones only
    assert [(r.ok, r.reason) for r in results] == [
        (False, "refused"),
        (True, "ok"),
        (True, "ok"),
        (False, "tunnel_down"),
    ]
    assert prober.max_in_flight == 4
    assert [v.effective_state(n, clock.t) for n in (5, 6, 7, 8)] == ["down", "up", "up", "down"]
    assert v.get(6).load == 1
    assert v.dirty


def test_probe_all_with_nothing_due_probes_nothing():
    clock = Clock(BASE + 900)
    v = view(ALL_UP)
    prober = FakeProber(clock)
    assert asyncio.run(probe_all(CFG, v, prober, clock.t, "*/5 * * * *", clock)) == []
    assert prober.calls == [] and not v.dirty


def before_states(before: dict[int, HealthState | None]) -> dict[int, HealthState]:
    return {n: h for n, h in before.items() if h is not None}


answers = st.one_of(
    st.sampled_from(["timeout", "refused", "error"]),
    st.builds(
        Answer,
        status=st.sampled_from([200, 204, 301, 404, 429, 500, 502, 503, 504, 520, 530]),
        body=st.sampled_from(["", '{"queue": 3}', PROM, "garbage"]),
        ngrok=st.sampled_from([None, None, "", "ERR_NGROK_3200"]),
    ),
)
prior = st.sampled_from(
    [
        None,
        up(),
        HealthState("down", since=NOW - 10, until=NOW + 20, failures=1, at=NOW - 10),
        HealthState("down", since=NOW - 99, until=NOW - 1, failures=1, at=NOW - 99),
    ]
)


@given(
    st.fixed_dictionaries({n: answers for n in NODE_NUMBERS}),
    st.fixed_dictionaries({n: prior for n in NODE_NUMBERS}),
    st.sampled_from([NOW, BASE + 900]),  # a healthy-node slot begins / does not
)
@settings(max_examples=150, deadline=None)
def test_every_probed_node_ends_up_or_down_by_its_answer(by_node, before, scheduled):
    clock = Clock(scheduled)
    v = view(before_states(before))
    prober = FakeProber(clock, {(n, "/health"): a for n, a in by_node.items()})
    results = asyncio.run(probe_all(CFG, v, prober, scheduled, "*/5 * * * *", clock))
    probed = {r.node: r for r in results}
    assert len(probed) == len(results)  # each node at most once
    assert set(probed) == set(nodes_to_probe(CFG, view(before_states(before)), scheduled, 300))
    for n in NODE_NUMBERS:
        if n not in probed:
            assert v.nodes.get(n) == before[n]
            continue
        a = by_node[n]
        healthy = (
            not isinstance(a, str) and 200 <= a.status < 300 and not a.ngrok
        )  # no failure rule matches a 2xx without an ngrok error code
        assert probed[n].ok is healthy
        assert v.get(n).state == ("up" if healthy else "down")
        assert v.get(n).checked_at == clock.t


def test_a_new_model_id_is_worth_sharing_and_a_known_one_is_not():
    view = HealthView()
    cfg = load_config({})
    record_probes(view, [ProbeResult(3, True, "ok", 5.0, None, "org/m-7b")], NOW, cfg)
    assert view.get(3).model == "org/m-7b"
    view.dirty = False
    record_probes(view, [ProbeResult(3, True, "ok", 5.0, None, "org/m-7b")], NOW + 1, cfg)
    assert not view.dirty
    record_probes(view, [ProbeResult(3, True, "ok", 5.0, None, None)], NOW + 2, cfg)
    assert view.get(3).model == "org/m-7b" and not view.dirty  # no answer keeps what we knew
    record_probes(view, [ProbeResult(3, True, "ok", 5.0, None, "org/m-14b")], NOW + 3, cfg)
    assert view.get(3).model == "org/m-14b" and view.dirty
