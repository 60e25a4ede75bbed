"""The OpenAI Files API over D1 rows and R2 objects: upload, list, retrieve, delete, content.

An uploaded file is its raw multipart body in R2, stored as it came; the row says which byte
range of it is the file's data (multipart.py finds it from the first and last 64 KiB). A batch's
output and error files are virtual: a list of byte ranges of the shards' result objects,
served concatenated. Nothing here holds a file's bytes beyond those two small reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import jobdb
import multipart
from jobdb import ApiResult, BatchSettings, Ids, Part, Row, error, list_page, num, ok, opt_int
from storage import Blobs, Db

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
JSONL_PURPOSES = ("batch", "fine-tune")
READ_BYTES = 65_536  # how much the shell reads from each end of an upload
FILES_LIMIT_MAX = 10_000  # GET /v1/files: limit 1..10,000, default 10,000 (OpenAI)
EXPIRES_MIN_S, EXPIRES_MAX_S = 3600, 2_592_000
BATCH_FILE_MAX_BYTES = 200_000_000  # OpenAI: a batch input file is at most 200 MB


@dataclass(frozen=True, slots=True)
class Upload:
    """What the shell knows after storing a `POST /v1/files` body at `blob_key`."""

    content_type: str | None
    blob_key: str
    total: int  # the body's length in R2
    prefix: bytes  # body[:READ_BYTES]
    suffix: bytes  # body[-READ_BYTES:] (may overlap the prefix)


def owner_of(api_key: str) -> str:
    """The stable owner id of a client key; the key itself is never stored."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def upload_key(ids: Ids) -> str:
    """A fresh R2 key for an upload's raw body (the shell writes it before create_file)."""
    return "u/" + ids.new("")


def not_found(file_id: str) -> ApiResult:
    return error(404, f"No such File object: {file_id}", "file_not_found", "id")


def precheck_upload(
    content_type: str | None, content_length: str | None, settings: BatchSettings
) -> ApiResult | None:
    """Refusals before the body is read: not a multipart form (400), no Content-Length
    (411), over MAX_FILE_BYTES (413). None: go ahead and store it."""
    if multipart.boundary_of(content_type) is None:
        return error(
            400, "Content-Type must be multipart/form-data with a boundary", "invalid_request"
        )
    if content_length is None:
        return error(411, "Content-Length is required for uploads", "length_required")
    if not content_length.strip().isdigit():
        return error(400, "Content-Length is not a number", "invalid_request")
    if int(content_length) > settings.max_file_bytes:
        return error(
            413,
            f"the upload is larger than the limit of {settings.max_file_bytes} bytes",
            "file_too_large",
        )
    return None


def file_object(f: Row) -> dict[str, object]:
    """OpenAI's FileObject from a files row."""
    return {
        "id": f["id"],
        "object": "file",
        "bytes": num(f["bytes"]),
        "created_at": num(f["created_at"]),
        "expires_at": opt_int(f.get("expires_at")),
        "filename": f["filename"],
        "purpose": f["purpose"],
        "status": f["status"],
        "status_details": None,
    }


