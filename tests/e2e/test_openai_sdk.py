"""The gateway driven by the official `openai` Python SDK, as clients really use it.

base_url = gateway + /api/heavy/<role>/v1, api_key = the client key, model = the role name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import API_KEY, NODE_TOKEN

MESSAGES = [{"role": "user", "content": "hello there"}]


def sdk(gateway, role: str, *, key: str = API_KEY) -> openai.OpenAI:
    # max_retries=0: the SDK must see the gateway's first answer, not retry around it.
    return openai.OpenAI(
        base_url=f"{gateway.url}/api/heavy/{role}/v1", api_key=key, max_retries=0, timeout=20
    )


def async_sdk(gateway, role: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{gateway.url}/api/heavy/{role}/v1", api_key=API_KEY, max_retries=0, timeout=20
    )


@pytest.fixture
def fresh(gateway, fleet) -> Iterator[None]:
    fleet.reset()
    gateway.reset()
    yield
    fleet.reset()


def test_models_list(gateway, fleet, fresh):
    with sdk(gateway, "code") as client:
        page = client.models.list()
    ids = [m.id for m in page.data]
    assert "code" in ids  # the role is a model every node of the pair answers to
    assert ids in (list(fleet.served_names(3)), list(fleet.served_names(4)))


def test_chat_non_streaming(gateway, fresh):
    with sdk(gateway, "reasoning") as client:
        out = client.chat.completions.create(model="reasoning", messages=MESSAGES)
    assert out.object == "chat.completion"
    assert out.model == "reasoning"
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content.startswith("Hello from sim node")
    assert out.usage is not None and out.usage.total_tokens > 0


def test_chat_streaming(gateway, fresh):
    with sdk(gateway, "vision") as client:
        stream = client.chat.completions.create(
            model="vision",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from sim node")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None


def test_completions(gateway, fresh):
    with sdk(gateway, "batch") as client:
        out = client.completions.create(model="batch", prompt="Say hi", max_tokens=3)
    assert out.object == "text_completion"
    assert out.model == "batch"
    assert out.choices[0].finish_reason == "length"
    assert len(out.choices[0].text.split()) == 3


def _kill_streams(fleet, nodes, after=3):
    for n in nodes:
        fleet.set(n, "stream_reset", after=after, interval=0.02)


def test_mid_stream_node_death_raises_sync(gateway, fleet, fresh):
    _kill_streams(fleet, (3, 4))
    got: list[str] = []
    with sdk(gateway, "code") as client, pytest.raises(openai.APIError) as info:
        stream = client.chat.completions.create(model="code", messages=MESSAGES, stream=True)
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert got, "the events before the node died were relayed"
    assert "Hello" in "".join(got)
    # the gateway's error event, not a transport error of the SDK's own
    assert not isinstance(info.value, openai.APIConnectionError), repr(info.value)


def test_mid_stream_node_death_raises_async(gateway, fleet, fresh):
    _kill_streams(fleet, (3, 4))

    async def run() -> list[str]:
        got: list[str] = []
        async with async_sdk(gateway, "code") as client:
            stream = await client.chat.completions.create(
                model="code", messages=MESSAGES, stream=True
            )
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        return got

    with pytest.raises(openai.APIError) as info:
        asyncio.run(run())
    assert not isinstance(info.value, openai.APIConnectionError), repr(info.value)


def test_clean_stream_end_without_done_is_not_an_error(gateway, fleet, fresh):
    # `transformers serve` never sends [DONE]: the SDK just sees the stream end.
    for n in (5, 6):
        fleet.set(n, "stream_eof", after=4)
    with sdk(gateway, "vision") as client:
        chunks = list(
            client.chat.completions.create(model="vision", messages=MESSAGES, stream=True)
        )
    assert len(chunks) == 4


def test_fallback_answers_the_role_name_when_the_pair_is_down(gateway, fleet, fresh):
    fleet.set(3, "refuse")
    fleet.set(4, "status", status=503)
    with sdk(gateway, "code") as client:
        raw = client.chat.completions.with_raw_response.create(model="code", messages=MESSAGES)
    out = raw.parse()
    assert raw.headers["x-heady-node"] == "1"
    assert raw.headers["x-heady-fallback"] == "true"
    assert out.model == "code"
    assert "node 1" in out.choices[0].message.content


def test_pair_partner_with_another_model_still_answers_the_role(gateway, fleet, fresh):
    # Nodes 3 and 4 got different GPUs, so different checkpoints; both answer to "code".
    assert fleet.served_names(3)[0] != fleet.served_names(4)[0]
    seen = set()
    with sdk(gateway, "code") as client:
        for _ in range(4):
            raw = client.chat.completions.with_raw_response.create(model="code", messages=MESSAGES)
            assert raw.parse().model == "code"
            seen.add(raw.headers["x-heady-node"])
    assert seen == {"3", "4"}
    fleet.set(3, "refuse")
    with sdk(gateway, "code") as client:
        raw = client.chat.completions.with_raw_response.create(model="code", messages=MESSAGES)
    assert (raw.headers["x-heady-node"], raw.parse().model) == ("4", "code")


def test_wrong_key_is_authentication_error(gateway, fresh):
    with (
        sdk(gateway, "code", key="not-a-key") as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.models.list()
    assert info.value.status_code == 401
    assert NODE_TOKEN not in str(info.value.body)


def test_unknown_model_is_not_found_error(gateway, fresh):
    with sdk(gateway, "code") as client, pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 404
    assert "gpt-4o" in str(info.value.message)


def test_unknown_role_is_not_found_error(gateway, fresh):
    with sdk(gateway, "poetry") as client, pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="poetry", messages=MESSAGES)


def test_all_nodes_down_is_a_503_status_error(gateway, fleet, fresh):
    fleet.set_all("refuse")
    with sdk(gateway, "code") as client, pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="code", messages=MESSAGES)
    assert info.value.status_code == 503
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.response.headers["retry-after"]
