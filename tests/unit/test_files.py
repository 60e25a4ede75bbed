"""files.py: uploads (SDK and curl order), the early JSONL check, list pagination as the SDK
walks it, ownership, delete, content as a stream plan; shapes checked by the openai SDK's own
pydantic models."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types import FileDeleted, FileObject

import files
from jobdb import BatchSettings
from tests.support.batchkit import Gateway, jsonl, sdk_form, store_upload
from tests.support.stores import drive

ME, OTHER = "a" * 16, "b" * 16


def test_owner_is_a_short_hash_never_the_key() -> None:
    owner = files.owner_of("sk-secret-key")
    assert len(owner) == 16 and "secret" not in owner
    assert owner == files.owner_of("sk-secret-key") != files.owner_of("sk-other")


@pytest.mark.parametrize("curl_order", [False, True])
@pytest.mark.parametrize("lines", [2, 2000])
def test_upload_then_content_is_the_file(curl_order: bool, lines: int) -> None:
    g = Gateway()
    data = jsonl(lines)
    result = g.upload(ME, data, curl_order=curl_order)
    assert result.status == 200, result.body
    f = FileObject.model_validate(result.body)
    assert (f.object, f.purpose, f.bytes, f.filename) == (
        "file",
        "batch",
        len(data),
        "prompts.jsonl",
    )
    assert f.created_at == int(g.now) and f.id.startswith("file-") and len(f.id) == 29
    assert g.content(ME, f.id) == data
    plan = drive(files.file_content(g.db, ME, f.id, g.now))
    assert plan.length == len(data) and ("content-length", str(len(data))) in plan.headers
    assert len(plan.stream) == 1  # one range of the stored body: no copy was made


@pytest.mark.parametrize(
    ("data", "purpose", "code"),
    [
        (b"not json\n{}\n", "batch", "invalid_file"),
        (b"[1, 2]\n", "batch", "invalid_file"),
        (b"", "batch", "invalid_file"),
        (b"\xff\xfe\n", "fine-tune", "invalid_file"),
        (b"{}\n", "training", "invalid_value"),
    ],
)
def test_refused_uploads_are_deleted(data: bytes, purpose: str, code: str) -> None:
    g = Gateway()
    result = g.upload(ME, data, purpose=purpose)
    assert result.status == 400
    assert result.body["error"]["code"] == code
    assert result.body["error"]["type"] == "invalid_request_error"
    assert g.blobs.objects == {}  # the stored body went with the refusal
    assert g.db.rows("SELECT * FROM files") == []


def test_other_purposes_skip_the_jsonl_check() -> None:
    g = Gateway()
    assert g.upload(ME, b"\x89PNG...", purpose="vision").status == 200
    assert g.upload(ME, b"hello", purpose="user_data").status == 200


def test_first_line_longer_than_the_read_is_left_to_the_node() -> None:
    g = Gateway()
    line = json.dumps({"custom_id": "x", "pad": "p" * 100_000}).encode() + b"\n"
    assert g.upload(ME, line + b"{}\n").status == 200
    assert g.upload(ME, b"[" + line).status == 200  # unseen: the validating node judges it


def test_missing_purpose_and_filename() -> None:
    g = Gateway()
    body = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n{}\r\n--x--'
    ctype = "multipart/form-data; boundary=x"
    upload = drive(store_upload(g.blobs, "u/1", ctype, body))
    r = drive(files.create_file(g.db, g.blobs, g.ids, ME, upload, g.now, g.settings))
    assert (r.status, r.body["error"]["param"]) == (400, "purpose")
    body = (
        b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\n{}\r\n--x--'
    )
    upload = drive(store_upload(g.blobs, "u/2", ctype, body))
    r = drive(files.create_file(g.db, g.blobs, g.ids, ME, upload, g.now, g.settings))
    assert (r.status, r.body["error"]["code"]) == (400, "invalid_file")


def test_precheck() -> None:
    s = BatchSettings(max_file_bytes=1000)
    ctype, _ = sdk_form(b"{}")
    assert files.precheck_upload(ctype, "1000", s) is None
    assert files.precheck_upload(ctype, None, s).status == 411
    assert files.precheck_upload(ctype, "1001", s).status == 413
    assert files.precheck_upload(ctype, "12a", s).status == 400
    assert files.precheck_upload("application/json", "10", s).status == 400


def test_upload_over_the_limit_is_413_even_past_the_precheck() -> None:
    g = Gateway(BatchSettings(max_file_bytes=500))
    result = g.upload(ME, jsonl(10))
    assert result.status == 413 and g.blobs.objects == {}


def test_expires_after() -> None:
    """The SDK's expires_after={"anchor": "created_at", "seconds": 7200} as form fields."""
    g = Gateway()
    request = httpx.Request(
        "POST",
        "http://gw/v1/files",
        files={"file": ("in.jsonl", b"{}\n")},
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "7200",
        },
    )
    ctype, body = request.headers["content-type"], request.read()
    upload = drive(store_upload(g.blobs, "u/e", ctype, body))
    r = drive(files.create_file(g.db, g.blobs, g.ids, ME, upload, g.now, g.settings))
    assert r.status == 200, r.body
    assert r.body["expires_at"] == int(g.now) + 7200
    g.now += 7201
    assert drive(files.get_file(g.db, ME, r.body["id"], g.now)).status == 404
    assert g.blobs.objects  # the body stays until the cron's sweep
    assert drive(files.purge_deleted(g.db, g.blobs, g.now)) == 1
    assert g.blobs.objects == {}


