"""Capability-aware routing: what a request needs, which nodes may get it, how the cron learns
it and how the health record keeps it (pure; CPython)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import capability
import health as hl
from cron import ProbeResult, probe, record_probes
from heady_shared import capabilities as caps
from heady_shared.metrics import queue_depth
from heady_shared.routes import NODE_NUMBERS
from health import HealthState, HealthView, decode, encode
from routing import capable_nodes, make_plan, may_serve
from tests.unit.conftest import fleet_config
from tests.unit.test_cron import Answer, Clock, FakeProber

NOW = 1_700_000_000.0
CFG = fleet_config(MAX_ATTEMPTS="8")
VISION = CFG.pools["vision"]  # pair (5, 6), fallback (1, 2)
ALL = (caps.CHAT, caps.IMAGE_INPUT, caps.IMAGE_GENERATION)
TEXT = (caps.CHAT,)


# ---- what a request needs ---------------------------------------------------------------


def test_path_and_body_decide_the_need() -> None:
    never = lambda: pytest.fail("the body must not be searched")  # noqa: E731
    assert capability.needs("POST", "/v1/images/generations", never) == caps.IMAGE_GENERATION
    assert capability.needs("POST", "/v1/images/edits", never) == caps.IMAGE_GENERATION
    assert capability.needs("GET", "/v1/images/generations", never) is None
    assert capability.needs("POST", "/v1/completions", never) is None
    assert capability.needs("POST", "/v1/embeddings", never) is None
    assert capability.needs("POST", "/v1/chat/completions", lambda: True) == caps.IMAGE_INPUT
    assert capability.needs("POST", "/v1/chat/completions", lambda: False) is None
    assert capability.label(caps.IMAGE_GENERATION) == "image generation"


def _chat(parts) -> bytes:
    return json.dumps(
        {"model": "vision", "messages": [{"role": "user", "content": parts}]}
    ).encode()


def _reader(data: bytes, reads: list[tuple[int, int]] | None = None):
    def read(a: int, b: int) -> bytes:
        if reads is not None:
            reads.append((a, b))
        return data[a:b]

    return read


def test_image_parts_are_found_and_text_is_not_mistaken_for_one() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    found = _chat([{"type": "text", "text": "what is it?"}, image])
    assert capability.contains(_reader(found), len(found), capability.IMAGE_PART)
    # Text that talks about image_url, even quoted: JSON escapes the quotes, so no match.
    text = _chat([{"type": "text", "text": 'the key is "image_url" and image_url'}])
    assert b'\\"image_url\\"' in text
    assert not capability.contains(_reader(text), len(text), capability.IMAGE_PART)
    plain = _chat("just text")
    assert not capability.contains(_reader(plain), len(plain), capability.IMAGE_PART)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.sampled_from([b'"image_url"', b"ab", b"x"]),
    st.integers(min_value=1, max_value=40),
)
def test_windowed_search_equals_in(data: bytes, needle: bytes, window: int) -> None:
    reads: list[tuple[int, int]] = []
    got = capability.contains(_reader(data, reads), len(data), needle, window)
    assert got == (needle in data)
    # Never more than one window (plus the overlap) copied at a time.
    assert all(b - a <= max(window, len(needle)) for a, b in reads)


def test_a_needle_straddling_every_window_boundary_is_found() -> None:
    needle = capability.IMAGE_PART
    for window in (11, 12, 16, 64):
        for pos in range(0, 3 * window):
            data = b"-" * pos + needle + b"-" * 40
            assert capability.contains(_reader(data), len(data), needle, window), (window, pos)


def test_a_5mb_image_chat_costs_little_cpu() -> None:
    """The measured number (docs/images.md): CPython here; the Worker's Pyodide adds one copy
    per 1 MiB window out of the JS buffer."""
    b64 = "A" * (5 * 1024 * 1024)
    early = _chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}])
    late = _chat([{"type": "text", "text": b64}, {"type": "image_url", "image_url": {"url": "x"}}])
    text = _chat([{"type": "text", "text": b64}])
    timings = {}
    for name, body in (("early", early), ("late", late), ("text", text)):
        start = time.process_time()
        for _ in range(5):
            capability.contains(_reader(body), len(body), capability.IMAGE_PART)
        timings[name] = (time.process_time() - start) / 5 * 1000
    assert capability.contains(_reader(late), len(late), capability.IMAGE_PART)
    assert not capability.contains(_reader(text), len(text), capability.IMAGE_PART)
    start = time.process_time()
    json.loads(text)
    timings["json.loads"] = (time.process_time() - start) * 1000
    print("byte search ms (cpu):", {k: round(v, 2) for k, v in timings.items()})
    assert timings["early"] < 5 and timings["text"] < 50


# ---- which nodes may get it -------------------------------------------------------------


def view_with(known: dict[int, tuple[str, ...] | None], down: set[int] = frozenset()) -> HealthView:
    v = HealthView()
    for n, c in known.items():
        if n in down:
            v.nodes[n] = HealthState("down", since=NOW - 5, until=NOW + 30, failures=1, at=NOW,
                                     capabilities=c)  # fmt: skip
        else:
            v.nodes[n] = HealthState("up", since=NOW - 50, at=NOW - 50, capabilities=c)
    for n in down - set(known):
        v.nodes[n] = HealthState("down", since=NOW - 5, until=NOW + 30, failures=1, at=NOW)
    return v


def test_the_issue_cases() -> None:
    learned = {1: TEXT, 2: TEXT, 3: TEXT, 4: TEXT, 5: ALL, 6: ALL}
    v = view_with(learned)
    # Images and vision chat: the pair only, never the text-only fallback.
    for need in (caps.IMAGE_GENERATION, caps.IMAGE_INPUT):
        p = make_plan(VISION, CFG, v, NOW, 0, need)
        assert set(p.nodes) == {5, 6} and p.capable == (5, 6) and p.need == need
    # Text chat on vision still falls back to 1-2.
    assert make_plan(VISION, CFG, v, NOW, 0).nodes == (5, 6, 1, 2)
    # The vision pair down: nothing to try, so the gateway says no_capable_node.
    v = view_with(learned, down={5, 6})
    p = make_plan(VISION, CFG, v, NOW, 0, caps.IMAGE_GENERATION)
    assert p.nodes == () and p.capable == (5, 6)
    assert make_plan(VISION, CFG, v, NOW, 0).nodes == (1, 2, 5, 6)  # text: as before
    # Nothing learned yet: tried as today.
    fresh = make_plan(VISION, CFG, HealthView(), NOW, 0, caps.IMAGE_GENERATION)
    assert fresh.nodes == (5, 6, 1, 2) and fresh.capable == ()


CAP_STATES = (None, (), TEXT, (caps.CHAT, caps.IMAGE_INPUT), ALL)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.sampled_from(NODE_NUMBERS), st.sampled_from(CAP_STATES)),
    st.sets(st.sampled_from(NODE_NUMBERS)),
    st.sampled_from((None, caps.CHAT, caps.IMAGE_INPUT, caps.IMAGE_GENERATION)),
    st.integers(min_value=0, max_value=3),
    st.sampled_from(sorted(CFG.pools)),
)
def test_plan_invariants(known, down, need, turn, role) -> None:
    v = view_with(known, down)
    pool = CFG.pools[role]
    p = make_plan(pool, CFG, v, NOW, turn, need)
    base = make_plan(pool, CFG, v, NOW, turn)
    # Only nodes that may serve it, in the order the plan would have tried them anyway.
    assert all(may_serve(v, n, need) for n in p.nodes)
    assert list(p.nodes) == [n for n in base.nodes if n in p.nodes]
    if need is None:
        assert p == base
        return
    up = [n for n in base.nodes if may_serve(v, n, need) and not v.is_down(n, NOW)]
    if up:
        assert [n for n in p.nodes if not v.is_down(n, NOW)] == up[: len(p.nodes)]
        assert p.nodes[0] in up
    else:
        assert p.nodes == ()  # never a node known to lack it, never a down one as last resort
    assert p.capable == capable_nodes(CFG, v, need)
    assert all(need in (v.capabilities(n) or ()) for n in p.capable)


def test_may_serve_table() -> None:
    for have, need in itertools.product(CAP_STATES, (None, *ALL)):
        v = view_with({3: have})
        expected = need is None or have is None or need in have
        assert may_serve(v, 3, need) is expected, (have, need)


# ---- how the cron learns it, how the record keeps it ------------------------------------

PROM = (
    'vllm:num_requests_waiting{model_name="Qwen/Qwen2-VL-2B-Instruct"} 2.0\n'
    'heady_images:num_requests_waiting{model_name="stabilityai/sd-turbo"} 3\n'
    + caps.exposition((caps.CHAT, caps.IMAGE_INPUT))
    + caps.exposition((caps.IMAGE_GENERATION,), header=False)
)


def test_the_cron_reads_capabilities_and_the_image_queue() -> None:
    clock = Clock(NOW)
    prober = FakeProber(clock, {(5, "/metrics"): Answer(body=PROM)})
    r = asyncio.run(probe(CFG, prober, 5, clock))
    assert r.capabilities == ALL and r.model == "Qwen/Qwen2-VL-2B-Instruct"
    assert r.load == 5  # vLLM's 2 waiting + the image engine's 3
    assert r.log()["capabilities"] == list(ALL)
    plain = FakeProber(clock, {(3, "/metrics"): Answer(body="vllm:num_requests_waiting 1\n")})
    r = asyncio.run(probe(CFG, plain, 3, clock))
    assert r.capabilities is None and r.load == 1  # a plain vLLM: unknown, not "nothing"
    assert queue_depth("heady_images:num_requests_waiting 4\n", None) is None


def test_fold_keeps_what_was_learned_and_shares_a_change() -> None:
    v = HealthView()
    record_probes(v, [ProbeResult(5, True, "ok", 10.0, 0, "m", ALL)], NOW, CFG)
    assert v.capabilities(5) == ALL
    v.dirty = False
    # A probe that says nothing about capabilities keeps the last ones.
    record_probes(v, [ProbeResult(5, True, "ok", 10.0, 0, "m", None)], NOW + 1, CFG)
    assert v.capabilities(5) == ALL and not v.dirty
    # The image engine stopped: news, written to KV.
    record_probes(v, [ProbeResult(5, True, "ok", 10.0, 0, "m", (caps.CHAT,))], NOW + 2, CFG)
    assert v.capabilities(5) == (caps.CHAT,) and v.dirty
    # A failed probe keeps them too (a node coming back is expected to serve as before).
    record_probes(v, [ProbeResult(5, False, "refused")], NOW + 3, CFG)
    assert v.capabilities(5) == (caps.CHAT,)


def test_kv_record_round_trip_and_bounds() -> None:
    v = HealthView()
    v.nodes[5] = hl.with_probe(HealthState("up", since=NOW, at=NOW), NOW, 0, 5.0, "m", ALL)
    v.nodes[1] = hl.with_probe(HealthState("up", since=NOW, at=NOW), NOW, 0, 5.0, "m", ())
    v.nodes[2] = hl.with_probe(HealthState("up", since=NOW, at=NOW), NOW, 0, 5.0, "m")
    raw, _ = encode(v, NOW)
    back, _ = decode(raw, NOW)
    assert (
        back[5].capabilities == ALL and back[1].capabilities == () and back[2].capabilities is None
    )
    assert '"c"' not in json.dumps(json.loads(raw)["nodes"]["2"])
    # Hostile or corrupt values: unknown names dropped, non-lists say nothing, never large.
    data = json.loads(raw)
    for bad, expected in (
        (["chat", "root", "chat", 7, None], ("chat",)),
        ("image_generation", None),
        ({"chat": 1}, None),
        (["x"] * 10_000, None),
        (["image_generation", "image_input"], ("image_input", "image_generation")),
    ):
        data["nodes"]["5"]["c"] = bad
        got, _ = decode(json.dumps(data), NOW)
        assert got[5].capabilities == expected, bad


def test_a_changed_capability_is_not_covered_by_an_older_record() -> None:
    policy = CFG.health
    mine = HealthState("up", since=NOW, at=NOW, capabilities=ALL)
    theirs = HealthState("up", since=NOW, at=NOW - 1, capabilities=TEXT)
    assert not hl.covers(theirs, mine, policy)
    assert hl.covers(HealthState("up", since=NOW, at=NOW - 1, capabilities=ALL), mine, policy)
