"""forward.py: the attempt loop over a fake Upstream and a fake clock — which nodes are
tried and when, what each answer does to health, which heads are discarded, the client
leaving, Retry-After of the all-failed 503, and a body cut after its head was relayed."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import health as hl
from attempt import Attempt, Head, judge
from config import HealthPolicy
from forward import MIN_ATTEMPT_S, Budget, ForwardResult, cut, forward, retry_after
from heady_shared.failures import match
from heady_shared.routes import NODE_NUMBERS, Pool
from health import HealthState, HealthView
from routing import Plan, make_plan
from sync import HealthSync
from tests.unit.conftest import fleet_config

T0 = 1_700_000_000.0
POLICY = HealthPolicy()  # cooldown base 30 s, cap 600 s


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ok(status: int = 200) -> Head:
    return Head(status, {"ngrok-error-code": None, "retry-after": None})


def failing(status: int = 503, retry: str | None = None, ngrok: str | None = None) -> Head:
    return Head(status, {"ngrok-error-code": ngrok, "retry-after": retry})


@dataclass
class Step:
    """A node's scripted behaviour: what it answers and how long that takes. A step slower
    than the time-out it is given ends as "timeout" when the time-out expires."""

    result: Head | str
    took_s: float = 0.05


@dataclass
class Call:
    node: int
    timeout_s: float
    started: float
    ended: float = math.nan


@dataclass
class FakeUpstream:
    """forward.Upstream with scripted per-node results; records every call and discard. A
    head's `response` (the shell's JS response) is here the number of the node it came from."""

    clock: Clock
    script: dict[int, Step]
    calls: list[Call] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)

    async def head(self, node: int, timeout_s: float):
        call = Call(node, timeout_s, self.clock.t)
        self.calls.append(call)
        step = self.script.get(node, Step(ok()))
        await asyncio.sleep(0)
        if step.took_s > timeout_s:
            self.clock.t += timeout_s
            result: Head | str = "timeout"
        else:
            self.clock.t += step.took_s
            result = step.result
        call.ended = self.clock.t
        return replace(result, response=node) if isinstance(result, Head) else result

    def discard(self, head: Head) -> None:
        self.discarded.append(head.response)


def health_sync(view: HealthView, policy: HealthPolicy = POLICY) -> HealthSync:
    """The isolate's node health as forward() sees it: this view under this policy."""
    sync = HealthSync(policy)
    sync.view = view
    return sync


def plan_of(*nodes: int, pair: tuple[int, ...] | None = None) -> Plan:
    return Plan("code", tuple(nodes), pair if pair is not None else tuple(nodes[:2]))


def run(
    plan: Plan,
    script: dict[int, Step],
    view: HealthView | None = None,
    *,
    attempt_s: float = 120.0,
    deadline_in: float = 900.0,
    clock: Clock | None = None,
    policy: HealthPolicy = POLICY,
) -> tuple[ForwardResult, FakeUpstream, HealthView]:
    clock = clock or Clock()
    view = view if view is not None else HealthView()
    upstream = FakeUpstream(clock, script)
    result = asyncio.run(
        forward(
            plan,
            upstream,
            health_sync(view, policy),
            Budget(clock, clock.t + deadline_in, attempt_s),
        )
    )
    return result, upstream, view


# ---- examples ------------------------------------------------------------------------------


def test_first_node_answers():
    result, up, view = run(plan_of(3, 4, 1, 2), {3: Step(ok(), 0.25)})
    assert (result.node, result.head, result.client_gone) == (3, ok(), False)
    assert result.response == 3  # the chosen head's own response travels with the result
    assert result.attempts == [Attempt(3, "pass", "ok", 200, 250.0)]
    assert [c.node for c in up.calls] == [3]
    assert up.discarded == []
    assert result.retry_after_s is None
    assert view.get(3).state == "up"


def test_failover_to_the_next_node_marks_the_failed_one_down():
    script = {3: Step("refused", 0.01), 4: Step(failing(502), 0.02), 1: Step(ok(201), 0.03)}
    result, up, view = run(plan_of(3, 4, 1, 2), script)
    assert result.node == 1
    assert [(a.node, a.outcome, a.reason) for a in result.attempts] == [
        (3, "failover", "refused"),
        (4, "failover", "http_502"),
        (1, "pass", "ok"),
    ]
    assert up.discarded == [4]  # a failed head's connection is freed; no head, nothing to free
    assert view.is_down(3, up.calls[0].ended) and view.get(3).reason == "refused"
    assert view.is_down(4, up.calls[1].ended) and view.get(4).reason == "http_502"
    assert not view.is_down(1, T0 + 1)