def test_bad_expires_after() -> None:
    fields = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}
    assert isinstance(files._expiry(fields, 0), files.ApiResult)
    assert isinstance(files._expiry({"expires_after[anchor]": "now"}, 0), files.ApiResult)
    assert files._expiry({}, 0) is None


def list_all(g: Gateway, owner: str, **query) -> list[str]:
    """Walk the pages exactly as the SDK's SyncCursorPage does: after=<last id> while
    has_more."""
    seen: list[str] = []
    after = None
    while True:
        r = drive(files.list_files(g.db, owner, g.now, after=after, **query))
        assert r.status == 200, r.body
        page = r.body
        assert page["object"] == "list"
        [FileObject.model_validate(f) for f in page["data"]]
        ids = [f["id"] for f in page["data"]]
        assert page["first_id"] == (ids[0] if ids else None)
        assert page["last_id"] == (ids[-1] if ids else None)
        seen += ids
        if not page["has_more"]:
            return seen
        after = page["last_id"]


def test_list_pagination_is_stable_and_complete() -> None:
    g = Gateway()
    made = []
    for i in range(23):
        if i % 5 == 0:
            g.now += 1  # several files share a second: order must still be total
        made.append(g.upload(ME, b"{}\n").body["id"])
    g.upload(OTHER, b"{}\n")
    g.upload(ME, b"x", purpose="user_data")
    newest_first = list_all(g, ME, limit="4", purpose="batch")
    assert sorted(newest_first) == sorted(made) and len(newest_first) == 23
    assert list_all(g, ME, limit="5", order="asc", purpose="batch") == newest_first[::-1]
    assert len(list_all(g, ME)) == 24
    first = drive(files.list_files(g.db, ME, g.now, limit="3")).body
    assert first["has_more"] is True and len(first["data"]) == 3


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"order": "up"}, "order"),
        ({"after": "file-nope"}, "after"),
    ],
)
def test_list_refusals(query: dict, param: str) -> None:
    g = Gateway()
    r = drive(files.list_files(g.db, ME, g.now, **query))
    assert (r.status, r.body["error"]["param"]) == (400, param)


def test_another_owner_sees_404_everywhere() -> None:
    g = Gateway()
    fid = g.upload(ME, b"{}\n").body["id"]
    for call in (
        files.get_file(g.db, OTHER, fid, g.now),
        files.file_content(g.db, OTHER, fid, g.now),
        files.delete_file(g.db, g.blobs, OTHER, fid, g.now),
    ):
        r = drive(call)
        assert r.status == 404 and r.body["error"]["code"] == "file_not_found"
    assert drive(files.list_files(g.db, OTHER, g.now)).body["data"] == []
    assert drive(files.list_files(g.db, OTHER, g.now, after=fid)).status == 400
    assert drive(files.get_file(g.db, ME, fid, g.now)).status == 200


def test_delete() -> None:
    g = Gateway()
    fid = g.upload(ME, b"{}\n").body["id"]
    other = g.upload(ME, b"{}\n").body["id"]
    r = drive(files.delete_file(g.db, g.blobs, ME, fid, g.now))
    assert r.status == 200
    assert FileDeleted.model_validate(r.body).deleted is True
    assert r.body == {"id": fid, "object": "file", "deleted": True}
    assert len(g.blobs.objects) == 1  # the deleted file's body is gone, the other kept
    assert drive(files.get_file(g.db, ME, fid, g.now)).status == 404
    assert drive(files.delete_file(g.db, g.blobs, ME, fid, g.now)).status == 404
    assert list_all(g, ME) == [other]
    # A cursor may point at a file deleted since the page was read.
    assert drive(files.list_files(g.db, ME, g.now, after=fid)).status == 200
