"""errors.py: the one error body shape."""

from __future__ import annotations

import json

import pytest

from errors import REASON, error_body


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
