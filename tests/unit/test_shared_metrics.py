"""heady_shared.metrics: queue depth and the served model from vLLM's /metrics (or a JSON load)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heady_shared.metrics import (
    MAX_LOAD,
    RUNNING,
    WAITING,
    gauge,
    parse_metrics,
    queue_depth,
    served_model,
)

# ---- vLLM metrics and load --------------------------------------------------------------

VLLM = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 5.0
vllm:num_requests_waiting_total{model_name="m"} 99.0
"""


def test_vllm_metrics_waiting_and_running():
    assert queue_depth(VLLM, "text/plain; version=0.0.4") == 5
    metrics = parse_metrics(VLLM)
    assert gauge(metrics, WAITING) == 5
    assert gauge(metrics, RUNNING) == 3
    assert metrics["vllm:num_requests_waiting_total"] == 99.0
    assert gauge(metrics, "vllm:absent") is None


def test_vllm_metrics_several_label_sets_are_summed():
    body = (
        'vllm:num_requests_waiting{model_name="a",engine="0"} 2.0\n'
        'vllm:num_requests_waiting{model_name="b c",engine="1"} 3.0\n'
    )
    assert queue_depth(body, "text/plain") == 5


@pytest.mark.parametrize(
    ("body", "load"),
    [
        ("vllm:num_requests_waiting 7\n", 7),
        ("vllm:num_requests_waiting{} 0.0\n", 0),
        ('vllm:num_requests_waiting{model_name="m"} 1.5e1\n', 15),
        ('vllm:num_requests_waiting{model_name="m"} 4.9\n', 4),
        ('vllm:num_requests_waiting{model_name="m"} 5.0 1700000000000\n', 5),
        ('vllm:num_requests_waiting{model_name="m"}\t6.0\n', 6),
        ("  vllm:num_requests_waiting 3\r\n", 3),  # surrounding whitespace is not a sample
        (f"vllm:num_requests_waiting {MAX_LOAD}\n", MAX_LOAD),
        # an unparseable sample is dropped, the rest still count
        ("vllm:num_requests_waiting 1-2\nvllm:num_requests_waiting 4\n", 4),
    ],
)
def test_vllm_metrics_forms(body, load):
    assert queue_depth(body, None) == load


@pytest.mark.parametrize(
    "body",
    [
        "",
        "vllm:num_requests_running 3.0\n",
        "# vllm:num_requests_waiting 3\n",
        "vllm:num_requests_waiting_total 3\n",
        "vllm:num_requests_waiting -1\n",
        "vllm:num_requests_waiting 1-2\n",
        "vllm:num_requests_waiting NaN\n",
        "vllm:num_requests_waiting +Inf\n",
        "vllm:num_requests_waiting 1e999\n",
        f"vllm:num_requests_waiting {MAX_LOAD + 1}\n",
        "<html>ngrok</html>",
        "OK",
    ],
)
def test_metrics_without_a_usable_waiting_value(body):
    assert queue_depth(body, "text/plain") is None


@pytest.mark.parametrize(
    ("body", "load"),
    [
        ('{"queue_depth": 4}', 4),
        ('{"queue": 2.0}', 2),
        ('{"num_requests_waiting": 0}', 0),
        ('{"waiting": 9, "status": "ok"}', 9),
        ('{"pending": 1}', 1),
        ('{"queue_depth": 4, "pending": 1}', 4),  # first key wins
        ('{"queue_depth": true, "waiting": 3}', 3),  # bools are not numbers
        ('{"queue_depth": "4", "waiting": 3}', 3),
        ('{"queue_depth": null, "waiting": 3}', 3),
        ('  {"queue": 6}', 6),
    ],
)
def test_json_load(body, load):
    assert queue_depth(body, "application/json") == load


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        ('{"status": "ok"}', "application/json"),
        ("[1, 2]", "application/json"),
        ("{not json", "application/json"),
        ("{not json", None),
        ('{"queue": NaN}', "application/json"),
        ('{"queue": Infinity}', "application/json"),
        ('{"queue": 1e999}', "application/json"),
        ('{"queue": null}', "application/json"),
        # the first number decides: an absurd one means "no load", not "look further"
        ('{"queue_depth": -1, "pending": 1}', "application/json"),
        (f'{{"queue": {MAX_LOAD + 1}}}', "application/json"),
        ("vllm:num_requests_waiting 3\n", "application/json"),  # says json, is not
    ],
)
def test_json_without_a_usable_load(body, ctype):
    assert queue_depth(body, ctype) is None


def test_json_detected_without_content_type():
    assert queue_depth('{"queue_depth": 3}', None) == 3
    assert queue_depth('{"queue_depth": 3}', "text/plain") == 3


def test_deeply_nested_json_is_no_load():
    assert queue_depth("{" * 100_000, "application/json") is None
    assert queue_depth('{"a":' * 100_000, None) is None


@given(
    st.text(max_size=200), st.one_of(st.none(), st.sampled_from(["application/json", "text/plain"]))
)
@settings(max_examples=300, deadline=None)
def test_queue_depth_never_raises(body, ctype):
    load = queue_depth(body, ctype)
    assert load is None or (isinstance(load, int) and 0 <= load <= MAX_LOAD)


@given(st.lists(st.floats(0, 10**8), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_queue_depth_sums_label_sets(values):
    body = "".join(
        f'vllm:num_requests_waiting{{model_name="m{i}"}} {v!r}\n' for i, v in enumerate(values)
    )
    assert queue_depth(body, "text/plain; version=0.0.4") == int(sum(values))


# ---- the node's model id from vLLM's metrics labels -------------------------------------


@pytest.mark.parametrize(
    ("text", "model"),
    [
        ('vllm:num_requests_waiting{model_name="Qwen/Qwen2.5-7B"} 0.0\n', "Qwen/Qwen2.5-7B"),
        (
            '# HELP x\nvllm:num_requests_running{engine="0",model_name="org/m-7b-awq"} 1\n',
            "org/m-7b-awq",
        ),
        ('other:metric{model_name="x"} 1\n', None),  # only vLLM's own metrics say it
        ("vllm:num_requests_waiting 3\n", None),
        ('vllm:num_requests_waiting{model_name=""} 3\n', None),
        ('vllm:num_requests_waiting{model_name="a b"} 3\n', None),
        ('vllm:num_requests_waiting{model_name="' + "x" * 129 + '"} 3\n', None),
        ("", None),
    ],
)
def test_served_model_comes_from_vllm_metric_labels(text: str, model: str | None) -> None:
    assert served_model(text) == model
