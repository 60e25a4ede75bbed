"""Pure parts of batch work: input validation + shard plan (heady_shared.batchlines) and the
worker's decisions (heady_node.batch_lines)."""

import json
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from heady_node import batch_lines as bl
from heady_shared.batchlines import (
    MAX_LINES,
    LineSplitter,
    Validator,
    is_blank,
    split_lines,
    validate,
)

EP = "/v1/chat/completions"


def req(cid: str, model: str = "m", url: str = EP, **extra: object) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {cid}"}]}
    line = {"custom_id": cid, "method": "POST", "url": url, "body": body, **extra}
    return json.dumps(line).encode() + b"\n"


def codes(verdict) -> list[tuple[str, int | None, str | None]]:
    return [(e.code, e.line, e.param) for e in verdict.errors]


# -- validation -------------------------------------------------------------------------------
def test_good_file_gives_model_total_and_shards() -> None:
    data = b"".join(req(f"r{i}") for i in range(250))
    v = validate(split_lines([data]), EP, shard_lines=100)
    assert v.ok and v.model == "m" and v.total == 250
    assert [(s.first_line, s.n_lines) for s in v.shards] == [(0, 100), (100, 100), (200, 50)]
    assert v.shards[0].offset == 0 and sum(s.length for s in v.shards) == len(data)
    body = v.commit_body()
    assert body["ok"] is True and body["total"] == 250 and len(body["shards"]) == 3
    assert set(body["shards"][0]) == {"offset", "length", "first_line", "n_lines"}


def test_each_kind_of_bad_line_is_reported_with_its_1_based_line_number() -> None:
    lines = [
        req("a"),
        b"{not json\n",
        b"[1, 2]\n",
        req("a"),  # duplicate
        req("b", url="/v1/completions"),
        req("c", method="GET"),
        req("d", model="other"),
        json.dumps({"custom_id": "e", "method": "POST", "url": EP, "body": "x"}).encode() + b"\n",
        json.dumps({"custom_id": 5, "method": "POST", "url": EP, "body": {"model": "m"}}).encode(),
    ]
    v = validate(split_lines([b"".join(lines)]), EP)
    assert not v.ok and v.shards == ()
    assert codes(v) == [
        ("invalid_json_line", 2, None),
        ("invalid_json_line", 3, None),
        ("duplicate_custom_id", 4, "custom_id"),
        ("invalid_url", 5, "url"),
        ("invalid_method", 6, "method"),
        ("mismatched_model", 7, "body.model"),
        ("invalid_body", 8, "body"),
        ("invalid_custom_id", 9, "custom_id"),
    ]
    assert "line 1" in v.errors[5].message  # where the batch's model came from
    body = v.commit_body()
    assert body["ok"] is False and body["errors"][0] == {
        "code": "invalid_json_line",
        "line": 2,
        "message": "this line is not parseable as valid JSON",
        "param": None,
    }


def test_blank_lines_count_in_line_numbers_but_are_not_requests() -> None:
    data = b"\n" + req("a") + b"  \r\n" + b"{bad\n" + b"\n"
    v = validate(split_lines([data]), EP)
    assert codes(v) == [("invalid_json_line", 4, None)]
    good = b"\n" + req("a") + b"\r\n" + req("b")
    v = validate(split_lines([good]), EP, shard_lines=1)
    assert v.ok and v.total == 2
    assert [(s.offset, s.length) for s in v.shards] == [
        (0, 1 + len(req("a")) + 2),
        (1 + len(req("a")) + 2, len(req("b"))),
    ]


def test_empty_file_and_more_than_50000_lines() -> None:
    assert codes(validate(split_lines([b"\n\n"]), EP)) == [("empty_file", None, None)]
    v = Validator(EP)
    line = req("x")  # the same line: only the count matters once it is over the limit
    for i in range(MAX_LINES + 10):
        v.feed(req(f"r{i}") if i < 3 else line.replace(b'"x"', f'"r{i}"'.encode()))
        if v.exhausted:
            break
    verdict = v.finish()
    assert codes(verdict) == [("too_many_requests", MAX_LINES + 1, None)]


def test_too_large_and_error_cap() -> None:
    v = validate(split_lines([req("a") * 3]), EP, max_bytes=len(req("a")) * 2)
    assert ("file_too_large", None, None) in codes(v)
    v = validate(split_lines([b"{\n" * 5000]), EP, max_errors=1000)
    assert len(v.errors) == 1000 and v.errors[-1].line == 1000