def _first_line_error(upload: Upload, env: multipart.Envelope) -> str | None:
    """Why the data's first line is not a JSON object, if it lies inside the prefix read."""
    if env.data_length == 0:
        return "the file is empty"
    start = env.data_offset
    end = min(start + env.data_length, len(upload.prefix))
    if start >= end:
        return None
    window = upload.prefix[start:end]
    newline = window.find(b"\n")
    if newline < 0:
        if start + env.data_length > len(upload.prefix):
            return None  # a first line longer than the read: the validating node judges it
        newline = len(window)
    try:
        value = json.loads(window[:newline].decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return "the first line is not valid JSON; a JSONL file holds one JSON object per line"
    if not isinstance(value, dict):
        return "the first line is not a JSON object; a JSONL file holds one object per line"
    return None


def _expiry(fields: dict[str, str], created_at: int) -> int | ApiResult | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        return error(400, "expires_after[anchor] must be 'created_at'", None, "expires_after")
    if seconds is None or not seconds.isdigit():
        return error(400, "expires_after[seconds] must be an integer", None, "expires_after")
    if not EXPIRES_MIN_S <= int(seconds) <= EXPIRES_MAX_S:
        return error(
            400,
            f"expires_after[seconds] must be between {EXPIRES_MIN_S} and {EXPIRES_MAX_S}",
            None,
            "expires_after",
        )
    return created_at + int(seconds)


async def create_file(
    db: Db,
    blobs: Blobs,
    ids: Ids,
    owner: str,
    upload: Upload,
    now: float,
    settings: BatchSettings,
) -> ApiResult:
    """`POST /v1/files` after the shell stored the body at `upload.blob_key`. On a refusal
    the stored body is deleted."""
    result = _check_upload(upload, now, settings)
    if isinstance(result, ApiResult):
        await blobs.delete([upload.blob_key])
        return result
    env, expires_at = result
    row: Row = {
        "id": ids.new("file-"),
        "owner": owner,
        "purpose": env.fields["purpose"],
        "filename": env.filename,
        "bytes": env.data_length,
        "created_at": int(now),
        "expires_at": expires_at,
        "status": "processed",
        "blob": upload.blob_key,
        "data_offset": env.data_offset,
        "parts": None,
    }
    await jobdb.insert_file(db, row)
    return ok(file_object(row))


def _check_upload(
    upload: Upload, now: float, settings: BatchSettings
) -> tuple[multipart.Envelope, int | None] | ApiResult:
    if upload.total > settings.max_file_bytes:
        return error(
            413, f"the upload is larger than {settings.max_file_bytes} bytes", "file_too_large"
        )
    try:
        env = multipart.locate(upload.content_type, upload.prefix, upload.suffix, upload.total)
    except multipart.MultipartError as exc:
        return error(400, f"unreadable upload: {exc}", "invalid_request")
    purpose = env.fields.get("purpose")
    if purpose is None:
        return error(
            400, "the form has no 'purpose' field", "missing_required_parameter", "purpose"
        )
    if purpose not in PURPOSES:
        return error(
            400,
            f"'{purpose[:64]}' is not a valid purpose; expected one of {', '.join(PURPOSES)}",
            "invalid_value",
            "purpose",
        )
    if not env.filename:
        return error(400, "the 'file' part has no filename", "invalid_file", "file")
    if len(env.filename) > 512:
        return error(400, "the filename is longer than 512 characters", "invalid_file", "file")
    if purpose in JSONL_PURPOSES:
        if purpose == "batch" and env.data_length > BATCH_FILE_MAX_BYTES:
            return error(400, "a batch input file may be at most 200 MB", "invalid_file", "file")
        why = _first_line_error(upload, env)
        if why is not None:
            return error(400, f"invalid {purpose} file: {why}", "invalid_file", "file")
    expires_at = _expiry(env.fields, int(now))
    if isinstance(expires_at, ApiResult):
        return expires_at
    return env, expires_at


def parse_limit(raw: str | None, default: int, top: int) -> int | ApiResult:
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= top:
        return error(400, f"limit must be an integer from 1 to {top}", "invalid_value", "limit")
    return int(raw)


async def list_files(
    db: Db,
    owner: str,
    now: float,
    after: str | None = None,
    limit: str | None = None,
    order: str | None = None,
    purpose: str | None = None,
) -> ApiResult:
    """`GET /v1/files?after=&limit=&order=&purpose=` (query values as the URL gives them)."""
    n = parse_limit(limit, FILES_LIMIT_MAX, FILES_LIMIT_MAX)
    if isinstance(n, ApiResult):
        return n
    if order not in (None, "asc", "desc"):
        return error(400, "order must be 'asc' or 'desc'", "invalid_value", "order")
    cursor = None
    if after is not None:
        cursor = await jobdb.any_file(db, owner, after)
        if cursor is None:
            return error(400, f"after: no such File object: {after}", "invalid_value", "after")
    rows = await jobdb.list_files(db, owner, now, n + 1, order != "asc", purpose, cursor)
    return list_page([file_object(r) for r in rows[:n]], len(rows) > n)


async def get_file(db: Db, owner: str, file_id: str, now: float) -> ApiResult:
    f = await jobdb.live_file(db, owner, file_id, now)
    return ok(file_object(f)) if f else not_found(file_id)


def file_parts(f: Row) -> list[Part]:
    """The byte ranges that make up a file's data, in order."""
    if f.get("parts") is not None:
        return [(str(k), num(o), num(n)) for k, o, n in json.loads(str(f["parts"]))]
    if f.get("blob") is None or num(f["bytes"]) == 0:
        return []
    return [(str(f["blob"]), num(f["data_offset"]), num(f["bytes"]))]


async def file_content(db: Db, owner: str, file_id: str, now: float) -> ApiResult:
    """`GET /v1/files/{id}/content`: a stream plan of R2 byte ranges."""
    f = await jobdb.live_file(db, owner, file_id, now)
    if f is None:
        return not_found(file_id)
    parts = file_parts(f)
    length = sum(n for _, _, n in parts)
    headers = (
        ("content-type", "application/octet-stream"),
        ("content-length", str(length)),
    )
    return ApiResult(200, None, headers, tuple(parts), length)


async def delete_file(db: Db, blobs: Blobs, owner: str, file_id: str, now: float) -> ApiResult:
    """`DELETE /v1/files/{id}`: the row is marked deleted at once; its blobs go now unless an
    unfinished batch still reads it (then `purge_deleted` removes them later)."""
    f = await jobdb.live_file(db, owner, file_id, now)
    if f is None or not await jobdb.mark_file_deleted(db, owner, file_id, now):
        return not_found(file_id)
    if not await jobdb.file_in_use(db, file_id):
        await _drop_blobs(db, blobs, f)
    return ok({"id": file_id, "object": "file", "deleted": True})


async def _drop_blobs(db: Db, blobs: Blobs, f: Row) -> None:
    keys = [k for k, _, _ in file_parts(f)] if f.get("parts") else []
    if f.get("blob"):
        keys.append(str(f["blob"]))
    keys = list(dict.fromkeys(keys))
    if keys:
        await blobs.delete(keys)
    await jobdb.forget_blobs(db, str(f["id"]))


async def purge_deleted(db: Db, blobs: Blobs, now: float) -> int:
    """The cron's sweep: blobs of deleted or expired files that no unfinished batch reads."""
    rows = await jobdb.purgeable_files(db, now)
    for f in rows:
        await _drop_blobs(db, blobs, f)
    return len(rows)
