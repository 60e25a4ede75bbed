"""The relay-bench Worker: one way of relaying a node's event stream per request
(`?op=NAME`), so that `python -m bench.relay` can price each by workerd CPU per stream.

Every op forwards the request to UPSTREAM + /v1/completions (the simulator streams in `sse`
mode, or a streamed completion in `stream_reset` mode) and answers
with the events relayed its way; how a broken node body is noticed differs per op.
"""

import asyncio
import json
import time

import js
from pyodide.ffi import create_proxy, to_js
from workers import Response, WorkerEntrypoint

IGNORE = create_proxy(lambda *_: None)
_PIPE = to_js({"preventClose": True, "preventAbort": True}, dict_converter=js.Object.fromEntries)
FINAL = 'data: {"error":{"type":"upstream_disconnected"}}\n\n'


def _init(resp):
    headers = js.Headers.new(resp.headers)
    return to_js({"status": 200, "headers": headers}, dict_converter=js.Object.fromEntries)


def _json_headers():
    return to_js({"content-type": "application/json"}, dict_converter=js.Object.fromEntries)


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


async def op_native(resp, url):
    return resp.body


async def op_guarded(resp, url):
    return _piped(resp.body, js.TransformStream.new())


async def op_identity(resp, url):
    return _piped(resp.body, js.IdentityTransformStream.new())


async def _notice(piped):
    try:
        await piped
    except Exception:
        return


async def op_tee_digest(resp, url):
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


async def op_py_pump(resp, url):
    """An IdentityTransformStream fed by a Python read/write loop (a crossing per chunk)."""
    stream = js.IdentityTransformStream.new()
    asyncio.ensure_future(_pump(resp.body.getReader(), stream.writable.getWriter()))  # noqa: RUF006
    return stream.readable


class IdleWatch:
    """Ends a relay whose node has sent nothing for `idle_s`, without a crossing per chunk:
    a JS interval ticks every `tick_s`; at a tick with no read outstanding it starts one BYOB
    read of the watch branch (a tee of the node's body), which takes whatever came since in
    one go; the read's resolution stamps progress. So there are at most two Python calls a
    tick, whatever the event rate, and a stall is seen within `tick_s` after `idle_s`."""

    def __init__(self, branch, idle_s: float, tick_s: float, on_idle) -> None:
        self._reader = branch.getReader(mode="byob")
        self._idle_s = idle_s
        self._on_idle = on_idle
        self._pending = False
        self._progress = time.monotonic()
        self._tick = create_proxy(self.tick)
        self._got = create_proxy(self.got)
        self._failed = create_proxy(self.stop)
        self._timer = js.setInterval(self._tick, int(tick_s * 1000))

    def tick(self, *_):
        if not self._pending:
            self._pending = True
            self._reader.read(js.Uint8Array.new(65536)).then(self._got, self._failed)
        elif time.monotonic() - self._progress >= self._idle_s:
            self.stop()
            self._on_idle()

    def got(self, result):
        self._pending = False
        self._progress = time.monotonic()
        if result.done:
            self.stop()

    def stop(self, *_):
        if self._timer is None:
            return
        js.clearInterval(self._timer)
        self._timer = None
        self._reader.cancel().catch(IGNORE)
        for p in (self._tick, self._got, self._failed):
            p.destroy()


class TickWatch:
    """IdleWatch with one Python call a tick: a read's resolution is recorded by a JS builtin
    (`Array.prototype.push` bound to a JS array), which the next tick looks at. A read still
    pending at a tick means nothing came since the read before it resolved, which was no
    later than the tick that started this one: idle for at least `now - issued`."""

    def __init__(self, branch, idle_s: float, tick_s: float, on_idle) -> None:
        self._reader = branch.getReader(mode="byob")
        self._idle_s = idle_s
        self._on_idle = on_idle
        self._done = js.Array.new()
        self._push = self._done.push.bind(self._done)
        self._issued = None
        self._tick = create_proxy(self.tick)
        self._timer = js.setInterval(self._tick, int(tick_s * 1000))

    def tick(self, *_):
        now = time.monotonic()
        if self._issued is None or self._done.length:
            if self._done.length:
                got = self._done.pop()
                if got.done:
                    self.stop()
                    return
            self._issued = now
            self._reader.read(js.Uint8Array.new(65536)).then(self._push, self._push)
        elif now - self._issued >= self._idle_s:
            self.stop()
            self._on_idle()

    def stop(self):
        js.clearInterval(self._timer)
        self._reader.cancel().catch(IGNORE)
        self._tick.destroy()


def _watched(resp, stream, req_url):
    """On a stall, the node's fetch is aborted (its signal stays armed after the head): that
    errors the node's body, so the relay ends as it does when the node dies."""
    idle_s = float(req_url.searchParams.get("idle") or 30)
    client, watch = resp.body.tee()
    piped = client.pipeTo(stream.writable, _PIPE)
    piped.catch(IGNORE)
    abort = FETCH_ABORT.abort.bind(FETCH_ABORT)
    tick_s = float(req_url.searchParams.get("tick") or min(1.0, idle_s / 4))
    kind = TickWatch if req_url.searchParams.get("watch") == "tick" else IdleWatch
    kind(watch, idle_s, tick_s, abort)
    asyncio.ensure_future(_watch(piped, stream.writable))  # noqa: RUF006
    return stream.readable