def test_validation_memory_stays_flat_for_a_large_streamed_file() -> None:
    # 20 MB of 2 KB requests (a full 100 MB file is 50,000 such lines) in 64 KiB chunks: the
    # peak is the set of ids plus a chunk and a line, not the file.
    pad = "word " * 400

    def chunks():
        n = 0
        for _ in range(320):
            block = []
            for _ in range(32):
                n += 1
                block.append(req(f"id-{n}", extra_text=pad))
            yield b"".join(block)

    tracemalloc.start()
    try:
        v = validate(split_lines(chunks()), EP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert v.ok and v.total == 320 * 32 and sum(s.length for s in v.shards) > 20 * 10**6
    assert peak < 4 * 1024 * 1024


# -- line splitting and the shard plan (hypothesis) -------------------------------------------
lines_st = st.lists(
    st.one_of(
        st.builds(lambda i: req(f"c{i}"), st.integers(0, 10**6)),
        st.sampled_from([b"\n", b"  \n", b"\r\n"]),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    lines=lines_st,
    cuts=st.lists(st.integers(1, 300), max_size=20),
    last_newline=st.booleans(),
)
def test_splitter_gives_back_the_exact_lines_whatever_the_chunking(
    lines: list[bytes], cuts: list[int], last_newline: bool
) -> None:
    data = b"".join(lines)
    if not last_newline and data.endswith(b"\n"):
        data = data[:-1]
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(data[pos : pos + c])
        pos += c
    chunks.append(data[pos:])
    out = list(split_lines(chunks))
    assert b"".join(out) == data
    assert all(x.endswith(b"\n") for x in out[:-1]) and all(b"\n" not in x[:-1] for x in out)


@settings(max_examples=300, deadline=None)
@given(lines=lines_st, shard_lines=st.integers(1, 12))
def test_shard_plan_covers_every_line_exactly_once_with_contiguous_exact_ranges(
    lines: list[bytes], shard_lines: int
) -> None:
    # unique ids so the file is valid whenever it has a request
    seen: set[bytes] = set()
    lines = [x for x in lines if is_blank(x) or (x not in seen and not seen.add(x))]
    data = b"".join(lines)
    v = validate(split_lines([data]), EP, shard_lines=shard_lines)
    requests = [x for x in lines if not is_blank(x)]
    if not requests:
        assert codes(v) == [("empty_file", None, None)]
        return
    assert v.ok and v.total == len(requests)
    pos, index = 0, 0
    for shard in v.shards:
        assert shard.offset == pos and shard.length > 0  # contiguous, from 0
        assert shard.first_line == index
        part = data[shard.offset : shard.offset + shard.length]
        got = [x for x in split_lines([part]) if not is_blank(x)]
        assert got == requests[index : index + shard.n_lines]  # exact: whole lines, in order
        assert 1 <= shard.n_lines <= shard_lines
        pos += shard.length
        index += shard.n_lines
    assert pos == len(data) and index == len(requests)
    assert all(s.n_lines == shard_lines for s in v.shards[:-1])


def test_splitter_keeps_only_the_unfinished_line() -> None:
    s = LineSplitter()
    assert list(s.push(b"ab")) == [] and list(s.push(b"c\nd")) == [b"abc\n"]
    assert list(s.close()) == [b"d"] and list(s.close()) == []


# -- the worker's pure decisions --------------------------------------------------------------
def test_parse_request_refuses_other_paths_and_never_streams() -> None:
    r = bl.parse_request(req("a", stream=None), EP)
    assert r.problem is None and r.url == EP and r.custom_id == "a"
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    line = {"custom_id": "s", "url": EP, "body": body}
    r = bl.parse_request(json.dumps(line).encode(), EP)
    assert r.body == {"model": "m", "stream": False}
    r = bl.parse_request(req("b", url="/pause"), EP)
    assert r.custom_id == "b" and r.url is None and "endpoint" in (r.problem or "")
    assert bl.parse_request(b"{", EP).problem


def test_output_lines_have_the_openai_shape() -> None:
    ok = json.loads(bl.answer_line("a", 200, "rid", {"x": 1}))
    assert set(ok) == {"id", "custom_id", "response", "error"} and ok["error"] is None
    assert ok["id"].startswith("batch_req_") and len(ok["id"]) == len("batch_req_") + 24
    assert ok["response"] == {"status_code": 200, "request_id": "rid", "body": {"x": 1}}
    bad = json.loads(bl.failure_line("b", "timeout", "slow"))
    assert bad["response"] is None and bad["error"] == {"code": "timeout", "message": "slow"}
    assert bl.response_body(b"<html>")["error"]["type"] == "invalid_response"


def test_retry_backoff_and_usage() -> None:
    assert [bl.retryable_status(s) for s in (200, 400, 404, 429, 500, 503)] == [
        False, False, False, True, True, True,
    ]  # fmt: skip
    assert bl.backoff_s(0, 0.5, 8, 0.0) == 0.25 and bl.backoff_s(0, 0.5, 8, 0.999) < 0.5
    assert bl.backoff_s(10, 0.5, 8, 0.999) <= 8 and bl.backoff_s(10, 0.5, 8, 0) == 4
    assert bl.usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 5}}) == (3, 5)
    assert bl.usage_of({"usage": {"prompt_tokens": True}}) == (0, 0) and bl.usage_of([]) == (0, 0)


@given(
    limit=st.integers(1, 64),
    in_flight=st.integers(0, 64),
    waiting=st.integers(0, 100),
    before=st.integers(0, 100),
)
def test_concurrency_rule_stays_in_bounds_and_moves_the_right_way(
    limit: int, in_flight: int, waiting: int, before: int
) -> None:
    lim = bl.Limits(low=1, high=64, step=8)
    new = bl.next_concurrency(limit, in_flight, waiting, before, lim)
    assert 1 <= new <= 64
    if waiting == 0 and in_flight >= limit:
        assert new == min(64, limit + 8)
    elif waiting > before:
        assert new < limit or limit == 1
    else:
        assert new == limit
