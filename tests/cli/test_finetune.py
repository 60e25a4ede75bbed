"""`heady finetune` / `heady ft` against a mocked gateway (pytest-httpx): every request compared
with the one the openai SDK sends for the same call, the local check of a training file, the
watch (progress, losses, events, backoff, exit codes), error lines; and the pure helpers."""

import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pytest_httpx import HTTPXMock
from rich.console import Console

from heady_cli import batch, finetune
from heady_cli.main import main
from tests.cli.conftest import GW, KEY, T0, FakeClock, cli_env, oai_error

ROOT = f"{GW}/api/heavy/batch/v1"
JID = "ftjob-0123456789abcdef01234567"
JOB_URL = f"{ROOT}/fine_tuning/jobs/{JID}"
EVENTS = re.compile(rf"{re.escape(JOB_URL)}/events\?.*")
TRAIN, VALID = "file-aaaaaaaaaaaaaaaaaaaaaaaa", "file-bbbbbbbbbbbbbbbbbbbbbbbb"
BASE = "Qwen/Qwen2.5-1.5B-Instruct"
MODEL = f"ft:{BASE}:heady:support:0123456789abcdef01234567"


def example(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": f"a{i}"}]}  # fmt: skip


def jsonl(objs: list) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


GOOD = jsonl([example(i) for i in range(12)])


def job_obj(status: str, **extra) -> dict:
    obj = {
        "id": JID, "object": "fine_tuning.job", "created_at": int(T0), "error": None,
        "fine_tuned_model": None, "finished_at": None,
        "hyperparameters": {"batch_size": "auto", "learning_rate_multiplier": "auto",
                            "n_epochs": "auto"},
        "model": BASE, "organization_id": "heady", "result_files": [], "seed": 7,
        "status": status, "trained_tokens": None, "training_file": TRAIN,
        "validation_file": None, "estimated_finish": None, "integrations": None,
        "metadata": None, "user_provided_suffix": "support",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
    }  # fmt: skip
    if status in finetune.TERMINAL_EXIT:
        obj["finished_at"] = int(T0) + 300
    obj.update(extra)
    return obj


def event(n: int, message: str, t: float, kind: str = "message", level: str = "info",
          data: dict | None = None) -> dict:  # fmt: skip
    return {"id": f"ftevent-{n:024d}", "object": "fine_tuning.job.event", "created_at": int(t),
            "level": level, "message": message, "type": kind, "data": data}  # fmt: skip


def metrics(n: int, step: int, total: int, loss: float, t: float, valid: float | None = None):
    data = {"step": step, "total_steps": total, "train_loss": loss}
    text = f"Step {step}/{total}: training loss={loss:.4f}"
    if valid is not None:
        data["valid_loss"] = valid
        text += f", validation loss={valid:.4f}"
    return event(n, text, t, "metrics", data=data)


def page(items: list[dict], has_more: bool = False) -> dict:
    return {"object": "list", "data": items, "has_more": has_more}


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeClock:
    return cli_env(monkeypatch, tmp_path, finetune)


def one_error_line(err: str) -> str:
    """The error is the last stderr line, and the only `heady: error` one."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("heady: error: "), err
    assert sum(line.startswith("heady: error") for line in lines) == 1, err
    assert "Traceback" not in err, err
    return lines[-1]


# --- the SDK's own requests ----------------------------------------------------------------


def sdk_requests(call: Callable) -> list[tuple[str, str, bytes]]:
    """(method, URL, body with the multipart boundary neutralised) of every request the
    official openai SDK sends for `call(client)`, answered by a stub."""
    import httpx2
    from openai import OpenAI

    seen: list[tuple[str, str, bytes]] = []

    def handler(req):
        seen.append((req.method, str(req.url), unboundary(req.read(), req.headers)))
        if req.url.path.endswith("/files"):
            return httpx2.Response(200, json=FILE_OBJ)
        if req.method == "GET" and not req.url.path.endswith(JID):
            return httpx2.Response(200, json=page([]))
        return httpx2.Response(200, json=job_obj("validating_files"))

    client = OpenAI(base_url=ROOT, api_key=KEY,
                    http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))  # fmt: skip
    call(client)
    return seen


FILE_OBJ = {"id": TRAIN, "object": "file", "bytes": 1, "created_at": 1, "filename": "x",
            "purpose": "fine-tune", "status": "processed"}  # fmt: skip


def unboundary(body: bytes, headers) -> bytes:
    ctype = headers.get("content-type", "")
    if "boundary=" not in ctype:
        return body
    return body.replace(ctype.split("boundary=")[1].encode(), b"BOUNDARY")


def ours(httpx_mock: HTTPXMock) -> list[tuple[str, str, bytes]]:
    reqs = httpx_mock.get_requests()
    for r in reqs:
        assert r.headers["authorization"] == f"Bearer {KEY}"
    return [(r.method, str(r.url), unboundary(r.read(), r.headers)) for r in reqs]


# --- create --------------------------------------------------------------------------------


def test_create_uploads_and_creates_exactly_as_the_sdk(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    (tmp_path / "train.jsonl").write_bytes(GOOD)
    (tmp_path / "valid.jsonl").write_bytes(jsonl([example(i) for i in range(3)]))
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": TRAIN})
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": VALID})
    httpx_mock.add_response(method="POST", url=f"{ROOT}/fine_tuning/jobs",
                            json=job_obj("validating_files"))  # fmt: skip
    args = ["ft", "create", "train.jsonl", "--model", BASE, "--suffix", "support",
            "--validation", "valid.jsonl", "--epochs", "3", "--batch-size", "8",
            "--lr-multiplier", "0.5", "--seed", "7", "--metadata", "team=ml",
            "--metadata", "run=a=b"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == f"{JID}\n"  # stdout: just the id, for scripts
    assert "train.jsonl: 12 examples, structure ok" in err
    assert "valid.jsonl: 3 examples, structure ok" in err
    assert f"heady ft watch {JID}" in err and KEY not in out + err

    def sdk(client) -> None:
        with (tmp_path / "train.jsonl").open("rb") as fh:
            client.files.create(file=fh, purpose="fine-tune")
        with (tmp_path / "valid.jsonl").open("rb") as fh:
            client.files.create(file=fh, purpose="fine-tune")
        client.fine_tuning.jobs.create(
            model=BASE, training_file=TRAIN, metadata={"team": "ml", "run": "a=b"},
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "batch_size": 8, "learning_rate_multiplier": 0.5, "n_epochs": 3}}},
            seed=7, suffix="support", validation_file=VALID,
        )  # fmt: skip

    got = ours(httpx_mock)
    assert got == sdk_requests(sdk)  # method, URL and body, byte for byte
    assert got[0][2].startswith(
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    )
    assert json.loads(got[2][2])["validation_file"] == VALID


def test_create_with_only_a_model_leaves_the_rest_to_auto(
    httpx_mock: HTTPXMock, tmp_path: Path
) -> None:
    (tmp_path / "t.jsonl").write_bytes(GOOD)
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": TRAIN})
    httpx_mock.add_response(method="POST", url=f"{ROOT}/fine_tuning/jobs",
                            json=job_obj("validating_files"))  # fmt: skip
    assert main(["finetune", "create", "t.jsonl", "--model", BASE]) == 0
    method = {"type": "supervised", "supervised": {"hyperparameters": {}}}
    expected = sdk_requests(
        lambda c: c.fine_tuning.jobs.create(model=BASE, training_file=TRAIN, method=method)
    )
    assert ours(httpx_mock)[1] == expected[0]


BAD_FILES = [
    (jsonl([example(0), example(1)]) + b"{not json\n" + jsonl([example(i) for i in range(10)]),
     "t.jsonl: Line 3: is not valid JSON (nothing was uploaded)"),
    (jsonl([example(i) for i in range(3)]),
     "t.jsonl: the file has 3 valid examples; at least 10 are required (nothing was uploaded)"),
    (jsonl([*[example(i) for i in range(10)],
            {"messages": [{"role": "bot", "content": "x"}]}]),
     "t.jsonl: Line 11: example messages[0].role is 'bot'; expected one of assistant, system, "
     "tool, user (nothing was uploaded)"),
    (jsonl([*[example(i) for i in range(10)],
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]},
                          {"role": "assistant", "content": "x", "weight": True}]}]),
     "t.jsonl: Line 11: example messages[0].content[0] is not a text part (only text is "
     "trained on) (nothing was uploaded)"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "line"), BAD_FILES)
def test_create_refuses_a_bad_file_before_uploading(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys, content: bytes, line: str
) -> None:
    (tmp_path / "t.jsonl").write_bytes(content)
    assert main(["ft", "create", "t.jsonl", "--model", BASE]) == 2
    assert one_error_line(capsys.readouterr().err) == f"heady: error: {line}"
    assert httpx_mock.get_requests() == []


def test_create_lists_the_problems_of_a_file_with_many(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    lines = [example(i) for i in range(10)] + [{"messages": []}] * 30 + [{"x": 1}]
    (tmp_path / "t.jsonl").write_bytes(GOOD)
    (tmp_path / "v.jsonl").write_bytes(jsonl(lines))
    assert main(["ft", "create", "t.jsonl", "--model", BASE, "--validation", "v.jsonl"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) == (
        "heady: error: v.jsonl is not a valid validation file: 31 problems (nothing was uploaded)"
    )
    problems = [x for x in err.splitlines() if x.startswith("  v.jsonl: Line ")]
    assert len(problems) == finetune.SHOWN_PROBLEMS
    assert problems[0] == "  v.jsonl: Line 11: example has no `messages` list (expected a " \
        "non-empty list of chat messages)"  # fmt: skip
    assert "  ... and 11 more" in err
    assert httpx_mock.get_requests() == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--suffix", "a:b"], "--suffix: suffix must be 1 to 64 characters of a-z"),
        (["--suffix", "My.Model"], "--suffix: suffix must be 1 to 64 characters of a-z"),
        (["--lr-multiplier", "0"], "--lr-multiplier: learning_rate_multiplier must be"),
        (["--lr-multiplier", "nan"], "--lr-multiplier: learning_rate_multiplier must be"),
        (["--epochs", "51"], "--epochs: n_epochs must be 'auto' or an integer 1-50"),
        (["--batch-size", "257"], "--batch-size: batch_size must be 'auto' or an integer 1-256"),
        (["--seed", "2147483648"], "--seed: seed must be an integer 0-2147483647"),
        (["--metadata", "novalue"], "--metadata wants KEY=VALUE"),
        (["--role", "../files"], "not a role name"),
        (["--model", f"{MODEL}"], "--model: fine-tuning an 'ft:' model is not supported"),
    ],
)
def test_create_refuses_bad_flags_before_uploading(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    (tmp_path / "t.jsonl").write_bytes(GOOD)
    assert main(["ft", "create", "t.jsonl", "--model", BASE, *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert httpx_mock.get_requests() == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [(lambda p: None, "cannot read"), (lambda p: p.write_bytes(b""), "is empty"),
     (lambda p: p.mkdir(), "is not a file")],
)  # fmt: skip
def test_create_unreadable_file(tmp_path: Path, capsys, setup, message: str) -> None:
    setup(tmp_path / "t.jsonl")
    assert main(["ft", "create", "t.jsonl", "--model", BASE]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_create_refused_by_the_gateway_deletes_both_uploads(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    (tmp_path / "t.jsonl").write_bytes(GOOD)
    (tmp_path / "v.jsonl").write_bytes(GOOD)
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": TRAIN})
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": VALID})
    bad = oai_error("model 'm' cannot be fine-tuned here; trainable: q", "model_not_available",
                    "rid-7")  # fmt: skip
    httpx_mock.add_response(method="POST", url=f"{ROOT}/fine_tuning/jobs", status_code=400,
                            json=bad)  # fmt: skip
    httpx_mock.add_response(method="DELETE", url=f"{ROOT}/files/{TRAIN}", json={"deleted": True})
    httpx_mock.add_response(method="DELETE", url=f"{ROOT}/files/{VALID}", status_code=500)
    assert main(["ft", "create", "t.jsonl", "--model", "m", "--validation", "v.jsonl"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"heady: note: uploaded file {VALID} was kept" in err
    assert one_error_line(err) == (
        "heady: error: model 'm' cannot be fine-tuned here; trainable: q (request id rid-7)"
    )


def test_create_and_watch_prints_the_id_then_the_model(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    (tmp_path / "t.jsonl").write_bytes(GOOD)
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": TRAIN})
    httpx_mock.add_response(method="POST", url=f"{ROOT}/fine_tuning/jobs",
                            json=job_obj("validating_files"))  # fmt: skip
    done = job_obj("succeeded", fine_tuned_model=MODEL, trained_tokens=12345)
    httpx_mock.add_response(url=JOB_URL, json=done)
    httpx_mock.add_response(url=EVENTS, json=page([event(1, "The job has successfully "
                                                         "completed", T0 + 299)]))  # fmt: skip
    assert main(["ft", "create", "t.jsonl", "--model", BASE, "--watch"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{JID}\n{MODEL}\n"
    assert "The job has successfully completed" in err
    assert f"job {JID} succeeded in 5:00, 12,345 trained tokens" in err


# --- watch ---------------------------------------------------------------------------------


def run_of_events() -> list[list[dict]]:
    """What the events endpoint holds at each poll (newest first), growing."""
    history = [event(1, "Validating training file: " + TRAIN, T0)]
    polls = [list(history)]
    history.insert(0, event(2, "Training started", T0 + 30))
    history.insert(0, metrics(3, 1, 12, 2.5, T0 + 40))
    polls.append(list(history))
    polls.append(list(history))  # nothing new
    history.insert(0, metrics(4, 4, 12, 1.75, T0 + 70, valid=1.9))
    history.insert(0, metrics(5, 5, 12, 1.5, T0 + 80))
    polls.append(list(history))
    return polls


@pytest.mark.parametrize(("final", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 1)])
def test_watch_plain_lines_events_and_exit_code(
    httpx_mock: HTTPXMock, capsys, env: FakeClock, final: str, code: int
) -> None:
    env.t = T0 + 100
    statuses = ["validating_files", "running", "running", "running"]
    polls = run_of_events()
    for status, events in zip(statuses, polls, strict=True):
        httpx_mock.add_response(url=JOB_URL, json=job_obj(status))
        httpx_mock.add_response(url=EVENTS, json=page(events[: finetune.EVENTS_FIRST]))
    err_obj = {"code": "training_failed", "message": "Training failed: CUDA out of\nmemory",
               "param": None}  # fmt: skip
    extra = {"succeeded": {"fine_tuned_model": MODEL, "trained_tokens": 999},
             "failed": {"error": err_obj}, "cancelled": {}}[final]  # fmt: skip
    httpx_mock.add_response(url=JOB_URL, json=job_obj(final, **extra))
    last = event(6, f"Job {final}", T0 + 299, level="error" if final == "failed" else "info")
    httpx_mock.add_response(url=EVENTS, json=page([last, *polls[-1]]))
    assert main(["ft", "watch", JID]) == code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0] == f"08:00:00 Validating training file: {TRAIN}"
    assert lines[1].split()[:3] == [JID, "validating_files", "step"]
    assert lines[2:4] == ["08:00:30 Training started", f"{JID}  running  step 1/12  train loss "
                          "2.5000  elapsed 1:41 · - steps/s · ETA -"]  # fmt: skip
    # the unchanged poll printed nothing; then steps 4 and 5 arrived at once
    assert lines[4] == (
        f"{JID}  running  step 5/12  train loss 1.5000 · valid loss 1.9000  "
        "elapsed 1:43 · 0.1 steps/s · ETA 1:10"
    )
    level = "error: " if final == "failed" else ""
    assert lines[5] == f"08:04:59 {level}Job {final}"
    assert lines[6].startswith(f"{JID}  {final}  step 5/12")
    if final == "succeeded":
        assert out == f"{MODEL}\n"
        assert lines[7] == (
            f"job {JID} succeeded in 5:00, 999 trained tokens, final train loss 1.5000 · valid "
            "loss 1.9000"
        )
        assert f"heady ft checkpoints {JID}" in err
    elif final == "failed":
        assert out == ""
        assert lines[7] == (
            f"job {JID} failed after 5:00: Training failed: CUDA out of memory [training_failed]"
        )
    else:
        assert out == "" and lines[7] == f"job {JID} cancelled after 5:00"
    # backoff as batch watch, back to 1 s when the status moves; capped at POLL_MAX_S
    assert env.sleeps == [1.0, 1.0, 1.0, 1.5]
    events_params = [dict(r.url.params) for r in httpx_mock.get_requests() if "events" in
                     r.url.path]  # fmt: skip
    assert events_params[0] == {"limit": "20"}  # the first poll: one page, as context
    assert events_params[1] == {"limit": "20"}  # (no after: the newest page, cut at the last)


def test_watch_requests_are_the_sdks(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=JOB_URL, json=job_obj("running"))
    httpx_mock.add_response(url=EVENTS, json=page([event(1, "x", T0)]))
    httpx_mock.add_response(url=JOB_URL, json=job_obj("cancelled"))
    httpx_mock.add_response(url=EVENTS, json=page([event(2, "y", T0 + 1), event(1, "x", T0)]))
    assert main(["ft", "watch", JID]) == 1
    expected = sdk_requests(lambda c: (
        c.fine_tuning.jobs.retrieve(JID), c.fine_tuning.jobs.list_events(JID, limit=20),
        c.fine_tuning.jobs.retrieve(JID), c.fine_tuning.jobs.list_events(JID, limit=20),
    ))  # fmt: skip
    assert ours(httpx_mock) == expected


def test_watch_pages_back_to_the_last_event_shown(httpx_mock: HTTPXMock, capsys) -> None:
    httpx_mock.add_response(url=JOB_URL, json=job_obj("running"))
    httpx_mock.add_response(url=EVENTS, json=page([event(0, "first", T0)]))
    httpx_mock.add_response(url=JOB_URL, json=job_obj("running"))
    # 150 new events since: the newest 20, then 100 more, then the rest down to event 0
    new = [event(n, f"e{n}", T0 + n) for n in range(150, 0, -1)]
    httpx_mock.add_response(url=EVENTS, json=page(new[:20], has_more=True))
    httpx_mock.add_response(url=EVENTS, json=page(new[20:120], has_more=True))
    httpx_mock.add_response(url=EVENTS, json=page([*new[120:], event(0, "first", T0)]))
    httpx_mock.add_response(url=JOB_URL, json=job_obj("cancelled"))
    httpx_mock.add_response(url=EVENTS, json=page([new[0]], has_more=True))
    assert main(["ft", "watch", JID]) == 1
    shown = [x.split()[1] for x in capsys.readouterr().err.splitlines() if ":" in x[:3]]
    assert shown == ["first", *[f"e{n}" for n in range(1, 151)]]  # each once, in order
    after = [dict(r.url.params).get("after") for r in httpx_mock.get_requests()
             if "events" in r.url.path]  # fmt: skip
    assert after == [None, None, new[19]["id"], new[119]["id"], None]
    paged = [(m, u, b) for m, u, b in ours(httpx_mock) if "after=" in u]
    assert paged == sdk_requests(lambda c: [
        c.fine_tuning.jobs.list_events(JID, after=new[i]["id"], limit=100) for i in (19, 119)
    ])  # fmt: skip


def test_watch_says_when_it_skipped_events(
    httpx_mock: HTTPXMock, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finetune, "MAX_EVENT_PAGES", 2)
    httpx_mock.add_response(url=JOB_URL, json=job_obj("running"))
    httpx_mock.add_response(url=EVENTS, json=page([event(0, "first", T0)]))
    httpx_mock.add_response(url=JOB_URL, json=job_obj("cancelled"))
    httpx_mock.add_response(url=EVENTS, json=page([event(9, "e9", T0 + 9)], has_more=True))
    httpx_mock.add_response(url=EVENTS, json=page([event(8, "e8", T0 + 8)], has_more=True))
    assert main(["ft", "watch", JID]) == 1
    err = capsys.readouterr().err
    assert f"... earlier events skipped: heady ft events {JID}\n08:00:08 e8\n08:00:09 e9" in err


def test_watch_rich_bar_shows_steps_losses_rate_and_eta(
    httpx_mock: HTTPXMock, env: FakeClock
) -> None:
    # metrics at +40 (step 1) and +80 (step 5): 0.1 step/s, 7 steps left -> ETA 1:10
    env.t = T0 + 80
    events = [metrics(3, 5, 12, 1.5, T0 + 80), metrics(2, 1, 12, 2.5, T0 + 40, valid=2.75),
              event(1, "Training [started]", T0 + 30)]  # fmt: skip
    httpx_mock.add_response(url=JOB_URL, json=job_obj("running"))
    httpx_mock.add_response(url=EVENTS, json=page(events))
    httpx_mock.add_response(url=JOB_URL, json=job_obj("succeeded", fine_tuned_model=MODEL))
    httpx_mock.add_response(url=EVENTS, json=page([metrics(4, 12, 12, 0.5, T0 + 150), *events]))
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, color_system=None, width=160)
    api = batch.Api(GW, KEY, "batch", 5.0)
    job, progress = finetune.watch(api, JID, finetune.LiveDisplay(console, JID))
    assert job.status == "succeeded" and progress.step == 12
    text = sink.getvalue()
    header = f"{JID} (Ctrl-C stops watching; the job keeps running)\n"
    assert text.index(header) < text.index("08:00:30 Training [started]")  # not rich markup
    assert JID in text and "running" in text and "5/12" in text
    assert "loss 1.5000 · val 2.7500" in text and "1:20 elapsed · 0.1/s · ETA 1:10" in text
    # ended: its own run's rate (steps 1 -> 12 over 110 s), the time to finished_at
    assert "12/12" in text and "loss 0.5000" in text and "5:00 elapsed · 0.1/s · ETA 0:00" in text


def test_watch_retries_transient_failures_then_gives_up(httpx_mock: HTTPXMock, capsys) -> None:
    httpx_mock.add_response(url=JOB_URL, status_code=503, json={"error": {"message": "busy"}})
    httpx_mock.add_response(url=JOB_URL, json=job_obj("running"))
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=EVENTS)
    httpx_mock.add_response(url=JOB_URL, json=job_obj("succeeded", fine_tuned_model=MODEL))
    httpx_mock.add_response(url=EVENTS, json=page([]))
    assert main(["ft", "watch", JID]) == 0
    out, err = capsys.readouterr()
    assert out == f"{MODEL}\n"
    assert err.splitlines()[0] == "heady: retrying: busy"
    assert "heady: retrying: cannot reach gateway" in err

    for _ in range(batch.MAX_TRANSIENT):
        headers = {"content-type": "text/html", "x-request-id": "r9"}
        httpx_mock.add_response(url=JOB_URL, status_code=502, text="<html/>", headers=headers)
    assert main(["ft", "watch", JID]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == "heady: error: gateway answered HTTP 502 (text/html) (request id r9)"


def test_watch_unknown_job_and_bad_id_are_one_line(httpx_mock: HTTPXMock, capsys) -> None:
    missing = oai_error(f"Could not find fine-tuning job: {JID}", "fine_tune_not_found", "r4")
    httpx_mock.add_response(url=JOB_URL, status_code=404, json=missing)
    assert main(["ft", "watch", JID]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"heady: error: Could not find fine-tuning job: {JID} (request id r4)"
    assert main(["ft", "watch", "../files/x"]) == 2
    assert "not a valid fine-tuning job id" in one_error_line(capsys.readouterr().err)


def test_watch_ctrl_c_leaves_the_job_running(
    httpx_mock: HTTPXMock, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpx_mock.add_response(url=JOB_URL, json=job_obj("running"))
    httpx_mock.add_response(url=EVENTS, json=page([]))

    def interrupted(_s: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_sleep", interrupted)
    assert main(["ft", "watch", JID]) == 130
    err = capsys.readouterr().err
    assert "keeps running" in err and f"resume: heady ft watch {JID}" in err
    assert all(r.method == "GET" for r in httpx_mock.get_requests())  # nothing cancelled


# --- list / events / checkpoints / cancel ----------------------------------------------------


def test_list_follows_pages_like_the_sdk(httpx_mock: HTTPXMock, capsys) -> None:
    url = re.compile(rf"{ROOT}/fine_tuning/jobs\?.*")
    jobs = [dict(job_obj("succeeded", fine_tuned_model=MODEL), id=f"ftjob-{i}") for i in "abc"]
    httpx_mock.add_response(url=url, json=page(jobs[:2], has_more=True))
    httpx_mock.add_response(url=url, json=page(jobs[2:]))
    assert main(["ft", "list", "--all", "--json"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ["ftjob-a", "ftjob-b",
                                                                      "ftjob-c"]  # fmt: skip
    expected = sdk_requests(lambda c: (
        c.fine_tuning.jobs.list(limit=100), c.fine_tuning.jobs.list(after="ftjob-b", limit=100)
    ))  # fmt: skip
    assert ours(httpx_mock) == expected


def test_list_table(httpx_mock: HTTPXMock, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    error = {"code": "invalid_training_file", "message": "Line 3: [x] bad", "param": None}
    failed = job_obj("failed", id="ftjob-f", error=error)
    ok = job_obj("succeeded", fine_tuned_model=MODEL, trained_tokens=12345)
    httpx_mock.add_response(url=f"{ROOT}/fine_tuning/jobs?limit=5", json=page([ok, failed]))
    assert main(["ft", "list", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "Fine-tuning jobs (2)" in out and MODEL in out and "12,345" in out
    assert "Line 3: [x] bad [invalid_training_file]" in out  # escaped, not rich markup
    assert "2027-01-15 08:00:00Z" in out and "2027-01-15 08:05:00Z" in out


def test_events_oldest_first_like_the_sdk(httpx_mock: HTTPXMock, capsys) -> None:
    events = [metrics(3, 1, 12, 2.5, T0 + 40), event(2, "Training\nstarted", T0 + 30),
              event(1, "bad line", T0, level="warn")]  # fmt: skip
    httpx_mock.add_response(url=f"{JOB_URL}/events?limit=3", json=page(events, has_more=True))
    assert main(["ft", "events", JID, "--limit", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "2027-01-15 08:00:00Z warn: bad line",
        "2027-01-15 08:00:30Z Training started",
        "2027-01-15 08:00:40Z Step 1/12: training loss=2.5000",
    ]
    assert ours(httpx_mock) == sdk_requests(lambda c: c.fine_tuning.jobs.list_events(JID, limit=3))


def test_checkpoints_table_like_the_sdk(
    httpx_mock: HTTPXMock, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    ckpt = {"id": "ftckpt-1", "object": "fine_tuning.job.checkpoint", "created_at": int(T0),
            "fine_tuned_model_checkpoint": f"{MODEL}:ckpt-step-8", "fine_tuning_job_id": JID,
            "metrics": {"step": 8, "train_loss": 0.75, "valid_loss": 0.8,
                        "full_valid_loss": 0.9}, "step_number": 8}  # fmt: skip
    junk = dict(ckpt, id="ftckpt-0", step_number="4", metrics={"train_loss": math.nan})
    body = json.dumps(page([ckpt, junk])).encode()  # NaN as Python writes it: not JSON, but seen
    httpx_mock.add_response(url=f"{JOB_URL}/checkpoints?limit=100", content=body)
    assert main(["ft", "checkpoints", JID]) == 0
    out = capsys.readouterr().out
    row = next(x for x in out.splitlines() if "ckpt-step-8" in x)
    assert row.split("│")[1].strip() == "8" and "0.7500" in row and "0.9000" in row
    cells = [[c.strip() for c in x.split("│")] for x in out.splitlines() if x.count("│") > 3]
    assert [c[1:4] for c in cells if c[1] == "-"] == [["-", f"{MODEL}:ckpt-step-8", "-"]]
    expected = sdk_requests(lambda c: c.fine_tuning.jobs.checkpoints.list(JID, limit=100))
    assert ours(httpx_mock) == expected


def test_cancel_like_the_sdk(httpx_mock: HTTPXMock, capsys) -> None:
    httpx_mock.add_response(method="POST", url=f"{JOB_URL}/cancel", json=job_obj("cancelled"))
    assert main(["ft", "cancel", JID]) == 0
    assert capsys.readouterr().out == f"job {JID} cancelled; its listed checkpoints stay usable\n"
    assert ours(httpx_mock) == sdk_requests(lambda c: c.fine_tuning.jobs.cancel(JID))

    gone = oai_error("a fine-tuning job with status 'succeeded' cannot be cancelled",
                     "job_not_cancellable", "r5")  # fmt: skip
    httpx_mock.add_response(method="POST", url=f"{JOB_URL}/cancel", status_code=409, json=gone)
    assert main(["ft", "cancel", JID]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "heady: error: a fine-tuning job with status 'succeeded' cannot be cancelled "
        "(request id r5)"
    )


@pytest.mark.parametrize(
    ("response", "line"),
    [
        ({"status_code": 200, "json": {"object": "fine_tuning.job"}},
         "gateway answer is not a fine-tuning job (no id)"),
        ({"status_code": 200, "json": {"id": JID}}, f"job {JID} has no status"),
        ({"status_code": 200, "text": "not json"}, "gateway answered non-JSON to POST"),
    ],
)  # fmt: skip
def test_unusable_answers_are_one_line(
    httpx_mock: HTTPXMock, capsys, response: dict, line: str
) -> None:
    httpx_mock.add_response(method="POST", url=f"{JOB_URL}/cancel", **response)
    assert main(["ft", "cancel", JID]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"heady: error: {line}")


# --- pure pieces ---------------------------------------------------------------------------


def ev(obj: dict) -> finetune.EventView:
    e = finetune.parse_event(obj)
    assert e is not None
    return e


def test_fold_metrics_keeps_the_latest_step_losses_and_rate_samples() -> None:
    events = [ev(e) for e in [
        event(1, "Training started", T0),
        metrics(2, 1, 10, 2.0, T0 + 10, valid=2.5),
        metrics(3, 2, 10, 1.8, T0 + 20),  # no valid loss: the last one stays
        event(4, "junk", T0 + 21, "metrics", data={"step": True, "train_loss": 0.1}),
        event(5, "junk", T0 + 22, "metrics", data={"step": 3, "train_loss": math.inf,
                                                   "total_steps": "10"}),
    ]]  # fmt: skip
    p = finetune.fold_metrics(finetune.TrainProgress(), events)
    assert (p.step, p.total_steps, p.train_loss, p.valid_loss) == (3, 10, None, 2.5)
    assert p.samples == ((T0 + 10, 1), (T0 + 20, 2), (T0 + 22, 3))
    # full_valid_loss (the whole validation set) wins over a step's valid_loss
    full = ev(event(6, "", T0 + 30, "metrics",
                    data={"step": 4, "valid_loss": 1.0, "full_valid_loss": 1.2}))  # fmt: skip
    assert finetune.fold_metrics(p, [full]).valid_loss == 1.2
    # a job resumed from an earlier checkpoint: the step goes back, the rate starts over
    resumed = finetune.fold_metrics(p, [ev(metrics(7, 2, 10, 1.9, T0 + 100))])
    assert resumed.step == 2 and resumed.samples == ((T0 + 100, 2),)
    assert finetune.fold_metrics(p, []) == p


def test_step_rate_and_eta() -> None:
    running = finetune.parse_job(job_obj("running"))
    p = finetune.TrainProgress(step=5, total_steps=12, samples=((T0 + 40, 1), (T0 + 80, 5)))
    rate = finetune.step_rate(p, False, T0 + 80)
    assert rate == pytest.approx(0.1)
    assert finetune.job_eta(running, p, rate) == pytest.approx(70)
    assert finetune.job_eta(running, p, None) is None
    assert finetune.job_eta(finetune.parse_job(job_obj("queued")), p, rate) is None
    assert finetune.job_eta(finetune.parse_job(job_obj("failed")), p, None) == 0.0
    assert finetune.job_eta(running, finetune.TrainProgress(step=5), rate) is None
    # less than batch.RATE_MIN_SPAN_S of metrics: no rate rather than a wild one
    assert finetune.step_rate(finetune.TrainProgress(samples=((T0, 1), (T0 + 2, 3))),
                              False, T0 + 2) is None  # fmt: skip
    assert finetune.step_rate(p, True, T0 + 999) == pytest.approx(0.1)
    assert finetune.step_rate(finetune.TrainProgress(samples=((T0, 1),)), True, T0) is None
    assert finetune.job_elapsed(running, T0 - 5) == 0.0  # a client clock behind the gateway's


def test_unseen_cuts_a_page_at_the_last_event_shown() -> None:
    page_ = [ev(event(n, str(n), T0 + n)) for n in (5, 4, 3)]
    assert finetune.unseen(page_, "ftevent-" + "4".zfill(24)) == (page_[:1], True)
    assert finetune.unseen(page_, None) == (page_, False)
    assert finetune.unseen(page_, "ftevent-other") == (page_, False)


def test_parse_job_and_event_are_tolerant() -> None:
    j = finetune.parse_job({"id": JID, "status": "running", "created_at": "x",
                            "trained_tokens": -1, "error": {}, "fine_tuned_model": 3})  # fmt: skip
    assert (j.created_at, j.trained_tokens, j.error, j.fine_tuned_model) == (None, None, None, None)
    assert finetune.error_text(j) == "no error given"
    with pytest.raises(finetune.CliError, match="no status"):
        finetune.parse_job({"id": JID})
    assert finetune.parse_event({"object": "x"}) is None
    e = ev({"id": "ftevent-1", "data": "x", "created_at": None})
    assert (e.level, e.type, e.data, e.created_at) == ("info", "message", {}, None)
    assert finetune.event_line(e) == "--:--:-- "


def test_job_body_is_what_the_gateway_and_node_accept() -> None:
    body = finetune.job_body(BASE, TRAIN, n_epochs=2)
    assert body == {"model": BASE, "training_file": TRAIN, "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}}  # fmt: skip
    finetune.check_body(body)  # heady_shared.ftlines.check_job_request accepts it
    with pytest.raises(finetune.CliError, match=r"^--epochs: "):
        finetune.check_body(finetune.job_body(BASE, TRAIN, n_epochs=0))
