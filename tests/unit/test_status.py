"""status.py: the GET /api/status body — every node's configuration and health, the route
table and the configuration problems, with no URL, token or key in it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import load_config
from heady_shared.routes import NODE_NUMBERS
from health import LOAD_TTL_S, HealthState, HealthView
from status import iso, status_body
from tests.unit.conftest import fleet_env

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
NODE_KEYS = {
    "model",
    "node",
    "roles",
    "config",
    "config_reason",
    "state",
    "since",
    "until",
    "reason",
    "failures",
    "latency_ms",
    "load",
    "capabilities",
    "checked_at",
}
SECRETS = ("secret-tunnel", "tok-SECRET", "client-KEY")


def env(**extra: str) -> dict[str, str | None]:
    secrets = {"NODE_TOKEN": "tok-SECRET", "GATEWAY_API_KEYS": "client-KEY"}
    return fleet_env("https://secret-tunnel-{n}.ngrok-free.app", **(secrets | extra))


def body(view: HealthView | None = None, now: float = NOW, **extra: str) -> dict:
    out = status_body(load_config(env(**extra)), view or HealthView(), now, "rid-1", "1.2.3")
    json.dumps(out, allow_nan=False)  # it is sent as JSON
    return out


def node(b: dict, n: int) -> dict:
    (entry,) = [e for e in b["nodes"] if e["node"] == n]
    return entry


def test_iso():
    assert iso(NOW) == "2023-11-14T22:13:20Z"
    assert iso(NOW + 0.999) == "2023-11-14T22:13:20Z"
    assert iso(None) is None


def test_gateway_block_and_shape():
    b = body()
    assert b["gateway"] == {
        "version": "1.2.3",
        "request_id": "rid-1",
        "auth": "on",
        "time": "2023-11-14T22:13:20Z",
        "stream_relay": "native",
        "stream_idle_s": 60.0,
    }
    assert [e["node"] for e in b["nodes"]] == list(NODE_NUMBERS)
    assert all(set(e) == NODE_KEYS for e in b["nodes"])
    assert b["problems"] == []
    assert body(AUTH_DISABLED="true")["gateway"]["auth"] == "disabled"
    assert b["batches"] is None  # the shell passes batches.status_view (test_batch_status.py)
    guarded = body(STREAM_RELAY="guarded", STREAM_IDLE_S="0")["gateway"]
    assert (guarded["stream_relay"], guarded["stream_idle_s"]) == ("guarded", 0.0)


def test_batches_are_passed_through():
    view = {"running": 2, "mine": []}
    out = status_body(load_config(env()), HealthView(), NOW, "rid-1", "1.2.3", view)
    assert out["batches"] == view


def test_a_node_nobody_has_seen():
    assert node(body(), 3) == {
        "node": 3,
        "roles": ["code"],
        "config": "configured",
        "config_reason": None,
        "state": "unknown",
        "since": None,
        "until": None,
        "reason": None,
        "failures": 0,
        "latency_ms": None,
        "load": None,
        "model": None,
        "capabilities": None,
        "checked_at": None,
    }


def test_a_node_cooling_down():
    v = HealthView()
    v.nodes[4] = HealthState(
        "down", since=NOW - 60, until=NOW + 30, failures=2, reason="busy", at=NOW - 60
    )
    e = node(body(v), 4)
    assert e["state"] == "down" and e["reason"] == "busy" and e["failures"] == 2
    assert (e["since"], e["until"]) == (iso(NOW - 60), iso(NOW + 30))


def test_a_cooldown_that_is_over_is_unknown_without_an_until():
    v = HealthView()
    v.nodes[4] = HealthState("down", since=NOW - 60, until=NOW, failures=2, reason="busy")
    e = node(body(v), 4)
    assert (e["state"], e["until"], e["reason"]) == ("unknown", None, "busy")


def test_an_up_node_with_its_measurements():
    v = HealthView()
    v.nodes[5] = HealthState(
        "up",
        since=NOW - 600,
        at=NOW - 5,
        latency_ms=42.5,
        load=3,
        load_at=NOW - 5,
        checked_at=NOW - 5,
    )
    e = node(body(v), 5)
    assert (e["state"], e["latency_ms"], e["load"]) == ("up", 42.5, 3)
    assert (e["since"], e["checked_at"]) == (iso(NOW - 600), iso(NOW - 5))


@pytest.mark.parametrize(("age", "load"), [(LOAD_TTL_S, 3), (LOAD_TTL_S + 1, None)])
def test_a_stale_load_is_not_shown(age, load):
    v = HealthView()
    v.nodes[5] = HealthState("up", since=NOW - 9999, load=3, load_at=NOW - age)
    assert node(body(v), 5)["load"] == load


def test_invalid_and_unconfigured_nodes_say_why_and_are_never_up_or_down():
    v = HealthView()
    v.nodes[2] = HealthState("down", since=NOW, until=NOW + 30, failures=1, at=NOW)
    v.nodes[7] = HealthState("up", since=NOW, at=NOW)
    b = body(v, COLAB_ENDPOINT_2="http://secret-tunnel-2.example", COLAB_ENDPOINT_7="")
    two, seven = node(b, 2), node(b, 7)
    assert (two["config"], two["state"]) == ("invalid", "unknown")
    assert "plain http" in two["config_reason"]
    assert (seven["config"], seven["config_reason"], seven["state"]) == (
        "unconfigured",
        "secret not set",
        "unknown",
    )
    assert b["problems"] == [f"COLAB_ENDPOINT_2: {two['config_reason']}"]


def test_roles_are_each_nodes_own_pair():
    b = body()
    assert [node(b, n)["roles"] for n in NODE_NUMBERS] == [
        ["reasoning"],
        ["reasoning"],
        ["code"],
        ["code"],
        ["vision"],
        ["vision"],
        ["batch"],
        ["batch"],
    ]
    assert b["routes"]["code"] == {"pair": [3, 4], "fallback": [1, 2]}
    assert list(b["routes"]) == ["reasoning", "code", "vision", "batch"]


def test_remapped_routes():
    b = body(ROUTES='{"roles": {"chat": [2, 5], "embed": [5, 6]}, "fallback": [8]}')
    assert node(b, 5)["roles"] == ["chat", "embed"]
    assert node(b, 8)["roles"] == []  # fallback only: no role of its own
    assert node(b, 1)["roles"] == []
    assert b["routes"] == {
        "chat": {"pair": [2, 5], "fallback": [8]},
        "embed": {"pair": [5, 6], "fallback": [8]},
    }


def test_bad_routes_show_as_a_problem_with_no_routes():
    b = body(ROUTES='{"roles": {"code": [9]}}', MAX_ATTEMPTS="99")
    assert b["routes"] == {}
    assert all(e["roles"] == [] for e in b["nodes"])
    assert b["problems"][0].startswith("MAX_ATTEMPTS:")  # problems first, then fatal ones
    assert b["problems"][-1].startswith("ROUTES.roles.code")


def test_no_secret_in_the_body():
    v = HealthView()
    v.nodes[1] = HealthState("down", since=NOW, until=NOW + 30, failures=1, reason="x", at=NOW)
    text = json.dumps(body(v, COLAB_ENDPOINT_3="https://user:secret-tunnel@h.example"))
    assert not any(s in text for s in SECRETS)
    assert "ngrok-free.app" not in text


states = st.one_of(
    st.none(),
    st.builds(
        HealthState,
        state=st.sampled_from(["up", "down", "unknown"]),
        since=st.one_of(st.none(), st.floats(NOW - 1e6, NOW)),
        until=st.one_of(st.none(), st.floats(NOW - 100, NOW + 1000)),
        failures=st.integers(0, 50),
        reason=st.one_of(st.none(), st.sampled_from(["busy", "refused", "cut"])),
        at=st.floats(0, NOW),
        latency_ms=st.one_of(st.none(), st.floats(0, 1e6)),
        load=st.one_of(st.none(), st.integers(0, 10**6)),
        load_at=st.one_of(st.none(), st.floats(NOW - 2 * LOAD_TTL_S, NOW)),
        checked_at=st.one_of(st.none(), st.floats(NOW - 1e6, NOW)),
    ),
)


@given(st.fixed_dictionaries({n: states for n in NODE_NUMBERS}))
@settings(max_examples=150, deadline=None)
def test_every_view_gives_a_json_body_that_agrees_with_the_view(by_node):
    v = HealthView()
    v.nodes.update({n: h for n, h in by_node.items() if h is not None})
    b = body(v)
    text = json.dumps(b, allow_nan=False)
    assert not any(s in text for s in SECRETS)
    for e in b["nodes"]:
        n = e["node"]
        assert e["state"] == v.effective_state(n, NOW)
        assert (e["until"] is not None) == v.is_down(n, NOW)
        assert e["load"] == v.load(n, NOW)
        assert e["failures"] == v.get(n).failures
