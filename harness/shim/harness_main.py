"""Test-harness adapter: runs a modern `class Default(WorkerEntrypoint)` Worker on the offline
workerd, which only dispatches a top-level `on_fetch`.

Like the current runtime, it builds `Default(ctx, env)` per request and converts the request
and response with the SDK's `python_from_rpc` / `python_to_rpc`. These test-only routes and
switches exist here and nowhere in `src/`:
  POST /__harness/scheduled  -> awaits Default.scheduled(controller, env, ctx) (cron stand-in)
  GET  /__harness/kv-stats   -> KV calls counted at the binding boundary (?reset=1 zeroes them),
                                with the options of the last put (its expirationTtl)
  HARNESS_FAULT=<binding>    -> reading that binding raises (tests the 500 path)
  HARNESS_ABORT_FAULT=1      -> a relay's abort of the node fetch raises, as the offline
                                runtime's now and then does ("internal error")
  POST /__harness/reset      -> forget the isolate's health memory and the KV record, so each
                                test starts from a cold gateway without a 3 s restart
  GET  /__harness/kv-value   -> the raw health record in KV
  GET  /__harness/heap       -> Pyodide's WebAssembly heap size and Python's tracked objects
  POST /__harness/blob?key=K  -> the request body streamed into R2 (jsstore.R2Blobs.put)
  GET  /__harness/blob?part=K:OFFSET:LENGTH[&part=...]
                              -> one ranged read (one part) or the parts as one body, streamed
                                 from R2 (R2Blobs.range_stream / parts_stream)
  POST /__harness/storage?key=K
                              -> storage.Blobs reads of K, then delete, and storage.Db calls
                                 against JOBS_DB; their results as JSON
"""

import asyncio
import json
import time

import js
from pyodide.ffi import create_proxy, to_js
from workers import python_from_rpc, python_to_rpc

from entry import Default

_COUNTS = {"get": 0, "put": 0, "delete": 0, "list": 0}
_LAST_PUT: dict = {}
_COUNTED_BINDING = "HEALTH_KV"


class _CountingKV:
    """Delegates to the real KV binding, counting each call as it crosses the boundary."""

    def __init__(self, kv):
        self._kv = kv

    def _count(self, op: str):
        _COUNTS[op] += 1
        return getattr(self._kv, op)

    def get(self, *args, **kwargs):
        return self._count("get")(*args, **kwargs)

    def put(self, *args, **kwargs):
        _LAST_PUT.clear()
        _LAST_PUT.update({"key": str(args[0]), "options": {k: v for k, v in kwargs.items()}})
        return self._count("put")(*args, **kwargs)

    def delete(self, *args, **kwargs):
        return self._count("delete")(*args, **kwargs)

    def list(self, *args, **kwargs):
        return self._count("list")(*args, **kwargs)


class _Env:
    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        # Fault injection for the test of the gateway's last-resort handler: the binding
        # named by HARNESS_FAULT raises when read, as a broken runtime binding would.
        if name == getattr(self._env, "HARNESS_FAULT", None):
            raise RuntimeError(f"harness fault: reading binding {name}")
        value = getattr(self._env, name)
        if name == _COUNTED_BINDING:
            value = _CountingKV(value)
        setattr(self, name, value)
        return value


class _Controller:
    type = "scheduled"

    def __init__(self, cron: str, at_ms: float | None):
        self.cron = cron
        self.scheduledTime = at_ms if at_ms is not None else time.time() * 1000


def _json(data, status=200):
    return js.Response.new(
        json.dumps(data),
        status=status,
        headers=js.Headers.new([["content-type", "application/json"]]),
    )


async def _blob(request, env, ctx, url):
    from jsstore import R2Blobs

    blobs = R2Blobs(env)
    if request.method == "POST":
        length = int(request.headers.get("content-length"))
        key = url.searchParams.get("key")
        stored = await blobs.put(key, request.body, length=length, content_type="text/plain")
        return _json({"stored": stored})
    parts = []
    for spec in url.searchParams.getAll("part"):
        key, offset, length = str(spec).rsplit(":", 2)
        parts.append((key, int(offset), int(length)))
    if len(parts) == 1:
        body = await blobs.range_stream(*parts[0])
        if body is None:
            return _json({"error": "no such object"}, 404)
    else:
        # as entry.Default._background: ctx.waitUntil takes a promise, not a coroutine
        body = blobs.parts_stream(
            parts, lambda aw: ctx.waitUntil(create_proxy(asyncio.ensure_future(aw)))
        )
    # identity: the edge (and miniflare) would gzip it and drop the Content-Length
    headers = [["content-type", "application/octet-stream"], ["content-encoding", "identity"]]
    return js.Response.new(body, status=200, headers=js.Headers.new(to_js(headers)))