async def op_identity_idle(resp, url):
    return _watched(resp, js.IdentityTransformStream.new(), url)


async def op_guarded_idle(resp, url):
    return _watched(resp, js.TransformStream.new(), url)


FETCH_ABORT = None  # the current request's fetch controller (the bench sends one at a time)

OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}

# ---- request bodies: read whole (each under a deadline but `array_buffer`), then forwarded


async def body_stream(req, declared):
    """bare-py's way: the body is not read, the runtime streams it to the node."""
    return None


async def body_array_buffer(req, declared):
    return await req.arrayBuffer()


async def body_loop(req, declared):
    """The gateway's read_limited: a Python crossing per chunk, a JS timer cancels the reader."""
    reader = req.body.getReader()
    timer = js.setTimeout(reader.cancel.bind(reader), 60_000)
    chunks, total = [], 0
    while True:
        chunk = await reader.read()
        if chunk.done:
            break
        total += chunk.value.byteLength
        chunks.append(chunk.value)
    js.clearTimeout(timer)
    joined = js.Uint8Array.new(total)
    offset = 0
    for c in chunks:
        joined.set(c, offset)
        offset += c.byteLength
    return joined


async def body_exact(req, declared):
    """The gateway's read_exact at any size: one BYOB readAtLeast of the declared length."""
    reader = req.body.getReader(mode="byob")
    timer = js.setTimeout(reader.cancel.bind(reader), 60_000)
    chunk = await reader.readAtLeast(declared, js.Uint8Array.new(declared))
    js.clearTimeout(timer)
    return chunk.value


STEP = 1 << 20


async def body_grow(req, declared):
    """BYOB readAtLeast in growing steps (1 MiB, then as much as has come so far): a few
    awaits per body, and never more memory allocated than twice what was actually sent."""
    reader = req.body.getReader(mode="byob")
    timer = js.setTimeout(reader.cancel.bind(reader), 60_000)
    chunks, total = [], 0
    while True:
        step = max(STEP, total)
        got = await reader.readAtLeast(step, js.Uint8Array.new(step))
        if got.value is not None and got.value.byteLength:
            chunks.append(got.value)
            total += got.value.byteLength
        if got.done or got.value is None or got.value.byteLength < step:
            break
    js.clearTimeout(timer)
    if len(chunks) == 1:
        return chunks[0]
    joined = js.Uint8Array.new(total)
    offset = 0
    for c in chunks:
        joined.set(c, offset)
        offset += c.byteLength
    return joined


async def body_steps(req, declared):
    """What the gateway does (src/body.py next_read_size): 64 KiB, then as much as has come."""
    reader = req.body.getReader(mode="byob")
    timer = js.setTimeout(reader.cancel.bind(reader), 60_000)
    chunks, total = [], 0
    while (size := min(declared - total, max(64 * 1024, total))) > 0:
        got = await reader.readAtLeast(size, js.Uint8Array.new(size))
        n = 0 if got.value is None else int(got.value.byteLength)
        if n:
            chunks.append(got.value)
            total += n
        if got.done or n < size:
            break
    js.clearTimeout(timer)
    joined = js.Uint8Array.new(total)
    offset = 0
    for c in chunks:
        joined.set(c, offset)
        offset += c.byteLength
    return joined


async def body_piped(req, declared):
    """A native pipe into a FixedLengthStream (aborted by a JS timer through the pipe's
    signal), read whole by arrayBuffer(): one Python await, no crossing per chunk."""
    stream = js.FixedLengthStream.new(declared)
    controller = js.AbortController.new()
    timer = js.setTimeout(controller.abort.bind(controller), 60_000)
    opts = to_js({"signal": controller.signal}, dict_converter=js.Object.fromEntries)
    req.body.pipeTo(stream.writable, opts).catch(IGNORE)
    try:
        return await js.Response.new(stream.readable).arrayBuffer()
    finally:
        js.clearTimeout(timer)


BODIES = {name[5:]: fn for name, fn in globals().items() if name.startswith("body_")}


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        req = getattr(request, "js_object", request)
        url = js.URL.new(req.url)
        target = str(self.env.UPSTREAM) + "/v1/completions"
        read = BODIES.get(url.searchParams.get("body") or "")
        if read is not None:
            declared = int(req.headers.get("content-length") or 0)
            body = await read(req, declared)
            if body is None:
                return await js.fetch(js.Request.new(target, req))
            headers = to_js(
                {"content-type": "application/json"}, dict_converter=js.Object.fromEntries
            )
            return await js.fetch(target, method="POST", headers=headers, body=body)
        op = OPS.get(url.searchParams.get("op") or "native")
        if op is None:
            return Response(json.dumps(sorted(OPS)), status=404)
        global FETCH_ABORT
        FETCH_ABORT = js.AbortController.new()
        resp = await js.fetch(js.Request.new(target, req), signal=FETCH_ABORT.signal)
        return js.Response.new(await op(resp, url), _init(resp))
