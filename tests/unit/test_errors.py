"""errors.py: the one error body shape, and the SSE event that ends a broken stream."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from errors import REASON, error_body, sse_error_event


@pytest.mark.parametrize("status", sorted(REASON))
def test_default_type_per_status(status):
    body = json.loads(error_body(status, "msg", "rid-1"))
    assert body == {"error": {"type": REASON[status], "message": "msg", "request_id": "rid-1"}}


def test_explicit_type_and_extra_fields():
    body = json.loads(error_body(503, "no node", "rid", "all_nodes_failed", attempts=[{"node": 3}]))
    assert body["error"] == {
        "type": "all_nodes_failed",
        "message": "no node",
        "request_id": "rid",
        "attempts": [{"node": 3}],
    }


def test_unknown_status_is_generic_error():
    assert json.loads(error_body(418, "x", "r"))["error"]["type"] == "error"


def test_compact_and_escaped():
    raw = error_body(400, 'quote " and \n newline', "r")
    assert ", " not in raw and ": " not in raw
    assert json.loads(raw)["error"]["message"] == 'quote " and \n newline'


def test_408_is_request_timeout():
    assert json.loads(error_body(408, "slow upload", "r"))["error"]["type"] == "request_timeout"


def sse_events(stream: str) -> list[dict[str, str]]:
    """Events as an EventSource dispatches them (html.spec.whatwg.org, "Interpreting an
    event stream"): lines up to a blank line form an event; "field: value" with one
    optional space after the colon; data lines joined by newlines; an event with no data
    is not dispatched."""
    events, current = [], {}
    for line in stream.replace("\r\n", "\n").split("\n"):
        if line == "":
            if "data" in current:
                events.append(current)
            current = {}
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            current["data"] = current["data"] + "\n" + value if "data" in current else value
        elif field:
            current[field] = value
    return events


def test_sse_error_event_is_one_event_in_the_openai_error_shape():
    (event,) = sse_events(sse_error_event("rid-7"))
    assert json.loads(event["data"]) == {
        "error": {
            "message": "the node's stream broke off; the answer is incomplete",
            "type": "upstream_disconnected",
            "code": 502,
            "request_id": "rid-7",
        }
    }


def test_a_stalled_stream_ends_with_its_own_error_type():
    (event,) = sse_events(sse_error_event("rid-8", "upstream_idle"))
    err = json.loads(event["data"])["error"]
    assert (err["type"], err["code"], err["request_id"]) == ("upstream_idle", 502, "rid-8")
    assert "STREAM_IDLE_S" in err["message"]


@pytest.mark.parametrize(
    "half_written",
    [
        "",
        'data: {"choices": [{"delta": {"content": "Hel',
        "data: {}\n",
        "event: ping",
        'data: {"id": 1}\n\ndata: {"id"',
    ],
)
def test_sse_error_event_ends_a_half_written_event_first(half_written):
    events = sse_events(half_written + sse_error_event("r"))
    assert "error" in json.loads(events[-1]["data"])  # the client's last event is the error
    assert events[-1]["data"].count("\n") == 0


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_sse_error_event_framing_survives_any_request_id(rid):
    # a request id is a sane token in practice; even if not, JSON escaping keeps it on one line
    (event,) = sse_events(sse_error_event(rid))
    assert json.loads(event["data"])["error"]["request_id"] == rid
