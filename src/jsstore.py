"""R2 and D1 for the pure core: storage.Blobs over the FILES bucket and storage.Db over the
JOBS_DB database, plus the shell's streaming helpers for R2 (a ranged read, and many ranges
as one response body) that keep large bodies JS-side.

Shell code over raw FFI: option objects are built with `to_js(..., dict_converter=
js.Object.fromEntries)` (a Python dict would cross as a Map, which the bindings ignore), and
D1's results come back in one JSON crossing. Bindings are looked up when used, as KvStore
does: a request that never touches storage pays nothing. Covered by the end-to-end suite
(tests/e2e/test_storage.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import js
from pyodide.ffi import JsProxy, create_proxy, to_js

from services import Background
from storage import LIST_LIMIT, Listing

BLOBS_BINDING = "FILES"
DB_BINDING = "JOBS_DB"
_BYTES = (bytes, bytearray, memoryview)


def _obj(d: dict):
    return to_js(d, dict_converter=js.Object.fromEntries)


def _u8(data) -> object:
    """A JS Uint8Array holding a copy of `data` (a view into Pyodide's heap would move when
    the heap grows)."""
    view = memoryview(data).cast("B")
    out = js.Uint8Array.new(len(view))
    out.assign(view)
    return out


def _raw(binding):
    """The JS binding itself: `WorkerEntrypoint.env` hands R2 and D1 bindings out wrapped
    (the `workers` SDK's _BindingWrapper converts every result to Python, e.g. an
    ArrayBuffer to a memoryview), and this module speaks raw FFI."""
    return getattr(binding, "_binding", binding) if binding is not None else None


class MissingBinding(RuntimeError):
    """The Worker has no such binding (wrangler.toml declares it; a local run may not)."""


class R2Blobs:
    """storage.Blobs over an R2 bucket binding."""

    def __init__(self, env, binding: str = BLOBS_BINDING) -> None:
        self._env = env
        self._binding = binding

    @property
    def bucket(self):
        bucket = _raw(getattr(self._env, self._binding, None))
        if bucket is None:
            raise MissingBinding(f"no R2 binding {self._binding}")
        return bucket

    async def put(
        self,
        key: str,
        body: object,
        *,
        length: int | None = None,
        content_type: str | None = None,
    ) -> int:
        options = {"httpMetadata": {"contentType": content_type}} if content_type else {}
        if isinstance(body, _BYTES):
            value = _u8(body)
        elif isinstance(body, str) or not isinstance(body, JsProxy):
            value = body
        elif length is not None:
            # R2 needs a stream's length up front; FixedLengthStream gives it one and fails
            # the put if the stream brings more or fewer bytes than declared.
            fixed = js.FixedLengthStream.new(length)
            body.pipeTo(fixed.writable).catch(_IGNORE)  # its failure fails the put
            value = fixed.readable
        else:
            value = body  # a stream of known length (e.g. a request body with Content-Length)
        stored = await self.bucket.put(key, value, _obj(options))
        return int(stored.size)

    async def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        if length <= 0:
            return None if await self.size(key) is None else b""
        got = await self.bucket.get(key, _range(offset, length))
        if got is None:
            return None
        return (await got.arrayBuffer()).to_bytes()

    async def size(self, key: str) -> int | None:
        head = await self.bucket.head(key)
        return None if head is None else int(head.size)

    async def delete(self, keys: Sequence[str]) -> None:
        if keys:
            await self.bucket.delete(to_js(list(keys)))

    async def list(self, prefix: str, after: str | None = None, limit: int = LIST_LIMIT) -> Listing:
        # R2ListOptions (developers.cloudflare.com/r2/api/workers/workers-api-reference/
        # #r2listoptions): `prefix`, `limit` (<= 1,000); keys come in lexicographic order and
        # only `truncated` says more follow (a page may be short). `startAfter` (in
        # @cloudflare/workers-types' R2ListOptions; keys <= it are skipped) resumes after a
        # key we store in D1, which stays valid across cron runs, unlike an opaque cursor.
        options: dict[str, object] = {"prefix": prefix, "limit": max(1, min(limit, LIST_LIMIT))}
        if after is not None:
            options["startAfter"] = after
        got = await self.bucket.list(_obj(options))
        return Listing(tuple(str(o.key) for o in got.objects), bool(got.truncated))

    # ---- shell helpers: bodies that never enter Python ----------------------------------

    async def range_stream(self, key: str, offset: int, length: int):
        """A JS ReadableStream of `length` bytes of `key` from `offset` (fewer at the object's
        end), or None when there is no such object."""
        got = await self.bucket.get(key, _range(offset, length))
        return None if got is None else got.body

    def parts_stream(
        self,
        parts: Sequence[tuple[str, int, int]],
        background: Background | None = None,
    ):
        """One JS ReadableStream of the byte ranges `parts` ((key, offset, length) each), in
        order, for a response body. Its length is the sum of the lengths (a FixedLengthStream,
        so the response carries a Content-Length if it also says `content-encoding: identity`:
        the edge compresses other answers and drops the length). If a part is missing or
        shorter than its length, the body is aborted: the client sees it end short, never a
        clean end.
        Each part is piped JS-side (R2's body into the stream); Python runs once per part,
        never per chunk. `background` (the shell's ctx.waitUntil for a coroutine, as in
        services.Services) keeps the copying alive after the response head went out."""
        total = sum(length for _, _, length in parts)
        stream = js.FixedLengthStream.new(total)
        task = _copy_parts(self.bucket, parts, stream.writable)
        if background is not None:
            background(task)
        else:
            asyncio.ensure_future(task)  # noqa: RUF006 (the pipes' promises hold the task)
        return stream.readable


class MissingPart(LookupError):
    """A part of a parts stream names an object that is not there."""


_IGNORE = create_proxy(lambda *_: None)
_KEEP_OPEN = _obj({"preventClose": True})


def _range(offset: int, length: int):
    return _obj({"range": {"offset": offset, "length": length}})


async def _copy_parts(bucket, parts: Sequence[tuple[str, int, int]], writable) -> None:
    try:
        for key, offset, length in parts:
            if length <= 0:
                continue
            got = await bucket.get(key, _range(offset, length))
            if got is None:
                raise MissingPart(f"no object {key!r}")
            await got.body.pipeTo(writable, _KEEP_OPEN)
        await writable.close()
    except Exception as exc:  # any failure ends the body short, loudly
        writable.abort(js.Error.new(str(exc)[:200])).catch(_IGNORE)


class D1Db:
    """storage.Db over a D1 database binding."""

    def __init__(self, env, binding: str = DB_BINDING) -> None:
        self._env = env
        self._binding = binding

    @property
    def db(self):
        db = _raw(getattr(self._env, self._binding, None))
        if db is None:
            raise MissingBinding(f"no D1 binding {self._binding}")
        return db

    def _statement(self, sql: str, params: Sequence[object]):
        stmt = self.db.prepare(sql)
        if params:
            stmt = stmt.bind.apply(stmt, _js_params(params))
        return stmt

    async def all(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, object]]:
        result = await self._statement(sql, params).all()
        return json.loads(js.JSON.stringify(result.results))

    async def run(self, sql: str, params: Sequence[object] = ()) -> int:
        result = await self._statement(sql, params).run()
        return int(result.meta.changes)

    async def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[int]:
        prepared = js.Array.new()
        for sql, params in statements:
            prepared.push(self._statement(sql, params))
        results = await self.db.batch(prepared)
        return [int(r["meta"]["changes"]) for r in json.loads(js.JSON.stringify(results))]


def _js_params(params: Sequence[object]):
    """A JS array of bind values. Through JSON so that None arrives as null (Pyodide turns
    None into undefined, which D1 refuses); bytes become Uint8Arrays (BLOBs)."""
    plain = [None if isinstance(p, _BYTES) else p for p in params]
    values = js.JSON.parse(json.dumps(plain, allow_nan=False))
    for i, p in enumerate(params):
        if isinstance(p, _BYTES):
            values[i] = _u8(p)
    return values