def test_model_server_errors_are_answers_not_failures():
    for status in (400, 401, 404, 422, 500):
        result, up, view = run(plan_of(3, 4), {3: Step(ok(status))})
        assert result.node == 3 and result.head.status == status
        assert len(up.calls) == 1 and up.discarded == []
        assert view.get(3).state == "up"


def test_every_node_failing_gives_a_retry_after_and_tries_each_once():
    script = {n: Step(failing(503)) for n in (3, 4, 1, 2)}
    result, up, view = run(plan_of(3, 4, 1, 2), script)
    assert result.node is None and result.head is None and not result.client_gone
    assert [c.node for c in up.calls] == [3, 4, 1, 2]
    assert up.discarded == [3, 4, 1, 2]
    # the earliest cooldown end: node 3's, 30 s after its failure
    assert result.retry_after_s == math.ceil(view.get(3).until - up.calls[-1].ended)
    assert result.retry_after_s == 30


def test_client_gone_stops_at_once_and_blames_nobody():
    script = {3: Step(failing(503)), 4: Step("client_gone", 1.5)}
    result, up, view = run(plan_of(3, 4, 1, 2), script)
    assert result.client_gone and result.node is None
    assert result.attempts[-1] == Attempt(4, "gone", "client_gone", None, 1500.0)
    assert not result.attempts[-1].node_failed
    assert [c.node for c in up.calls] == [3, 4]
    assert 4 not in view.nodes  # not marked
    assert result.retry_after_s is None
    assert up.discarded == [3]


def test_client_gone_on_the_first_node_marks_nothing():
    result, up, view = run(plan_of(3, 4), {3: Step("client_gone")})
    assert result.client_gone and view.nodes == {} and not view.dirty
    assert up.discarded == []


def test_a_node_already_up_is_left_alone_on_success():
    view = HealthView()
    before = HealthState("up", since=T0 - 50, at=T0 - 50, latency_ms=5.0)
    view.nodes[3] = before
    run(plan_of(3, 4), {3: Step(ok(), 0.5)}, view)
    assert view.get(3) == before and not view.dirty


def test_a_down_node_that_answers_is_up_again():
    view = HealthView()
    view.nodes[3] = HealthState("down", since=T0 - 50, until=T0 + 10, failures=2, at=T0 - 50)
    run(plan_of(3, 4), {3: Step(ok(), 0.5)}, view)
    h = view.get(3)
    assert (h.state, h.since, h.until, h.latency_ms) == ("up", T0 + 0.5, None, 500.0)
    assert view.dirty


def test_retry_after_header_sets_the_cooldown():
    result, _, view = run(plan_of(3), {3: Step(failing(429, retry="90"), 0.0)})
    assert result.attempts[0].retry_after_s == 90.0
    assert view.get(3).until == T0 + 90
    assert result.retry_after_s == 90


def test_empty_plan_tries_nothing():
    result, up, _ = run(plan_of(), {})
    assert up.calls == [] and result.attempts == [] and result.node is None
    assert result.retry_after_s == int(POLICY.cooldown_base_s)


# ---- deadline and per-attempt time-out -----------------------------------------------------


def test_attempt_time_out_is_capped_by_what_is_left_of_the_deadline():
    script = {3: Step("timeout", 999), 4: Step("timeout", 999), 1: Step(ok())}
    result, up, _ = run(plan_of(3, 4, 1), script, attempt_s=100.0, deadline_in=250.0)
    assert [(c.node, c.timeout_s) for c in up.calls] == [(3, 100.0), (4, 100.0), (1, 50.0)]
    assert result.node == 1


def test_a_time_out_counts_its_full_wait():
    result, _, view = run(plan_of(3, 4), {3: Step(ok(), 5.0)}, attempt_s=2.0)
    assert result.attempts[0] == Attempt(3, "failover", "timeout", None, 2000.0)
    assert view.get(3).reason == "timeout"


