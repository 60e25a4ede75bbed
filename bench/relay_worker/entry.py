"""The relay-bench Worker: one way of relaying a node's event stream per request
(`?op=NAME`), so that `python -m bench.relay` can price each by workerd CPU per stream.

Every op forwards the request to UPSTREAM + /v1/completions (the simulator streams in `sse`
mode, or a streamed completion in `stream_reset` mode) and answers
with the events relayed its way; how a broken node body is noticed differs per op.
"""

import asyncio
import json

import js
from pyodide.ffi import create_proxy, to_js
from workers import Response, WorkerEntrypoint

IGNORE = create_proxy(lambda *_: None)
_PIPE = to_js({"preventClose": True, "preventAbort": True}, dict_converter=js.Object.fromEntries)
FINAL = 'data: {"error":{"type":"upstream_disconnected"}}\n\n'


def _init(resp):
    headers = js.Headers.new(resp.headers)
    return to_js({"status": 200, "headers": headers}, dict_converter=js.Object.fromEntries)


def _ended_loudly(writer):
    writer.write(js.TextEncoder.new().encode(FINAL)).catch(IGNORE)
    writer.close().catch(IGNORE)


async def _watch(piped, writable):
    """The gateway's _finish, minus logging: close on a clean end, a final event on a break."""
    try:
        await piped
    except Exception:
        writer = writable.getWriter()
        if writer.desiredSize is not None:
            _ended_loudly(writer)
        return
    writable.getWriter().close().catch(IGNORE)


def _piped(body, stream):
    piped = body.pipeTo(stream.writable, _PIPE)
    piped.catch(IGNORE)
    asyncio.ensure_future(_watch(piped, stream.writable))  # noqa: RUF006
    return stream.readable


async def op_native(resp):
    return resp.body


async def op_guarded(resp):
    return _piped(resp.body, js.TransformStream.new())


async def op_identity(resp):
    return _piped(resp.body, js.IdentityTransformStream.new())


async def _notice(piped):
    try:
        await piped
    except Exception:
        return


async def op_tee_digest(resp):
    """A native branch for the client, the other piped into a native sink that keeps nothing
    (a digest): its pipe's promise says whether the node's body broke."""
    client, watch = resp.body.tee()
    piped = watch.pipeTo(js.crypto.DigestStream.new("MD5"))
    piped.catch(IGNORE)
    asyncio.ensure_future(_notice(piped))  # noqa: RUF006
    return client


async def _pump(reader, writer):
    try:
        while True:
            chunk = await reader.read()
            if chunk.done:
                break
            writer.write(chunk.value).catch(IGNORE)
    except Exception:
        _ended_loudly(writer)
        return
    writer.close().catch(IGNORE)


async def op_py_pump(resp):
    """An IdentityTransformStream fed by a Python read/write loop (a crossing per chunk)."""
    stream = js.IdentityTransformStream.new()
    asyncio.ensure_future(_pump(resp.body.getReader(), stream.writable.getWriter()))  # noqa: RUF006
    return stream.readable


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        req = getattr(request, "js_object", request)
        url = js.URL.new(req.url)
        op = OPS.get(url.searchParams.get("op") or "native")
        if op is None:
            return Response(json.dumps(sorted(OPS)), status=404)
        target = str(self.env.UPSTREAM) + "/v1/completions"
        resp = await js.fetch(js.Request.new(target, req))
        return js.Response.new(await op(resp), _init(resp))
