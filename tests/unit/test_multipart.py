"""multipart.locate: the file's data range and the small fields of an upload, from its first
and last bytes, for bodies built by httpx exactly as the openai SDK and curl send them."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import multipart
from multipart import TAIL_MARGIN, MultipartError, boundary_of, locate
from tests.support.batchkit import jsonl, sdk_form

READ = 65_536


def reads(body: bytes, prefix: int = READ, suffix: int = READ) -> tuple[bytes, bytes]:
    return body[:prefix], body[-suffix:] if suffix else b""


def located(ctype: str, body: bytes, prefix: int = READ, suffix: int = READ):
    head, tail = reads(body, prefix, suffix)
    return locate(ctype, head, tail, len(body))


@pytest.mark.parametrize("curl_order", [False, True])
@pytest.mark.parametrize("size", [1, 40, 3000])  # lines: small, ~6 KiB... ~470 KiB
def test_data_range_is_exactly_the_file(curl_order: bool, size: int) -> None:
    data = jsonl(size)
    ctype, body = sdk_form(data, "batch", "prompts.jsonl", curl_order=curl_order)
    env = located(ctype, body)
    assert body[env.data_offset : env.data_offset + env.data_length] == data
    assert env.fields == {"purpose": "batch"}
    assert env.filename == "prompts.jsonl"


def test_sdk_upload_with_expires_after_fields() -> None:
    """The SDK sends expires_after as bracketed form keys (resources/files.py)."""
    data = jsonl(3)
    request = httpx.Request(
        "POST",
        "http://gw/v1/files",
        files={"file": ("in.jsonl", data)},
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "3600",
        },
    )
    env = located(request.headers["content-type"], request.read())
    assert env.fields["expires_after[seconds]"] == "3600"
    assert env.fields["expires_after[anchor]"] == "created_at"


def test_filename_escapes_as_httpx_writes_them() -> None:
    name = 'we "said" \\ é.jsonl'
    ctype, body = sdk_form(b'{"a": 1}\n', filename=name)
    assert b"%22said%22" in body  # httpx's HTML5 escaping of '"'
    assert located(ctype, body).filename == name


def test_rfc5987_filename_star_wins() -> None:
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl";'
        b" filename*=UTF-8''%C3%A9t%C3%A9.jsonl\r\n\r\n{}\n\r\n--xyz\r\n"
        b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--xyz--\r\n'
    )
    env = located("multipart/form-data; boundary=xyz", body)
    assert env.filename == "été.jsonl"
    assert body[env.data_offset : env.data_offset + env.data_length] == b"{}\n"


def test_preamble_and_quoted_boundary() -> None:
    body = (
        b"this is a preamble\r\n--b c\r\n"
        b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b c\r\n'
        b'Content-Disposition: form-data; name="file"; filename="x"\r\n\r\nDATA\r\n--b c--'
    )
    env = located('multipart/form-data; boundary="b c"', body)
    assert body[env.data_offset : env.data_offset + env.data_length] == b"DATA"


@pytest.mark.parametrize("curl_order", [False, True])
def test_every_suffix_length(curl_order: bool) -> None:
    """The suffix read may begin anywhere, even inside the delimiter that ends the file or
    inside the fields after it: a read that holds the trailing fields with TAIL_MARGIN bytes
    of file data before them gives the truth, a shorter one a clear error, never a wrong
    range."""
    data = bytes(range(256)) * 1000
    ctype, body = sdk_form(data, curl_order=curl_order)
    truth = located(ctype, body, len(body), 0)
    trailer = len(body) - (truth.data_offset + truth.data_length)
    for s in range(1, trailer + TAIL_MARGIN + 80):
        try:
            env = located(ctype, body, 1000, s)
        except MultipartError:
            assert s < trailer + TAIL_MARGIN, s
            continue
        assert s >= trailer + TAIL_MARGIN, s
        assert (env.data_offset, env.data_length, env.fields) == (
            truth.data_offset,
            truth.data_length,
            truth.fields,
        ), s


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=20_000),
    head=st.integers(1, 9000),
    tail=st.integers(1, 9000),
    curl_order=st.booleans(),
    purpose=st.sampled_from(["batch", "user_data", "fine-tune"]),
)
def test_any_data_any_read_sizes(
    data: bytes, head: int, tail: int, curl_order: bool, purpose: str
) -> None:
    ctype, body = sdk_form(data, purpose, curl_order=curl_order)
    truth = located(ctype, body, len(body), 0)
    try:
        env = located(ctype, body, head, tail)
    except MultipartError as exc:
        # Only when a read is too short for what it must hold: the fields and the file's
        # part headers in the prefix, the trailing fields plus the margin in the suffix.
        trailer = len(body) - (truth.data_offset + truth.data_length)
        assert head < truth.data_offset or tail < trailer + TAIL_MARGIN, exc
        return
    assert body[env.data_offset : env.data_offset + env.data_length] == data
    assert env.fields == {"purpose": purpose}


@pytest.mark.parametrize(
    ("ctype", "body", "why"),
    [
        ("application/json", b"{}", "multipart/form-data"),
        ("multipart/form-data", b"--x\r\n", "boundary"),
        ("multipart/form-data; boundary=x", b"hello", "does not start"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--x--\r\n',
            "no 'file' part",
        ),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
            "closing boundary",
        ),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\na\r\n'
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="b"\r\n\r\nb\r\n--x--',
            "more than one",
        ),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\na\r\n'
            b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nb\r\n--x--',
            "given twice",
        ),
        (
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Type: text/plain\r\n\r\na\r\n--x--",
            "Content-Disposition",
        ),
    ],
)
def test_refusals(ctype: str, body: bytes, why: str) -> None:
    with pytest.raises(MultipartError, match=why):
        located(ctype, body)


def test_a_big_field_before_the_file_is_refused() -> None:
    request = httpx.Request(
        "POST",
        "http://gw/v1/files",
        files={"file": ("a.jsonl", b"{}\n" * 30000)},
        data={"purpose": "x" * 70000},
    )
    with pytest.raises(MultipartError, match="64 KiB"):
        located(request.headers["content-type"], request.read())


def test_a_big_field_after_the_file_is_unseen() -> None:
    """The limit of two reads: a field larger than the suffix read after the file cannot be
    told from file data (its headers lie in the unread middle). Here it is `purpose`, so the
    envelope has none and files.create_file answers 400; docs/batch.md says to send fields
    before the file, as the SDK does."""
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        + b"{}\n" * 50000
        + b'\r\n--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        + b"p" * 70000
        + b"\r\n--x--\r\n"
    )
    env = located("multipart/form-data; boundary=x", body)
    assert env.fields == {}


def test_boundary_of() -> None:
    assert boundary_of("multipart/form-data; boundary=abc") == "abc"
    assert boundary_of('Multipart/Form-Data; charset=utf-8; boundary="a b"') == "a b"
    assert boundary_of("multipart/mixed; boundary=abc") is None
    assert boundary_of("multipart/form-data; boundary=" + "a" * 71) is None
    assert boundary_of(None) is None
    assert multipart.MAX_FIELD_BYTES == 4096
