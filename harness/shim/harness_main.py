"""Test-harness adapter: runs a modern `class Default(WorkerEntrypoint)` Worker on the offline
workerd, which only dispatches a top-level `on_fetch`.

Like the current runtime, it builds `Default(ctx, env)` per request and converts the request
and response with the SDK's `python_from_rpc` / `python_to_rpc`. These test-only routes and
switches exist here and nowhere in `src/`:
  POST /__harness/scheduled  -> awaits Default.scheduled(controller, env, ctx) (cron stand-in)
  GET  /__harness/kv-stats   -> KV calls counted at the binding boundary (?reset=1 zeroes them),
                                with the options of the last put (its expirationTtl)
  HARNESS_FAULT=<binding>    -> reading that binding raises (tests the 500 path)
  POST /__harness/reset      -> forget the isolate's health memory and the KV record, so each
                                test starts from a cold gateway without a 3 s restart
  GET  /__harness/kv-value   -> the raw health record in KV
  GET  /__harness/heap       -> Pyodide's WebAssembly heap size and Python's tracked objects
"""

import json
import time

import js
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


async def on_fetch(request, env, ctx):
    url = js.URL.new(request.url)
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
    worker = Default(ctx, wrapped_env)
    return python_to_rpc(await worker.fetch(python_from_rpc(request)))