def test_no_attempt_is_started_with_min_attempt_s_or_less_left():
    script = {3: Step("refused", 100.0 - MIN_ATTEMPT_S)}
    result, up, _ = run(plan_of(3, 4), script, deadline_in=100.0)
    assert [c.node for c in up.calls] == [3]
    assert result.node is None and len(result.attempts) == 1
    assert result.retry_after_s == 30


def test_an_attempt_starts_with_just_over_min_attempt_s_left():
    script = {3: Step("refused", 100.0 - MIN_ATTEMPT_S - 0.01), 4: Step(ok(), 0.0)}
    result, up, _ = run(plan_of(3, 4), script, deadline_in=100.0)
    assert [c.node for c in up.calls] == [3, 4]
    assert up.calls[1].timeout_s == pytest.approx(MIN_ATTEMPT_S + 0.01)
    assert result.node == 4


def test_deadline_already_past_tries_nothing():
    result, up, _ = run(plan_of(3, 4), {}, deadline_in=-1.0)
    assert up.calls == [] and result.node is None and result.attempts == []


# ---- clock oddities ----------------------------------------------------------------------


def test_attempt_ms_never_negative_when_the_clock_runs_backwards():
    script = {3: Step("refused", -3.0), 4: Step(ok(), -0.5)}
    result, _, view = run(plan_of(3, 4), script)
    assert [a.ms for a in result.attempts] == [0.0, 0.0]
    assert view.get(4).latency_ms == 0.0


def test_ms_is_rounded_to_a_tenth():
    result, _, _ = run(plan_of(3), {3: Step(ok(), 0.123456)})
    assert result.attempts[0].ms == 123.5


# ---- Retry-After of the all-failed 503 ------------------------------------------------------


def down_until(until: float) -> HealthState:
    return HealthState("down", since=T0 - 1, until=until, failures=1, at=T0 - 1)


@pytest.mark.parametrize(
    "t",
    [
        8.3,  # (t + 120) - t == 120.00000000000001
        2_147_483_600.3,  # crosses 2**31: (t + 120) - t == 120.00000023841858
    ],
)
def test_retry_after_of_exactly_120_s_is_120_not_121(t):
    assert (t + 120) - t > 120  # the float error this case is about
    view = HealthView()
    view.nodes[3] = down_until(t + 120)
    assert retry_after(view, (3,), t, POLICY) == 120


@pytest.mark.parametrize("t", [8.3, 2_147_483_600.3])
def test_retry_after_of_a_120_s_header_is_120_end_to_end(t):
    result, _, _ = run(plan_of(3), {3: Step(failing(503, retry="120"), 0.0)}, clock=Clock(t))
    assert result.retry_after_s == 120


@pytest.mark.parametrize(
    ("ends", "expected"),
    [
        ({3: 45.0, 4: 12.3}, 13),  # the earliest, rounded up
        ({3: 0.0001}, 1),  # at least a second
        ({3: 59.9995}, 60),
        ({3: 59.9994}, 60),
        ({3: 7.0}, 7),
    ],
)
def test_retry_after_is_the_earliest_cooldown_end_rounded_up(ends, expected):
    view = HealthView()
    for n, dt in ends.items():
        view.nodes[n] = down_until(T0 + dt)
    assert retry_after(view, tuple(ends), T0, POLICY) == expected


def test_retry_after_reads_only_the_plan_nodes_still_cooling():
    view = HealthView()
    view.nodes[3] = down_until(T0 + 300)
    view.nodes[4] = down_until(T0 - 5)  # over
    view.nodes[5] = down_until(T0 + 2)  # not in the plan
    view.nodes[1] = HealthState("up", since=T0, at=T0)
    assert retry_after(view, (3, 4, 1), T0, POLICY) == 300
    assert retry_after(view, (4, 1), T0, POLICY) == 30  # nobody cooling: the base cooldown
    assert retry_after(view, (), T0, HealthPolicy(cooldown_base_s=12.5)) == 12


# ---- cut ---------------------------------------------------------------------------------


def test_cut_marks_the_node_down_and_records_it():
    view = HealthView()
    view.nodes[3] = HealthState("up", since=T0 - 5000, at=T0 - 5000)
    a = cut(3, health_sync(view), T0, 1234.56)
    assert a == Attempt(3, "cut", "upstream_disconnected", None, 1234.6)
    assert a.node_failed
    h = view.get(3)
    assert (h.state, h.reason, h.until) == ("down", "cut", T0 + 30)
    assert view.dirty


