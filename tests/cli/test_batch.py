"""`heady batch submit | watch | results | list | cancel` against a mocked gateway (pytest-httpx):
request shapes, progress and exit codes, streaming, error lines, pagination."""

import hashlib
import io
import json
import re
import tracemalloc
from pathlib import Path

import httpx
import pytest
from pytest_httpx import HTTPXMock, IteratorStream
from rich.console import Console

from heady_cli import batch
from heady_cli.main import main
from tests.cli.conftest import GW, KEY, T0, FakeClock, cli_env, oai_error

ROOT = f"{GW}/api/heavy/batch/v1"
BID = "batch_0123456789abcdef01234567"
FID = "file-aaaaaaaaaaaaaaaaaaaaaaaa"
OUT = "file-bbbbbbbbbbbbbbbbbbbbbbbb"
ERR = "file-cccccccccccccccccccccccc"
LINES = b"".join(
    json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}).encode()
    + b"\n"
    for i in range(3)
)  # fmt: skip


def batch_obj(status: str, total: int = 0, completed: int = 0, failed: int = 0, **extra) -> dict:
    obj = {
        "id": BID, "object": "batch", "endpoint": "/v1/chat/completions",
        "input_file_id": FID, "completion_window": "24h", "status": status,
        "created_at": int(T0), "in_progress_at": None, "expires_at": int(T0) + 86400,
        "output_file_id": None, "error_file_id": None, "errors": None, "metadata": None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
    }  # fmt: skip
    if status not in ("validating",):
        obj["in_progress_at"] = int(T0) + 10
    if status in batch.TERMINAL_EXIT:
        obj[f"{status}_at"] = int(T0) + 100
    obj.update(extra)
    return obj


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeClock:
    return cli_env(monkeypatch, tmp_path, batch)


