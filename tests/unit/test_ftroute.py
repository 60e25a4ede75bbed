"""Fine-tuned models on the forward path (pure; CPython): which requests are `ft:` ones, the
body the node gets (the model renamed to the adapter's slug), `/v1/models` merged with the
caller's models, and the plan: only nodes serving LoRA on the adapter's base, any role."""

from __future__ import annotations

import json
import time

import capability
import ftroute
from heady_shared import capabilities as caps
from heady_shared.ftnames import checkpoint_name, ft_model_name, slug
from health import HealthState, HealthView
from routing import make_plan
from tests.unit.conftest import fleet_config

NOW = 1_700_000_000.0
CFG = fleet_config(MAX_ATTEMPTS="8")
BASE = "Qwen/Qwen2.5-1.5B-Instruct"
NAME = ft_model_name(BASE, "heady", "0123456789abcdef01234567")
SLUG = slug(NAME)


def _search(body: bytes) -> bool:
    return capability.contains(lambda a, b: body[a:b], len(body), ftroute.NEEDLE)


def test_only_a_top_level_ft_model_is_one() -> None:
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    body = json.dumps(chat).encode()
    assert _search(body)
    assert ftroute.requested_model(body) == (NAME, chat)
    # The byte search never hits a body without `"ft:` (no parse, no I/O for it).
    plain = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "say ft:"}]})
    assert not _search(plain.encode())
    # A hit that is not the model (a value "ft:...", a quoted `\"ft:` in a text) costs a
    # parse, no more.
    for content in (NAME, 'say "ft:'):
        other = json.dumps({"model": BASE, "messages": [{"role": "user", "content": content}]})
        assert _search(other.encode()) and ftroute.requested_model(other.encode()) is None
    assert ftroute.requested_model(b"not json") is None
    assert ftroute.requested_model(b'["ft:x"]') is None
    assert ftroute.requested_model(b'{"model": 3, "x": "ft:"}') is None


def test_the_node_gets_the_slug_spliced_or_re_encoded() -> None:
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for text in (
        json.dumps(chat),
        json.dumps(chat, indent=2),
        json.dumps(chat, separators=(",", ":")),
    ):
        body = text.encode()
        out = ftroute.rewrite_model(body, chat, NAME, SLUG)
        assert json.loads(out) == {**chat, "model": SLUG}
        assert out == body.replace(json.dumps(NAME).encode(), json.dumps(SLUG).encode())  # spliced
    # Spelled with escapes (`\/`): not found as bytes, re-encoded, still right.
    escaped = json.dumps(chat).replace("/", "\\/").encode()
    assert json.loads(ftroute.rewrite_model(escaped, chat, NAME, SLUG)) == {**chat, "model": SLUG}
    # The name also as another key's value elsewhere: only the model changes.
    extra = {**chat, "metadata": {"model": NAME}}
    got = json.loads(ftroute.rewrite_model(json.dumps(extra).encode(), extra, NAME, SLUG))
    assert got["model"] == SLUG and got["metadata"] == {"model": NAME}


def test_splicing_a_large_body_costs_far_less_than_re_encoding_it() -> None:
    big = "x" * 4_000_000
    chat = {"model": NAME, "messages": [{"role": "user", "content": big}]}
    body = json.dumps(chat).encode()
    start = time.process_time()
    out = ftroute.rewrite_model(body, chat, NAME, SLUG)
    splice_ms = (time.process_time() - start) * 1000
    start = time.process_time()
    json.dumps({**chat, "model": SLUG}).encode()
    encode_ms = (time.process_time() - start) * 1000
    print(f"4 MB body: splice {splice_ms:.1f} ms, re-encode {encode_ms:.1f} ms (cpu)")
    assert out.startswith(body[:200].replace(json.dumps(NAME).encode(), json.dumps(SLUG).encode()))
    assert splice_ms < 100


def test_a_checkpoint_is_an_ft_model_sent_under_its_own_slug() -> None:
    ckpt = checkpoint_name(NAME, 88)
    chat = {"model": ckpt, "messages": [{"role": "user", "content": "hi"}]}
    body = json.dumps(chat).encode()
    assert _search(body) and ftroute.requested_model(body) == (ckpt, chat)
    out = ftroute.rewrite_model(body, chat, ckpt, slug(ckpt))
    assert json.loads(out)["model"] == slug(ckpt) != SLUG
    assert slug(ckpt).startswith("ft-ckpt-0123456789abcdef01234567-88-")


def test_models_merge_appends_mine_and_drops_other_adapters() -> None:
    node = {
        "object": "list",
        "data": [
            {"id": BASE, "object": "model"},
            {"id": slug("ft:x:heady:y:abc"), "object": "model", "parent": BASE},
            {"id": slug(checkpoint_name(NAME, 4)), "object": "model", "parent": BASE},
        ],
    }
    mine = [{"id": NAME, "object": "model", "created": 1, "owned_by": "heady", "parent": BASE}]
    merged = json.loads(ftroute.merge_models(json.dumps(node), mine) or "")
    assert [m["id"] for m in merged["data"]] == [BASE, NAME]
    assert ftroute.merge_models("oops", mine) is None
    assert ftroute.merge_models('{"data": 1}', mine) is None


def _view(nodes: dict[int, tuple[tuple[str, ...] | None, str | None]], down=()) -> HealthView:
    v = HealthView()
    for n, (c, model) in nodes.items():
        if n in down:
            v.nodes[n] = HealthState("down", since=NOW - 5, until=NOW + 30, failures=1, at=NOW,
                                     capabilities=c, model=model)  # fmt: skip
        else:
            v.nodes[n] = HealthState("up", since=NOW - 50, at=NOW - 50, capabilities=c, model=model)
    return v


def test_an_ft_plan_is_the_nodes_with_lora_on_its_base_whatever_the_role() -> None:
    lora = (caps.CHAT, caps.LORA)
    v = _view(
        {
            1: (lora, "other/base"),  # LoRA, another base
            2: ((caps.CHAT,), BASE),  # the base, no LoRA
            3: (None, BASE),  # unknown capabilities: not trusted with an adapter
            7: (lora, BASE),
            8: (lora, BASE),
        }
    )
    reasoning = CFG.pools["reasoning"]
    p = make_plan(reasoning, CFG, v, NOW, 0, caps.LORA, BASE)
    assert set(p.nodes) == {7, 8} and p.capable == (7, 8) and p.need == caps.LORA
    assert all(p.is_fallback(n) for n in p.nodes) == (not {7, 8} & set(reasoning.pair))
    # None up: empty plan (the shell's 503 no_capable_node), the capable ones named.
    down = make_plan(reasoning, CFG, _view({7: (lora, BASE)}, down={7}), NOW, 0, caps.LORA, BASE)
    assert down.nodes == () and down.capable == (7,)
    # Nothing learned: nothing to try.
    assert make_plan(reasoning, CFG, HealthView(), NOW, 0, caps.LORA, BASE).nodes == ()
    # Without a base nothing changes.
    assert make_plan(reasoning, CFG, v, NOW, 0) == make_plan(reasoning, CFG, v, NOW, 0, None, None)
