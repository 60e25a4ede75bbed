"""Building blocks for batch tests: uploads built by httpx exactly as the openai SDK sends
them, the shard plan a validating node commits, and a node's result lines for a shard."""

from __future__ import annotations

import hashlib
import json

import httpx

import batches
import files
import work
from files import READ_BYTES, Upload
from jobdb import BatchSettings
from tests.support.stores import MemoryBlobs, SeqIds, SqliteDb, drive

MODEL = "Qwen/Qwen3-8B"


def jsonl(n: int, model: str = MODEL, prefix: str = "req") -> bytes:
    """n batch input lines with custom ids `<prefix>-<i>`."""
    return b"".join(
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]},
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def sdk_form(
    data: bytes, purpose: str = "batch", filename: str = "prompts.jsonl", curl_order: bool = False
) -> tuple[str, bytes]:
    """(Content-Type, body) of a `POST /v1/files`: the SDK's order (httpx puts `data` fields
    before `files`), or curl -F order (the file first, purpose after it)."""
    if curl_order:
        files = [("file", (filename, data)), ("purpose", (None, purpose.encode()))]
        request = httpx.Request("POST", "http://gw/v1/files", files=files)
    else:
        request = httpx.Request(
            "POST",
            "http://gw/v1/files",
            files={"file": (filename, data)},
            data={"purpose": purpose},
        )
    return request.headers["content-type"], request.read()


async def store_upload(
    blobs: MemoryBlobs, key: str, content_type: str | None, body: bytes
) -> Upload:
    """What the shell does before `files.create_file`: store the body, read both ends."""
    await blobs.put(key, body, length=len(body))
    return Upload(content_type, key, len(body), body[:READ_BYTES], body[-READ_BYTES:])


def shard_plan(data: bytes, shard_lines: int) -> tuple[int, list[dict[str, int]]]:
    """(total, shards) as a validating node commits them: byte ranges of whole lines."""
    starts, at = [], 0
    while at < len(data):
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end + 1
        if data[at:end].strip():
            starts.append((at, end))
        at = end
    shards = []
    for i in range(0, len(starts), shard_lines):
        group = starts[i : i + shard_lines]
        shards.append(
            {
                "offset": group[0][0],
                "length": group[-1][1] - group[0][0],
                "first_line": i,
                "n_lines": len(group),
            }
        )
    return len(starts), shards


def fails(custom_id: str) -> bool:
    """Which lines the simulated engine answers with an error (deterministic)."""
    return hashlib.sha256(custom_id.encode()).digest()[0] % 5 == 0


def results(shard_bytes: bytes, upto: int | None = None) -> tuple[bytes, bytes, int, int]:
    """(output part, error part, completed, failed) for the first `upto` lines of a shard,
    one BatchRequestOutput line per input line."""
    out, err = b"", b""
    lines = [ln for ln in shard_bytes.split(b"\n") if ln.strip()][:upto]
    for i, raw in enumerate(lines):
        cid = json.loads(raw)["custom_id"]
        bad = fails(cid)
        line = {
            "id": f"batch_req_{i:024x}",
            "custom_id": cid,
            "response": {
                "status_code": 400 if bad else 200,
                "request_id": f"r{i}",
                "body": {"error": "no"} if bad else {"choices": []},
            },
            "error": None,
        }
        if bad:
            err += json.dumps(line).encode() + b"\n"
        else:
            out += json.dumps(line).encode() + b"\n"
    completed = sum(1 for ln in lines if not fails(json.loads(ln)["custom_id"]))
    return out, err, completed, len(lines) - completed


def custom_ids(jsonl_bytes: bytes) -> list[str]:
    return [json.loads(ln)["custom_id"] for ln in jsonl_bytes.split(b"\n") if ln.strip()]


