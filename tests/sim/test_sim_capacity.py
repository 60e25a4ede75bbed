"""The node's capacity model: at most ``max_num_seqs`` completions run, the rest wait (and say so
in /metrics and /load), and tokens take ``token_s`` each, so throughput saturates as a real
engine's does."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sim.fleet import Fleet, FleetProcess, FleetProcessError
from sim.node import Capacity

# "Hello from sim node 1." is five tokens.
TOKENS = 5
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def node1(fleet: Fleet) -> Iterator[str]:
    yield fleet.url(1)
    fleet.reset()  # back to no limit, no token time (what every other test assumes)


def _gauges(client: httpx.Client, url: str) -> tuple[float, float]:
    text = client.get(url + "/metrics").text
    found = dict(re.findall(r"^vllm:num_requests_(running|waiting)\{[^}]*\} (\S+)$", text, re.M))
    return float(found["running"]), float(found["waiting"])


def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def _throughput(url: str, concurrency: int, total: int) -> float:
    """Completions per second with ``concurrency`` clients (one keep-alive connection each)
    sending ``total`` requests between them."""
    clients = [httpx.Client(timeout=30) for _ in range(concurrency)]

    def client_loop(c: httpx.Client) -> None:
        for _ in range(total // concurrency):
            r = c.post(url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == TOKENS

    for c in clients:  # connect first: only completions are timed
        assert c.get(url + "/health").status_code == 200
    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, clients))
    elapsed = time.monotonic() - start
    for c in clients:
        c.close()
    return total / elapsed


def test_default_capacity_is_unlimited_and_instant(fleet: Fleet) -> None:
    state = fleet.state()["1"]
    assert (state["max_num_seqs"], state["token_s"]) == (None, 0.0)
    assert (state["running"], state["waiting"]) == (0, 0)


def test_throughput_saturates_at_max_num_seqs(fleet: Fleet, node1: str) -> None:
    n, token_s = 4, 0.1  # 0.5 s per completion: client overhead stays small beside it
    fleet.set_capacity(1, max_num_seqs=n, token_s=token_s)
    at_n = _throughput(node1, n, 2 * n)  # two rounds of n
    at_2n = _throughput(node1, 2 * n, 2 * n)  # one round of 2n, half of it queued
    ideal = n / (TOKENS * token_s)  # n sequences, each a completion per TOKENS iterations
    assert 0.6 * ideal < at_n <= 1.05 * ideal
    assert at_2n < 1.25 * at_n  # twice the clients, the same throughput: the engine is full
    # Without the limit, twice the clients do get (about) twice the throughput.
    fleet.set_capacity(1, max_num_seqs=None)
    assert _throughput(node1, 2 * n, 2 * n) > 1.6 * at_n


def test_oversubscribed_node_reports_waiting_requests(
    fleet: Fleet, node1: str, client: httpx.Client
) -> None:
    fleet.set_capacity(1, max_num_seqs=2, token_s=0.1)  # 0.5 s per completion
    stream = {**CHAT, "stream": True}
    with ThreadPoolExecutor(5) as pool:
        futures = [
            pool.submit(httpx.post, node1 + "/v1/chat/completions", json=body, timeout=30)
            for body in (CHAT, stream, CHAT, stream, CHAT)
        ]
        _wait_for(lambda: _gauges(client, node1) == (2.0, 3.0))
        assert client.get(node1 + "/load").json() == {"server_load": 5}
        state = fleet.state()["1"]
        assert (state["running"], state["waiting"]) == (2, 3)
        # A raised limit admits the waiting at once (no request is lost or served twice).
        fleet.set_capacity(1, max_num_seqs=5)
        _wait_for(lambda: _gauges(client, node1) == (5.0, 0.0))
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * 5
    assert all(r.text.endswith("data: [DONE]\n\n") for r in answers[1::2])
    assert _gauges(client, node1) == (0.0, 0.0)
    assert client.get(node1 + "/load").json() == {"server_load": 0}


def test_waiting_request_whose_client_leaves_leaves_the_queue(
    fleet: Fleet, node1: str, client: httpx.Client
) -> None:
    fleet.set_capacity(1, max_num_seqs=1, token_s=0.2)  # 1 s per completion
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, node1 + "/v1/completions", json={"prompt": "a"})
        _wait_for(lambda: _gauges(client, node1) == (1.0, 0.0))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(node1 + "/v1/completions", json={"prompt": "b"}, timeout=0.3)
        _wait_for(lambda: _gauges(client, node1) == (1.0, 0.0))
        assert first.result().status_code == 200
    assert _gauges(client, node1) == (0.0, 0.0)


def test_waiting_adds_to_the_load_set_by_tests(
    fleet: Fleet, node1: str, client: httpx.Client
) -> None:
    fleet.set_load(1, 7)
    fleet.set_capacity(1, max_num_seqs=1, token_s=0.1)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(httpx.post, node1 + "/v1/completions", json={"prompt": "a"})]
        _wait_for(lambda: _gauges(client, node1) == (1.0, 7.0))
        futures.append(pool.submit(httpx.post, node1 + "/v1/completions", json={"prompt": "b"}))
        _wait_for(lambda: _gauges(client, node1) == (1.0, 8.0))
        assert [f.result().status_code for f in futures] == [200, 200]
    assert _gauges(client, node1) == (0.0, 7.0)


def test_reset_restores_the_capacity_the_fleet_started_with() -> None:
    with Fleet(count=2, capacity={2: Capacity(3, 0.01)}) as fleet:
        fleet.set_capacity(2, max_num_seqs=None, token_s=0.5)
        fleet.set_capacity(1, max_num_seqs=8)
        fleet.reset()
        state = fleet.state()
        assert (state["1"]["max_num_seqs"], state["1"]["token_s"]) == (None, 0.0)
        assert (state["2"]["max_num_seqs"], state["2"]["token_s"]) == (3, 0.01)


@pytest.mark.parametrize(
    "params",
    [{"max_num_seqs": 0}, {"max_num_seqs": 1.5}, {"max_num_seqs": True}, {"token_s": -1}],
)
def test_bad_capacity_is_refused(fleet: Fleet, params: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        fleet.set_capacity(1, **params)
    assert fleet.state()["1"]["max_num_seqs"] is None


def test_capacity_over_the_control_api_and_command_line() -> None:
    with FleetProcess(count=2, capacity={2: Capacity(4, 0.05)}) as fleet:
        assert (fleet.state()["2"]["max_num_seqs"], fleet.state()["2"]["token_s"]) == (4, 0.05)
        state = fleet.set_capacity(1, max_num_seqs=2)
        assert (state["max_num_seqs"], state["token_s"]) == (2, 0.0)
        assert fleet.set_capacity(1, token_s=0.02)["max_num_seqs"] == 2  # the other stays
        with pytest.raises(FleetProcessError, match="max_num_seqs must be at least 1"):
            fleet.set_capacity(1, max_num_seqs=0, load=3)
        assert fleet.state()["1"]["load"] == 0  # a bad change does not half-apply
        assert fleet.reset()["1"]["max_num_seqs"] is None


def test_ignore_eos_generates_max_tokens_at_token_s_each(fleet: Fleet, node1: str) -> None:
    """vLLM's ``ignore_eos`` (SamplingParams) runs generation on to ``max_tokens``: the bench
    fixes the output length with it, so a line costs what a real answer of that length would."""
    fleet.set_capacity(1, token_s=0.01)
    body = {**CHAT, "max_tokens": 40, "ignore_eos": True}
    start = time.monotonic()
    answer = httpx.post(node1 + "/v1/chat/completions", json=body, timeout=10).json()
    elapsed = time.monotonic() - start
    assert answer["usage"]["completion_tokens"] == 40
    assert answer["choices"][0]["finish_reason"] == "length"
    assert len(answer["choices"][0]["message"]["content"].split(" ")) == 40
    assert elapsed >= 40 * 0.01
    plain = httpx.post(node1 + "/v1/chat/completions", json={**CHAT, "max_tokens": 40}).json()
    assert plain["usage"]["completion_tokens"] == TOKENS  # without it the answer ends as before