def one_error_line(err: str) -> str:
    """The error is the last stderr line and the only one (earlier lines are progress notes)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("heady: error: "), err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


# --- submit ------------------------------------------------------------------------------


def sdk_upload_body(path: Path) -> tuple[bytes, str]:
    """What the official openai SDK sends for files.create(file=open(path), purpose="batch")."""
    import httpx2
    from openai import OpenAI

    seen: list = []

    def handler(req):
        seen.append((req.read(), req.headers["content-type"]))
        return httpx2.Response(200, json={"id": FID, "object": "file", "bytes": 1,
                                          "created_at": 1, "filename": "x", "purpose": "batch",
                                          "status": "processed"})  # fmt: skip

    client = OpenAI(base_url=ROOT, api_key=KEY,
                    http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))  # fmt: skip
    with path.open("rb") as fh:
        client.files.create(file=fh, purpose="batch")
    return seen[0]


def unboundary(body: bytes, content_type: str) -> bytes:
    boundary = content_type.split("boundary=")[1].encode()
    return body.replace(boundary, b"BOUNDARY")


def test_submit_uploads_like_the_sdk_and_creates_the_batch(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    src = tmp_path / "prompts.jsonl"
    src.write_bytes(LINES)
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": FID, "object": "file"})
    httpx_mock.add_response(method="POST", url=f"{ROOT}/batches", json=batch_obj("validating"))
    assert main(["batch", "submit", str(src)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{BID}\n"  # stdout: just the id, for scripts
    assert f"heady batch watch {BID}" in err and KEY not in out + err

    upload, create = httpx_mock.get_requests()
    assert upload.headers["authorization"] == f"Bearer {KEY}"
    body = upload.read()
    assert int(upload.headers["content-length"]) == len(body)
    ours = unboundary(body, upload.headers["content-type"])
    assert ours == (
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="prompts.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + LINES + b"\r\n--BOUNDARY--\r\n"
    )
    sdk_body, sdk_type = sdk_upload_body(src)
    assert sdk_type.startswith("multipart/form-data; boundary=")
    assert ours == unboundary(sdk_body, sdk_type)

    assert create.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(create.read()) == {
        "input_file_id": FID,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }


def test_submit_with_role_endpoint_metadata_and_watch(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys, env: FakeClock
) -> None:
    root = f"{GW}/api/heavy/reasoning/v1"
    (tmp_path / "p.jsonl").write_bytes(LINES)
    httpx_mock.add_response(method="POST", url=f"{root}/files", json={"id": FID})
    httpx_mock.add_response(method="POST", url=f"{root}/batches", json=batch_obj("validating"))
    httpx_mock.add_response(url=f"{root}/batches/{BID}", json=batch_obj("in_progress", 3, 1))
    done = batch_obj("completed", 3, 3, output_file_id=OUT)
    httpx_mock.add_response(url=f"{root}/batches/{BID}", json=done)
    args = ["batch", "submit", "p.jsonl", "--role", "reasoning", "--endpoint", "/v1/completions"]
    assert main([*args, "--metadata", "team=ml", "--metadata", "run=a=b", "--watch"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == BID
    assert f"batch {BID} completed: 3 ok, 0 failed of 3 lines" in out
    assert "1/3" in err and "3/3" in err
    create = json.loads(httpx_mock.get_requests()[1].read())
    assert create["endpoint"] == "/v1/completions"
    assert create["metadata"] == {"team": "ml", "run": "a=b"}


def test_submit_failing_create_deletes_the_upload(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    (tmp_path / "p.jsonl").write_bytes(LINES)
    httpx_mock.add_response(method="POST", url=f"{ROOT}/files", json={"id": FID})
    bad = oai_error("endpoint /v1/x is not supported", "invalid_endpoint", "rid-7")
    httpx_mock.add_response(method="POST", url=f"{ROOT}/batches", status_code=400, json=bad)
    httpx_mock.add_response(method="DELETE", url=f"{ROOT}/files/{FID}", json={"deleted": True})
    assert main(["batch", "submit", "p.jsonl", "--endpoint", "/v1/x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert one_error_line(err) == "heady: error: endpoint /v1/x is not supported (request id rid-7)"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "cannot read"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.mkdir(), "is not a file"),
    ],
)
def test_submit_bad_local_file(tmp_path: Path, capsys, setup, message: str) -> None:
    setup(tmp_path / "in.jsonl")
    assert main(["batch", "submit", str(tmp_path / "in.jsonl")]) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--role", "Batch"], "not a role name (a-z, 0-9, -): 'Batch'"),
        (["list", "--role", "../files"], "not a role name"),
        (["submit", "p.jsonl", "--metadata", "novalue"], "--metadata wants KEY=VALUE"),
        (["cancel", "batch_x?y=1"], "not a valid batch id"),
        (["list", "--gateway", "gw.example.com"], "gateway URL must start with https://"),
    ],
)
def test_bad_arguments_never_reach_the_gateway(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    (tmp_path / "p.jsonl").write_bytes(LINES)
    assert main(["batch", *args]) == 2  # httpx_mock: no request may be made
    assert message in one_error_line(capsys.readouterr().err)


def test_missing_gateway_or_key(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("GATEWAY_API_KEY")
    assert main(["batch", "list"]) == 2
    assert "no gateway key" in one_error_line(capsys.readouterr().err)
    monkeypatch.delenv("HEADY_GATEWAY_URL")
    assert main(["batch", "list", "--key", "k"]) == 2
    assert "no gateway URL" in one_error_line(capsys.readouterr().err)


# --- watch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("final", "code"), [("completed", 0), ("failed", 1), ("expired", 1), ("cancelled", 1)]
)
def test_watch_exit_code_per_terminal_status(
    httpx_mock: HTTPXMock, capsys, env: FakeClock, final: str, code: int
) -> None:
    url = f"{ROOT}/batches/{BID}"
    steps = [
        batch_obj("validating"),
        batch_obj("in_progress", 100, 0),
        batch_obj("in_progress", 100, 38, 2),
        batch_obj("in_progress", 100, 38, 2),
        batch_obj("finalizing", 100, 97, 3),
    ]
    for s in steps:
        httpx_mock.add_response(url=url, json=s)
    errors = {"object": "list", "data": [{"code": "duplicate_custom_id", "line": 7,
                                          "message": "custom_id r3 appears twice"}]}  # fmt: skip
    httpx_mock.add_response(url=url, json=batch_obj(final, 100, 97, 3, output_file_id=OUT,
                                                    error_file_id=ERR, errors=errors))  # fmt: skip
    assert main(["batch", "watch", BID]) == code
    out, err = capsys.readouterr()
    progress = err.splitlines()  # not a terminal: one plain line per change, on stderr
    assert [line.split()[1] for line in progress] == [
        "validating",
        "in_progress",
        "in_progress",
        "finalizing",
        final,
    ]  # fmt: skip  (the unchanged poll printed nothing)
    assert progress[0].split()[2] == "0/?"
    assert progress[2].split()[2:5] == ["40/100", "(2", "failed)"]
    assert f"batch {BID} {final}: 97 ok, 3 failed of 100 lines" in out
    assert "line 7: [duplicate_custom_id] custom_id r3 appears twice" in out
    assert f"heady batch results {BID}" in out
    # polled at 1 s, backing off while nothing changes, back to 1 s when the status moves
    assert env.sleeps == [1.0, 1.0, 1.0, 1.5, 2.25]
    assert len(httpx_mock.get_requests()) == 6


def test_watch_rich_bar_shows_progress_rate_and_eta(httpx_mock: HTTPXMock, env: FakeClock) -> None:
    # created at T0, running since T0+10, now T0+20 with 40 done: 4.0 lines/s, 60 left -> 0:15
    url = f"{ROOT}/batches/{BID}"
    httpx_mock.add_response(url=url, json=batch_obj("in_progress", 100, 38, 2))
    httpx_mock.add_response(url=url, json=batch_obj("completed", 100, 97, 3))
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, color_system=None, width=160)
    api = batch.Api(GW, KEY, "batch", 5.0)
    view = batch.watch(api, BID, batch.LiveDisplay(console))
    assert view.status == "completed" and view.done == 100
    text = sink.getvalue()
    assert "in_progress" in text and "40/100" in text and "2 failed" in text
    assert BID in text and "0:20 elapsed · 4.0/s · ETA 0:15" in text
    # ended at +100, ran from +10: the batch's own rate, not the watch's
    assert "completed" in text and "100/100" in text and "1:40 elapsed · 1.1/s · ETA 0:00" in text


def test_watch_retries_transient_failures_then_gives_up(httpx_mock: HTTPXMock, capsys) -> None:
    url = f"{ROOT}/batches/{BID}"
    httpx_mock.add_response(url=url, status_code=504, json={"error": {"message": "slow"}})
    httpx_mock.add_response(url=url, json=batch_obj("in_progress", 10, 1))
    httpx_mock.add_response(url=url, status_code=503, json={"error": {"message": "busy"}})
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=url)
    httpx_mock.add_response(url=url, json=batch_obj("completed", 10, 10))
    assert main(["batch", "watch", BID]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "heady: retrying: slow"  # before there is anything to draw
    assert "retrying: busy" in err and "retrying: cannot reach gateway" in err

    httpx_mock.add_response(url=url, json=batch_obj("in_progress", 10, 1))
    for _ in range(batch.MAX_TRANSIENT):
        headers = {"content-type": "text/html", "x-request-id": "r9"}
        httpx_mock.add_response(url=url, status_code=502, text="<html>502</html>", headers=headers)
    assert main(["batch", "watch", BID]) == 2
    err = capsys.readouterr().err
    assert (
        err.splitlines()[-1]
        == "heady: error: gateway answered HTTP 502 (text/html) (request id r9)"
    )


def test_watch_unknown_batch_is_one_line(httpx_mock: HTTPXMock, capsys) -> None:
    missing = oai_error(f"No batch found with id '{BID}'.", "not_found", "req-404")
    httpx_mock.add_response(url=f"{ROOT}/batches/{BID}", status_code=404, json=missing)
    assert main(["batch", "watch", BID]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"heady: error: No batch found with id '{BID}'. (request id req-404)"


def test_watch_ctrl_c_leaves_the_batch_running(
    httpx_mock: HTTPXMock, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpx_mock.add_response(url=f"{ROOT}/batches/{BID}", json=batch_obj("in_progress", 10, 1))

    def interrupted(_s: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_sleep", interrupted)
    assert main(["batch", "watch", BID]) == 130
    err = capsys.readouterr().err
    assert "keeps running" in err and f"resume: heady batch watch {BID}" in err
    assert all(r.method == "GET" for r in httpx_mock.get_requests())  # nothing cancelled


def test_watch_rejects_an_id_that_is_not_one(capsys) -> None:
    assert main(["batch", "watch", "../files/x"]) == 2
    assert "not a valid batch id" in one_error_line(capsys.readouterr().err)


# --- results -----------------------------------------------------------------------------


def test_results_streams_a_large_file_without_holding_it(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    chunk = b'{"custom_id": "x", "response": {"status_code": 200}}\n' * 5000  # ~270 KB
    n_chunks = 64  # ~17 MB in all
    expected = hashlib.sha256(chunk * n_chunks).hexdigest()
    done = batch_obj("completed", 10, 9, 1, output_file_id=OUT, error_file_id=ERR)
    httpx_mock.add_response(url=f"{ROOT}/batches/{BID}", json=done)
    httpx_mock.add_response(
        url=f"{ROOT}/files/{OUT}/content", stream=IteratorStream(chunk for _ in range(n_chunks))
    )
    httpx_mock.add_response(url=f"{ROOT}/files/{ERR}/content", content=b'{"custom_id": "e"}\n')
    tracemalloc.start()
    try:
        code = main(["batch", "results", BID, "-o", "out.jsonl", "--errors", "err.jsonl"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0
    data = (tmp_path / "out.jsonl").read_bytes()
    assert len(data) == len(chunk) * n_chunks and hashlib.sha256(data).hexdigest() == expected
    assert (tmp_path / "err.jsonl").read_bytes() == b'{"custom_id": "e"}\n'
    assert peak < len(data) / 8  # a few chunks at a time, never the ~17 MB body
    assert not list(tmp_path.glob("*.part"))
    err = capsys.readouterr().err
    assert f"output: {5000 * n_chunks:,} lines" in err and "-> out.jsonl" in err


def test_results_to_stdout_and_notes_the_error_file(httpx_mock: HTTPXMock, capsysbinary) -> None:
    done = batch_obj("cancelled", 10, 4, 1, output_file_id=OUT, error_file_id=ERR)
    httpx_mock.add_response(url=f"{ROOT}/batches/{BID}", json=done)
    httpx_mock.add_response(url=f"{ROOT}/files/{OUT}/content", content=LINES)
    assert main(["batch", "results", BID]) == 0
    out, err = capsysbinary.readouterr()
    assert out == LINES
    assert f"1 failed lines are in {ERR}: add --errors FILE".encode() in err


def test_results_interrupted_download_leaves_no_file(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    def broken():
        yield b"partial line\n"
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    done = batch_obj("completed", 1, 1, output_file_id=OUT)
    httpx_mock.add_response(url=f"{ROOT}/batches/{BID}", json=done)
    httpx_mock.add_response(url=f"{ROOT}/files/{OUT}/content", stream=IteratorStream(broken()))
    assert main(["batch", "results", BID, "-o", "out.jsonl"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"heady: error: connection to gateway at {GW} broke: RemoteProtocolError"
    assert list(tmp_path.iterdir()) == []


def test_results_not_finished_or_failed_validation(httpx_mock: HTTPXMock, capsys) -> None:
    url = f"{ROOT}/batches/{BID}"
    httpx_mock.add_response(url=url, json=batch_obj("in_progress", 100, 40))
    assert main(["batch", "results", BID]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is in_progress (40/100): no results yet" in line

    errors = {"data": [{"code": "invalid_json", "line": 2, "message": "line is not JSON"}]}
    httpx_mock.add_response(url=url, json=batch_obj("failed", errors=errors))
    assert main(["batch", "results", BID]) == 1
    assert "line 2: [invalid_json] line is not JSON" in capsys.readouterr().err


def test_results_refuses_targets_it_cannot_write(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    done = batch_obj("completed", 1, 1, output_file_id=OUT, error_file_id=ERR)
    httpx_mock.add_response(url=f"{ROOT}/batches/{BID}", json=done, is_reusable=True)
    (tmp_path / "adir").mkdir()
    assert main(["batch", "results", BID, "-o", "adir"]) == 2
    assert "adir is a directory" in one_error_line(capsys.readouterr().err)
    assert main(["batch", "results", BID, "-o", "x.jsonl", "--errors", "./x.jsonl"]) == 2
    assert "the same file" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_results_completed_with_every_line_failed(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys
) -> None:
    done = batch_obj("completed", 2, 0, 2, error_file_id=ERR)
    httpx_mock.add_response(url=f"{ROOT}/batches/{BID}", json=done)
    httpx_mock.add_response(url=f"{ROOT}/files/{ERR}/content", content=b"e1\ne2\n")
    assert main(["batch", "results", BID, "-o", "o.jsonl", "--errors", "e.jsonl"]) == 0
    assert (tmp_path / "o.jsonl").read_bytes() == b""
    assert (tmp_path / "e.jsonl").read_bytes() == b"e1\ne2\n"
    assert "has no output file" in capsys.readouterr().err


# --- gateway errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "line"),
    [
        ({"status_code": 401, "json": oai_error("invalid API key", None, "r1")},
         "invalid API key (request id r1)"),
        ({"status_code": 404, "json": {"error": {"message": "no such\nfile", "code": "not_found"}},
          "headers": {"x-request-id": "hdr-2"}},
         "no such file (request id hdr-2)"),
        ({"status_code": 429, "json": {"error": {"code": "rate_limited"}}}, "rate_limited"),
        ({"status_code": 400, "json": {"error": "bad thing"}}, "bad thing"),
        ({"status_code": 524, "text": "<html>524</html>", "headers": {"content-type": "text/html"}},
         "gateway answered HTTP 524 (text/html)"),
        ({"status_code": 500, "content": b""}, "gateway answered HTTP 500 (no content-type)"),
        ({"status_code": 200, "text": "not json"}, "gateway answered non-JSON to POST /batches/"),
        ({"status_code": 200, "json": {"object": "batch"}}, "gateway answer is not a Batch object"),
    ],
)  # fmt: skip
def test_gateway_errors_are_one_line(
    httpx_mock: HTTPXMock, capsys, response: dict, line: str
) -> None:
    httpx_mock.add_response(method="POST", url=f"{ROOT}/batches/{BID}/cancel", **response)
    assert main(["batch", "cancel", BID]) == 2
    got = one_error_line(capsys.readouterr().err)
    assert got.startswith(f"heady: error: {line}"), got
    assert KEY not in got


def test_unreachable_gateway(httpx_mock: HTTPXMock, capsys) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=f"{ROOT}/batches/{BID}/cancel")
    assert main(["batch", "cancel", BID, "--timeout", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"heady: error: gateway at {GW} did not answer within 3s"


# --- list / cancel -----------------------------------------------------------------------


def page(ids: list[str], has_more: bool) -> dict:
    data = [dict(batch_obj("completed", 5, 5), id=i) for i in ids]
    return {"object": "list", "data": data, "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None, "has_more": has_more}  # fmt: skip


def test_list_follows_every_page(httpx_mock: HTTPXMock, capsys) -> None:
    pages = [["batch_a1", "batch_a2"], ["batch_b1", "batch_b2"], ["batch_c1"]]
    for i, ids in enumerate(pages):
        httpx_mock.add_response(url=re.compile(rf"{ROOT}/batches\?.*"),
                                json=page(ids, has_more=i < 2))  # fmt: skip
    assert main(["batch", "list", "--all", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [b["id"] for b in items] == ["batch_a1", "batch_a2", "batch_b1", "batch_b2", "batch_c1"]
    params = [dict(r.url.params) for r in httpx_mock.get_requests()]
    assert params == [
        {"limit": "100"},
        {"limit": "100", "after": "batch_a2"},
        {"limit": "100", "after": "batch_b2"},
    ]


def test_list_stops_at_the_limit_and_renders_a_table(
    httpx_mock: HTTPXMock, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    httpx_mock.add_response(url=re.compile(rf"{ROOT}/batches\?.*"),
                            json=page(["batch_a1", "batch_a2"], True))  # fmt: skip
    httpx_mock.add_response(url=re.compile(rf"{ROOT}/batches\?.*"),
                            json=page(["batch_b1", "batch_b2"], True))  # fmt: skip
    assert main(["batch", "list", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "batch_a1" in out and "batch_b1" in out and "batch_b2" not in out
    assert "5/5" in out and "2027-01-15 08:00:00Z" in out
    params = [dict(r.url.params) for r in httpx_mock.get_requests()]
    assert params == [{"limit": "3"}, {"limit": "1", "after": "batch_a2"}]


def test_list_refuses_a_cursor_that_does_not_move(httpx_mock: HTTPXMock, capsys) -> None:
    for _ in range(2):
        httpx_mock.add_response(url=re.compile(rf"{ROOT}/batches\?.*"),
                                json=page(["batch_a1"], True))  # fmt: skip
    assert main(["batch", "list", "--all"]) == 2
    assert "pagination did not advance" in one_error_line(capsys.readouterr().err)


def test_cancel(httpx_mock: HTTPXMock, capsys) -> None:
    httpx_mock.add_response(method="POST", url=f"{ROOT}/batches/{BID}/cancel",
                            json=batch_obj("cancelling", 100, 30, 1))  # fmt: skip
    assert main(["batch", "cancel", BID]) == 0
    out, err = capsys.readouterr()
    assert out == f"batch {BID} cancelling (31/100 (1 failed) done); partial output is kept\n"
    assert f"heady batch watch {BID}" in err


# --- pure pieces -------------------------------------------------------------------------


def test_line_rate_uses_the_run_average_then_the_recent_window() -> None:
    assert batch.line_rate([], T0, T0 + 5) is None
    # one sample: the run's average since in_progress_at
    assert batch.line_rate([(T0 + 20, 40)], T0 + 10, T0 + 20) == 4.0
    # running for 0.5 s (whole-second timestamps): no rate rather than 80 lines/s
    assert batch.line_rate([(T0 + 10.5, 40)], T0 + 10, T0 + 10.5) is None
    # no in_progress_at: the watch's own samples, once they span RATE_MIN_SPAN_S
    assert batch.line_rate([(T0, 10), (T0 + 2, 20)], None, T0 + 2) is None
    assert batch.line_rate([(T0, 10), (T0 + 5, 20)], None, T0 + 5) == 2.0
    # no in_progress_at, no progress seen yet: unknown
    assert batch.line_rate([(T0, 0), (T0 + 5, 0)], None, T0 + 5) is None
    # a long watch: 1 line/s for 60 s, then a node died: 1 line per 6 s from then on
    samples = [(T0 + t, min(t, 60) + max(0, (t - 60) // 6)) for t in range(0, 201, 10)]
    assert samples[-1] == (T0 + 200, 83) and samples[8] == (T0 + 80, 63)
    # the recent window (the last 2 * RATE_WINDOW_S), not the run's 83/200 = 0.415/s
    assert batch.line_rate(samples, T0, T0 + 200) == pytest.approx(20 / 120)
    # a watch shorter than RATE_WINDOW_S still uses the run average
    assert batch.line_rate(samples[-3:], T0, T0 + 200) == pytest.approx(83 / 200)


def test_eta_interval_and_formatting() -> None:
    running = batch.parse_batch(batch_obj("in_progress", 100, 40))
    assert batch.eta_s(running, 4.0) == 15.0
    assert batch.eta_s(running, None) is None and batch.eta_s(running, 0.0) is None
    assert batch.eta_s(batch.parse_batch(batch_obj("validating")), 4.0) is None
    assert batch.eta_s(batch.parse_batch(batch_obj("finalizing", 100, 100)), None) == 0.0
    intervals = [batch.POLL_MIN_S]
    for _ in range(10):
        intervals.append(batch.next_interval(intervals[-1], False))
    assert intervals[:3] == [1.0, 1.5, 2.25] and max(intervals) == batch.POLL_MAX_S
    assert batch.next_interval(batch.POLL_MAX_S, True) == batch.POLL_MIN_S
    assert batch.fmt_duration(3725) == "1:02:05" and batch.fmt_duration(65) == "1:05"
    assert batch.fmt_rate(0.05) == "3.0 lines/min" and batch.fmt_rate(None) == "- lines/s"
    assert batch.elapsed_s(running, T0 - 50) == 0.0  # a client clock behind the gateway's


def test_parse_batch_is_tolerant() -> None:
    v = batch.parse_batch({"id": BID, "status": "in_progress", "request_counts": None,
                           "created_at": "yesterday", "errors": {"data": "x"}})  # fmt: skip
    assert (v.total, v.done, v.created_at, v.errors) == (0, 0, None, ())
    with pytest.raises(batch.CliError, match="no status"):
        batch.parse_batch({"id": BID})