class Gateway:
    """The batch core over real stores, called the way the Worker shell calls it; `now` is
    the clock the test moves."""

    def __init__(self, settings=None, now: float = 1_800_000_000.0) -> None:
        self.settings = settings or BatchSettings()
        self.db = SqliteDb()
        self.blobs = MemoryBlobs()
        self.ids = SeqIds()
        self.now = now

    # --- client side
    def upload(self, owner: str, data: bytes, purpose: str = "batch", curl_order=False):
        ctype, body = sdk_form(data, purpose, curl_order=curl_order)
        key = files.upload_key(self.ids)
        upload = drive(store_upload(self.blobs, key, ctype, body))
        return drive(
            files.create_file(self.db, self.blobs, self.ids, owner, upload, self.now, self.settings)
        )

    def create_batch(self, owner: str, file_id: str, **extra):
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **extra,
        }
        return drive(
            batches.create_batch(
                self.db, self.ids, owner, "batch", json.dumps(body).encode(), self.now
            )
        )

    def batch(self, owner: str, batch_id: str) -> dict:
        result = drive(batches.get_batch(self.db, self.ids, owner, batch_id, self.now))
        assert result.status == 200, result.body
        return result.body

    def content(self, owner: str, file_id: str) -> bytes:
        result = drive(files.file_content(self.db, owner, file_id, self.now))
        assert result.status == 200, result.body
        return drive(self.blobs.read_parts(result.stream))

    # --- node side
    def lease(self, node: int, models=(MODEL,), may_lease_any=True, idle=False):
        body = json.dumps({"models": list(models), "idle": idle}).encode()
        result = drive(
            work.lease(self.db, self.ids, node, may_lease_any, body, self.now, self.settings)
        )
        assert result.status in (200, 204), result.body
        return result.body["lease"] if result.status == 200 else None

    def read_input(self, lease: dict, token: str | None = None):
        result = drive(
            work.lease_input(self.db, self.ids, lease["id"], token or lease["token"], self.now)
        )
        if result.status != 200:
            return result
        return drive(self.blobs.read_parts(result.stream))

    def heartbeat(self, lease: dict, token: str | None = None):
        body = json.dumps({"token": token or lease["token"]}).encode()
        return drive(work.heartbeat(self.db, lease["id"], body, self.now, self.settings))

    def put(self, lease: dict, part: str, data: bytes, token: str | None = None):
        target = drive(
            work.result_target(
                self.db,
                self.ids,
                lease["id"],
                token or lease["token"],
                part,
                str(len(data)),
                self.now,
                self.settings,
            )
        )
        if isinstance(target, str):
            drive(self.blobs.put(target, data, length=len(data)))
        return target

    def commit(self, lease: dict, body: dict):
        body = {"token": lease["token"], **body}
        return drive(
            work.commit(
                self.db,
                self.blobs,
                self.ids,
                lease["id"],
                json.dumps(body).encode(),
                self.now,
                self.settings,
            )
        )

    def release(self, lease: dict, lines: int, size: int = 0, token: str | None = None):
        """The node gives back all (lines 0) or all but its first `lines` lines."""
        body = {"token": token or lease["token"], "lines": lines, "bytes": size}
        return drive(
            work.release(
                self.db, self.blobs, self.ids, lease["id"], json.dumps(body).encode(), self.now
            )
        )

    def validate(self, lease: dict):
        data = self.read_input(lease)
        assert isinstance(data, bytes), data
        total, shards = shard_plan(data, self.settings.shard_lines)
        return self.commit(lease, {"ok": True, "model": MODEL, "total": total, "shards": shards})

    def run_shard(self, lease: dict, upto: int | None = None, partial: bool = False):
        """Run a shard (or its first `upto` lines), upload its parts, commit."""
        data = self.read_input(lease)
        if not isinstance(data, bytes):
            return data
        out, err, completed, failed = results(data, upto)
        for part, blob in (("output", out), ("error", err)):
            if blob:
                self.put(lease, part, blob)
        usage = {
            "input_tokens": 3 * (completed + failed),
            "output_tokens": 2 * completed,
            "total_tokens": 3 * (completed + failed) + 2 * completed,
        }
        return self.commit(
            lease, {"completed": completed, "failed": failed, "partial": partial, "usage": usage}
        )

    def drain(self, node: int = 7) -> int:
        """A healthy node works until nothing is leasable; returns the commits it made."""
        n = 0
        while (lease := self.lease(node)) is not None:
            result = self.validate(lease) if lease["kind"] == "validate" else self.run_shard(lease)
            assert result.status == 200, result.body
            n += 1
        return n
