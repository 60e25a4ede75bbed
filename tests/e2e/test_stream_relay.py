"""STREAM_RELAY and STREAM_IDLE_S in the real offline runtime (workerd 1.20241106).

- guarded (a JS TransformStream): a node that goes silent mid-stream for STREAM_IDLE_S ends
  the client's stream with one `upstream_idle` error event (the openai SDK raises APIError),
  within STREAM_IDLE_S + 1 s of the node's last event, and counts against the node, even
  when aborting the node's fetch throws (as the offline runtime's does now and then);
- native (an IdentityTransformStream): the same stall and a node that dies are logged as cuts
  and counted; the client's stream ends. (The final event itself needs workerd v1.20260619 or
  later, which production runs: offline the runtime errors the relay's writable side with
  the node's body, so the client sees a clean end: docs/stream-relay-research.md.)
- either way, a slow but live stream (an event every STREAM_IDLE_S / 2) is never cut, and
  /api/status says which relay runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from harness.gateway import Gateway, build_config
from tests.e2e.conftest import API_KEY, CHAT_PATH, chat, fleet_bindings

IDLE_S = 2.0


def _gateway(fleet, mode: str) -> Iterator[Gateway]:
    bindings = fleet_bindings(fleet, STREAM_RELAY=mode, STREAM_IDLE_S=str(IDLE_S))
    with Gateway(build_config(bindings=bindings)) as gw:
        yield gw


@pytest.fixture(scope="module")
def guarded(fleet) -> Iterator[Gateway]:
    yield from _gateway(fleet, "guarded")


@pytest.fixture(scope="module")
def native(fleet) -> Iterator[Gateway]:
    yield from _gateway(fleet, "native")


@pytest.fixture
def nodes(fleet) -> Iterator[object]:
    fleet.reset()
    yield fleet
    fleet.reset()


def _stall(fleet, nodes=(3, 4)) -> None:
    """The node sends its first event, then nothing for 4 x IDLE_S (then dies)."""
    for n in nodes:
        fleet.set(n, "stream_reset", after=2, interval=4 * IDLE_S)


def _read(gw: Gateway, rid: str) -> tuple[list[str], float, float]:
    """A streamed chat completion for role "code": (event data, seconds from the first event
    to the end, total seconds)."""
    headers = {"authorization": f"Bearer {API_KEY}", "x-request-id": rid}
    body = chat("code", stream=True, max_tokens=4)
    events: list[str] = []
    t0 = time.monotonic()
    first = None
    with (
        httpx.Client(base_url=gw.url, timeout=30) as http,
        http.stream("POST", CHAT_PATH % "code", headers=headers, json=body) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                first = first or time.monotonic()
    end = time.monotonic()
    return events, end - (first or t0), end - t0


def _cut(gw: Gateway, rid: str) -> dict | None:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        for rec in gw.log_records():
            if rec.get("request_id") == rid:
                cuts = [a for a in rec.get("attempts", []) if a["outcome"] == "cut"]
                if cuts:
                    return cuts[0]
        time.sleep(0.05)
    return None


def _status(gw: Gateway) -> dict:
    auth = {"authorization": f"Bearer {API_KEY}"}
    return httpx.get(gw.url + "/api/status", headers=auth, timeout=10).json()


def _failures(gw: Gateway, node: int) -> int:
    status = _status(gw)
    return next(x["failures"] for x in status["nodes"] if x["node"] == node)


def test_status_says_which_relay_runs(guarded, native):
    for gw, mode in ((guarded, "guarded"), (native, "native")):
        block = _status(gw)["gateway"]
        assert (block["stream_relay"], block["stream_idle_s"]) == (mode, IDLE_S)


def test_guarded_stall_ends_with_an_idle_error_event(guarded, nodes):
    guarded.reset()
    _stall(nodes)
    events, after_first, _ = _read(guarded, "idle-g-1")
    assert len(events) == 2, events  # the node's first event, then the gateway's
    err = json.loads(events[-1])["error"]
    assert (err["type"], err["code"], err["request_id"]) == ("upstream_idle", 502, "idle-g-1")
    assert IDLE_S <= after_first <= IDLE_S + 1.0, after_first
    cut = _cut(guarded, "idle-g-1")
    assert cut and cut["reason"] == "upstream_idle", cut
    assert _failures(guarded, cut["node"]) >= 1


def test_guarded_stall_ends_even_when_aborting_the_node_throws(fleet, nodes):
    """The offline runtime's fetch abort now and then throws under load (CI saw the stream
    left open, then ended clean with no error event): the harness makes it always throw."""
    bindings = fleet_bindings(
        fleet, STREAM_RELAY="guarded", STREAM_IDLE_S=str(IDLE_S), HARNESS_ABORT_FAULT="1"
    )
    with Gateway(build_config(bindings=bindings)) as gw:
        _stall(nodes)
        events, after_first, _ = _read(gw, "idle-f-1")
        assert len(events) == 2, events
        assert json.loads(events[-1])["error"]["type"] == "upstream_idle", events
        assert IDLE_S <= after_first <= IDLE_S + 1.0, after_first
        assert _cut(gw, "idle-f-1")
        errors = [r.get("error") for r in gw.log_records() if r.get("request_id") == "idle-f-1"]
        # (the harness's error, or the runtime's own "Error: internal error" thrown first)
        said = "the node sent nothing for STREAM_IDLE_S; aborting it failed: "
        assert any(e and e.startswith(said) and "internal error" in e for e in errors), errors


def test_guarded_stall_raises_api_error_in_the_sdk(guarded, nodes):
    guarded.reset()
    _stall(nodes)
    client = openai.OpenAI(
        base_url=f"{guarded.url}/api/heavy/code/v1", api_key=API_KEY, max_retries=0, timeout=20
    )
    with client, pytest.raises(openai.APIError) as info:
        stream = client.chat.completions.create(
            model="code", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        for _ in stream:
            pass
    assert not isinstance(info.value, openai.APIConnectionError), repr(info.value)
    assert "STREAM_IDLE_S" in str(info.value)


@pytest.mark.parametrize("relay", ["guarded", "native"])
def test_a_slow_but_live_stream_is_never_cut(relay, guarded, native, nodes):
    gw = guarded if relay == "guarded" else native
    gw.reset()
    for n in (3, 4):  # every event IDLE_S / 2 apart, then [DONE]
        nodes.set(n, "stream_eof", after=1000, interval=IDLE_S / 2)
    events, after_first, _ = _read(gw, f"live-{relay}")
    assert events[-1] == "[DONE]", events
    assert not any("error" in json.loads(e) for e in events[:-1])
    assert after_first >= 2 * IDLE_S  # it really was slow: several silences of IDLE_S / 2
    assert _cut(gw, f"live-{relay}") is None


def test_native_stall_is_cut_within_the_idle_limit(native, nodes):
    native.reset()
    _stall(nodes)
    events, after_first, _ = _read(native, "idle-n-1")
    assert "[DONE]" not in events
    cut = _cut(native, "idle-n-1")
    assert cut and cut["reason"] == "upstream_idle", cut
    # Cut (the node's fetch aborted) within the limit plus a second of the relay's start...
    assert IDLE_S * 1000 <= cut["ms"] <= (IDLE_S + 1.0) * 1000, cut
    # ...but offline the client's stream then has no writable side to close: the runtime
    # ends it when it sees the request can do nothing more ("The script will never generate
    # a response"), about a second later. Production's runtime writes the event at once.
    assert IDLE_S <= after_first <= IDLE_S + 2.5, after_first
    assert _failures(native, cut["node"]) >= 1


def test_native_node_death_is_logged_and_counted(native, nodes):
    native.reset()
    for n in (3, 4):
        nodes.set(n, "stream_reset", after=3, interval=0.02)
    events, _, total = _read(native, "dead-n-1")
    assert total < 5 and "[DONE]" not in events
    assert 3 <= len(events) <= 4, events  # what the node sent (+ the event, where possible)
    cut = _cut(native, "dead-n-1")
    assert cut and cut["reason"] == "upstream_disconnected", cut
    assert _failures(native, cut["node"]) >= 1