async def _storage(env, key: str):
    """Every storage.Blobs and storage.Db call once, against the real bindings."""
    from jsstore import D1Db, R2Blobs

    blobs, db = R2Blobs(env), D1Db(env)
    size = await blobs.size(key)
    out = {
        "size": size,
        "first": (await blobs.get_range(key, 0, 16)).decode(),
        "middle": (await blobs.get_range(key, 1_000_000, 32)).decode(),
        "last": (await blobs.get_range(key, size - 10, 100)).decode(),  # fewer at the end
        "empty": (await blobs.get_range(key, 5, 0)).decode(),
        "missing": [await blobs.get_range(key + ".none", 0, 1), await blobs.size(key + ".none")],
        "put_bytes": await blobs.put(key + ".b", b"\x00\xffbytes"),
        "put_str": await blobs.put(key + ".s", "caf\u00e9", content_type="text/plain"),
        "bytes_back": list(await blobs.get_range(key + ".b", 0, 7)),
    }
    pages = [await blobs.list(key, limit=2), await blobs.list(key, after=key + ".b")]
    out["listed"] = [[list(p.keys), p.truncated] for p in pages]  # R2Blobs.list paging
    await blobs.delete([key, key + ".b", key + ".s"])
    out["after_delete"] = [await blobs.size(k) for k in (key, key + ".b", key + ".s")]

    await db.run("DROP TABLE IF EXISTS jobs")
    await db.run("CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT, n INTEGER, note TEXT)")
    insert = "INSERT INTO jobs (id, state, n, note) VALUES (?, ?, ?, ?)"
    out["batch"] = await db.batch(
        [
            (insert, ["a", "queued", 1, None]),
            (insert, ["b", "queued", 2, "x"]),
            ("UPDATE jobs SET state = ? WHERE state = ?", ["running", "queued"]),
        ]
    )
    out["returning"] = await db.all(
        "UPDATE jobs SET n = n + 10 WHERE id = ? RETURNING id, n, note", ["a"]
    )
    try:  # one transaction: the duplicate key undoes the insert before it
        await db.batch([(insert, ["c", "queued", 3, None]), (insert, ["a", "x", 0, None])])
        out["atomic"] = "no error"
    except Exception as exc:
        out["atomic"] = "UNIQUE" in str(exc)
    out["deleted"] = await db.run("DELETE FROM jobs WHERE id = ?", ["b"])
    out["rows"] = await db.all("SELECT id, state, n, note FROM jobs ORDER BY id")
    out["blob_param"] = await db.all("SELECT length(?) AS n, ? IS NULL AS is_null", [b"abc", None])
    return out


async def on_fetch(request, env, ctx):
    url = js.URL.new(request.url)
    if url.pathname == "/__harness/blob":
        return await _blob(request, env, ctx, url)
    if url.pathname == "/__harness/storage" and request.method == "POST":
        return _json(await _storage(env, str(url.searchParams.get("key"))))
    wrapped_env = _Env(env)
    if url.pathname == "/__harness/scheduled" and request.method == "POST":
        worker = Default(ctx, wrapped_env)
        started = time.time()
        at = url.searchParams.get("at")
        cron = url.searchParams.get("cron") or "* * * * *"
        controller = _Controller(cron, float(at) if at else None)
        await worker.scheduled(controller, wrapped_env, ctx)
        return _json({"ok": True, "ms": round((time.time() - started) * 1000, 1)})
    if url.pathname == "/__harness/reset" and request.method == "POST":
        # Imported here so any Worker with an `entry.Default` (e.g. the bench's bare
        # pass-through) runs under this adapter; only the gateway has this state to reset.
        import entry
        import health

        entry.reset_isolate()
        await env.HEALTH_KV.delete(health.KV_KEY)
        for key in _COUNTS:
            _COUNTS[key] = 0
        _LAST_PUT.clear()
        return _json({"ok": True})
    if url.pathname == "/__harness/kv-value":
        import health

        return _json({"value": await env.HEALTH_KV.get(health.KV_KEY)})
    if url.pathname == "/__harness/heap":
        # The Python side of the isolate's memory, for the bench's memory section: Pyodide's
        # WebAssembly heap (it only ever grows) and the objects Python's GC tracks. What RSS
        # adds beyond these is the runtime's own (V8 heap, workerd).
        import gc

        import pyodide_js

        heap = int(pyodide_js._module.HEAP8.length)
        return _json({"wasm_heap_bytes": heap, "python_objects": len(gc.get_objects())})
    if url.pathname == "/__harness/kv-stats":
        snapshot = {**_COUNTS, "last_put": dict(_LAST_PUT)}
        if url.searchParams.get("reset"):
            for key in _COUNTS:
                _COUNTS[key] = 0
        return _json(snapshot)
    if getattr(env, "HARNESS_ABORT_FAULT", None):
        _fault_relay_aborts()
    worker = Default(ctx, wrapped_env)
    return python_to_rpc(await worker.fetch(python_from_rpc(request)))


def _fault_relay_aborts() -> None:
    """Every jsio.Relay made from now on gets an `abort` that raises after aborting, as the
    offline runtime's fetch abort was seen to ("internal error" from io-context.c++
    checkFarGet) under load."""
    import jsio

    init = jsio.Relay.__init__
    if getattr(init, "faulted", False):
        return

    def faulted(self, node_body, mode, idle_s=0.0, abort=None):
        def raising():
            abort()
            raise RuntimeError("internal error (HARNESS_ABORT_FAULT)")

        init(self, node_body, mode, idle_s, None if abort is None else raising)

    faulted.faulted = True
    jsio.Relay.__init__ = faulted