def test_a_stall_is_a_cut_with_its_own_reason():
    view = HealthView()
    a = cut(5, health_sync(view), T0, 61000.0, "upstream_idle")
    assert a == Attempt(5, "cut", "upstream_idle", None, 61000.0)
    assert a.node_failed and view.get(5).state == "down"


def test_cut_ms_never_negative():
    assert cut(3, HealthSync(POLICY), T0, -7.0).ms == 0.0


# ---- properties ------------------------------------------------------------------------------

heads = st.builds(
    failing,
    st.sampled_from([200, 201, 204, 400, 404, 429, 500, 502, 503, 504, 520, 530]),
    st.sampled_from([None, "5", "120", "garbage", "Wed, 21 Oct 2015 07:28:00 GMT"]),
    st.sampled_from([None, None, "", "ERR_NGROK_3200"]),
)
results = st.one_of(
    heads,
    st.sampled_from(["timeout", "refused", "error"]),
    st.just("client_gone"),
)
steps = st.builds(
    Step,
    results,
    st.one_of(st.floats(0, 200), st.floats(-10, 0)),  # sometimes the clock steps back
)
priors = st.sampled_from(
    [
        None,
        HealthState("up", since=T0 - 5000, at=T0 - 5000),
        HealthState("up", since=T0 - 10, at=T0 - 10, failures=2),
        HealthState("down", since=T0 - 10, until=T0 + 20, failures=1, reason="busy", at=T0),
        HealthState("down", since=T0 - 99, until=T0 - 1, failures=3, reason="x", at=T0 - 99),
        HealthState("unknown", at=T0 - 5),
    ]
)
plans = st.lists(st.sampled_from(NODE_NUMBERS), unique=True, max_size=8).map(
    lambda nodes: plan_of(*nodes)
)


def check_run(plan, script, before, attempt_s, deadline_in, start):
    clock = Clock(start)
    view = HealthView()
    view.nodes.update({n: h for n, h in before.items() if h is not None})
    deadline = start + deadline_in
    upstream = FakeUpstream(clock, script)
    result = asyncio.run(
        forward(plan, upstream, health_sync(view), Budget(clock, deadline, attempt_s))
    )
    calls = upstream.calls
    tried = [c.node for c in calls]

    # never the same node twice; the plan's order, from its start
    assert len(set(tried)) == len(tried)
    assert tuple(tried) == plan.nodes[: len(tried)]
    assert [a.node for a in result.attempts] == tried

    # never an attempt started at or past the deadline, nor one that could outlive it
    for c in calls:
        remaining = deadline - c.started
        assert remaining > MIN_ATTEMPT_S
        assert c.timeout_s == min(attempt_s, remaining)
        assert c.started + c.timeout_s <= deadline + 1e-6

    for a, c in zip(result.attempts, calls, strict=True):
        assert a.ms is not None and a.ms >= 0.0
        assert a.ms == round(max(0.0, c.ended - c.started) * 1000, 1)

    gone = [a for a in result.attempts if a.outcome == "gone"]
    passed = [a for a in result.attempts if a.outcome == "pass"]
    failed = [a for a in result.attempts if a.node_failed]
    assert len(gone) + len(passed) <= 1
    assert all(a.outcome == "failover" for a in failed)
    # the loop ends at the first pass or at the client leaving: nothing after either
    if gone or passed:
        assert result.attempts[-1] in gone + passed
        assert failed == result.attempts[:-1]
    if gone:
        assert result.client_gone and result.node is None and result.retry_after_s is None
        assert script[tried[-1]].result == "client_gone"
    elif passed:
        n = passed[0].node
        assert (result.node, result.head) == (n, script[n].result)
        assert result.response == n  # the relayed response is the answering node's own
        assert isinstance(result.head, Head)
        assert match(result.head.status, result.head.fields) is None
        assert result.retry_after_s is None
    else:
        assert result.node is None and not result.client_gone
        # every plan node was tried, or the deadline left no room for the next one
        if len(tried) < len(plan.nodes):
            assert deadline - clock.t <= MIN_ATTEMPT_S
        assert isinstance(result.retry_after_s, int) and result.retry_after_s >= 1
        assert result.retry_after_s == retry_after(view, plan.nodes, clock.t, POLICY)

    # only failed heads are discarded, each once; never the relayed one
    heads_failed = [a.node for a in failed if isinstance(script[a.node].result, Head)]
    heads_failed = [n for n in heads_failed if script[n].took_s <= calls[tried.index(n)].timeout_s]
    assert upstream.discarded == heads_failed
    assert result.node not in upstream.discarded

    # health: each failed node marked down exactly as on_failure says, at its end time;
    # the answering node up; the client leaving and untried nodes leave health alone
    for a, c in zip(result.attempts, calls, strict=True):
        prior = before.get(a.node) or HealthState()
        if a.node_failed:
            expected = hl.on_failure(prior, c.ended, a.reason, POLICY, a.retry_after_s)
            assert view.get(a.node) == expected
            assert view.is_down(a.node, c.ended)
        elif a.outcome == "pass":
            assert view.get(a.node).state == "up"
            if prior.state == "up":
                assert view.get(a.node) == prior
            else:
                assert view.get(a.node) == hl.on_success(prior, c.ended, a.ms)
        else:
            assert view.nodes.get(a.node) == before.get(a.node)
    for n in NODE_NUMBERS:
        if n not in tried:
            assert view.nodes.get(n) == before.get(n)
    return result


