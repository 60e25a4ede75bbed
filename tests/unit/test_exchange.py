"""exchange.py: the one JSON log line per request — what it says and what it never says."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attempt import Attempt
from exchange import Exchange

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_relayed_request():
    clock = Clock()
    ex = Exchange("rid-1", "POST", "/api/heavy/code/v1/chat/completions", None, clock)
    ex.role = "code"
    ex.attempts = [
        Attempt(3, "failover", "busy", 503, 12.5, 30.0),
        Attempt(4, "pass", "ok", 200, 40.0),
    ]
    ex.status = 200
    clock.t += 0.0525
    assert ex.log_line() == {
        "msg": "request",
        "request_id": "rid-1",
        "method": "POST",
        "route": "/api/heavy/*",
        "role": "code",
        "status": 200,
        "ms": 52.5,
        "attempts": [
            {"node": 3, "outcome": "failover", "reason": "busy", "status": 503, "ms": 12.5},
            {"node": 4, "outcome": "pass", "reason": "ok", "status": 200, "ms": 40.0},
        ],
    }


def test_a_request_that_never_reached_a_node():
    ex = Exchange("r", "GET", "/api/status", "https://app.example", Clock())
    ex.status = 401
    line = ex.log_line()
    assert line["route"] == "/api/status"
    assert (line["role"], line["attempts"], line["status"], line["ms"]) == (None, [], 401, 0.0)
    assert "error" not in line


def test_the_error_is_logged_only_when_there_is_one():
    ex = Exchange("r", "GET", "/x", None, Clock())
    ex.error = "Traceback (most recent call last): ..."
    assert ex.log_line()["error"] == "Traceback (most recent call last): ..."


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/api/heavy/code/v1/files/file-abc123", "/api/heavy/*"),  # node paths may carry ids
        ("/api/heavy/", "/api/heavy/*"),
        ("/api/heavy", "/api/heavy"),
        ("/healthz", "/healthz"),
        ("/", "/"),
    ],
)
def test_node_paths_are_not_logged(path, route):
    assert Exchange("r", "GET", path, None, Clock()).log_line()["route"] == route


def test_ms_never_negative_when_the_clock_steps_back():
    clock = Clock()
    ex = Exchange("r", "GET", "/healthz", None, clock)
    clock.t -= 5
    assert ex.log_line()["ms"] == 0.0


def test_started_is_when_the_exchange_began():
    clock = Clock()
    ex = Exchange("r", "GET", "/healthz", None, clock)
    clock.t += 10
    assert ex.started == T0
    assert ex.log_line()["ms"] == 10_000.0


@given(
    st.text(alphabet="XYZQ/-_.%", min_size=4, max_size=60),  # letters no other field holds
    st.lists(
        st.builds(
            Attempt,
            st.integers(1, 8),
            st.sampled_from(["pass", "failover", "cut", "gone"]),
            st.sampled_from(["ok", "busy", "refused", "timeout", "client_gone"]),
            st.one_of(st.none(), st.integers(100, 599)),
            st.one_of(st.none(), st.floats(0, 1e6)),
        ),
        max_size=8,
    ),
)
@settings(max_examples=100, deadline=None)
def test_the_line_is_json_and_names_no_heavy_path(rest, attempts):
    ex = Exchange("r", "POST", "/api/heavy/code/" + rest, None, Clock())
    ex.attempts = attempts
    line = ex.log_line()
    text = json.dumps(line, allow_nan=False)
    assert line["route"] == "/api/heavy/*"
    assert len(line["attempts"]) == len(attempts)
    assert not any(c in text for c in "XYZQ")