@given(
    plan=plans,
    script=st.fixed_dictionaries({n: steps for n in NODE_NUMBERS}),
    before=st.fixed_dictionaries({n: priors for n in NODE_NUMBERS}),
    attempt_s=st.floats(0.01, 300),
    deadline_in=st.floats(-1, 700),
    start=st.sampled_from([T0, 8.3, 2_147_483_600.3]),
)
@settings(max_examples=500, deadline=None)
def test_attempt_loop_properties(plan, script, before, attempt_s, deadline_in, start):
    check_run(plan, script, before, attempt_s, deadline_in, start)


CFG = fleet_config()


@given(
    pair=st.lists(st.sampled_from(NODE_NUMBERS), unique=True, min_size=1, max_size=3),
    fallback=st.lists(st.sampled_from(NODE_NUMBERS), unique=True, max_size=4),
    script=st.fixed_dictionaries({n: steps for n in NODE_NUMBERS}),
    before=st.fixed_dictionaries({n: priors for n in NODE_NUMBERS}),
    turn=st.integers(0, 10),
)
@settings(max_examples=200, deadline=None)
def test_planned_requests_never_reach_a_node_twice(pair, fallback, script, before, turn):
    # the request path as the shell runs it: make_plan, then forward with its time-outs
    view = HealthView()
    view.nodes.update({n: h for n, h in before.items() if h is not None})
    plan = make_plan(Pool("r", tuple(pair), tuple(fallback)), CFG, view, T0, turn)
    assert len(plan.nodes) <= CFG.max_attempts
    check_run(
        plan,
        script,
        before,
        CFG.timeouts.attempt_s,
        CFG.timeouts.deadline_s,
        T0,
    )


@given(st.lists(st.sampled_from(["ok", "timeout", "refused", "busy"]), min_size=1, max_size=8))
@settings(max_examples=100, deadline=None)
def test_the_first_passing_node_is_the_answer(kinds):
    nodes = NODE_NUMBERS[: len(kinds)]
    as_step = {
        "ok": Step(ok()),
        "timeout": Step("timeout", 1.0),
        "refused": Step("refused"),
        "busy": Step(failing(503)),
    }
    result, up, _ = run(plan_of(*nodes), {n: as_step[k] for n, k in zip(nodes, kinds, strict=True)})
    first_ok = kinds.index("ok") if "ok" in kinds else None
    if first_ok is None:
        assert result.node is None and len(up.calls) == len(kinds)
    else:
        assert result.node == nodes[first_ok] and len(up.calls) == first_ok + 1
    assert up.discarded == [
        n for n, k in zip(nodes[: len(up.calls)], kinds, strict=False) if k == "busy"
    ]
    # judge agrees with every recorded outcome
    for a, c in zip(result.attempts, up.calls, strict=True):
        step = as_step[kinds[nodes.index(a.node)]]
        if isinstance(step.result, Head):
            assert a == judge(a.node, step.result, a.ms, c.ended)
