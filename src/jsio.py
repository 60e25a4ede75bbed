"""The gateway's I/O over the runtime's JS objects: fetch to a node up to its head, the KV
store, the cron's probe GET, the request body read, and the end of a relayed stream.

Shell code: it adapts the pure modules' interfaces (forward.Upstream, storage.HealthStore,
cron.Prober) to workerd and decides nothing itself (R2 and D1: jsstore.py). Covered by the
end-to-end suite.
"""

import time
from collections.abc import Callable

import js
from pyodide.ffi import create_once_callable, create_proxy, to_js

import capability
from attempt import Head
from body import (
    TOO_LARGE,
    BodyError,
    body_error,
    content_length,
    next_read_size,
    read_fault,
    short_body_fault,
)
from config import GatewayConfig
from errors import sse_error_event
from heady_shared.failures import HEAD_FIELDS, connection_error_kind
from health import KV_KEY
from routing import upstream_url

_PROBE_FIELDS = (*HEAD_FIELDS, "content-type")
# An IdleWatch ticks this many times per STREAM_IDLE_S (at most every 100 ms): a stall is
# ended within 1.2 x STREAM_IDLE_S, at ~0.45 ms CPU a tick.
IDLE_TICKS = 10
IDLE_TICK_MIN_MS = 100
# What one watch read takes at most: more than a token stream sends in a tick.
_IDLE_READ_BYTES = 256 * 1024
IGNORE = create_proxy(lambda *_: None)
# The pipe leaves the client's stream open whatever happens: the shell decides its end.
_PIPE_OPTIONS = to_js(
    {"preventClose": True, "preventAbort": True}, dict_converter=js.Object.fromEntries
)


class Relay:
    """A node's event stream (or chunked body) piped into a stream the gateway owns, so that
    if the node's body breaks the client's stream can be ended loudly (a final error event,
    or an abort) instead of the runtime's silent clean end. Python only awaits `piped` (how
    the pipe ended); `stop()` once it has.

    `mode` (STREAM_RELAY) picks the stream (docs/stream-relay-research.md):
    - "native": an `IdentityTransformStream`, which the runtime pumps with no JS per chunk.
      Since workerd v1.20260619 (what production runs) the destination of a failed pipe with
      `preventAbort` stays writable, so the final event can be written; the offline pin
      (v1.20241106) errors it (`WritableStreamInternalController::writeLoopAfterFrontOutputLock`
      calls `doError` on that path), and the client then sees a clean end.
    - "guarded": a standard `TransformStream`, whose writable side survives in every runtime,
      at the cost of JS promise work per chunk (~0.2 ms CPU an event offline).

    With `idle_s` > 0 (event streams only), an IdleWatch on a tee of the node's body ends the
    relay when the node has sent nothing that long: it calls `abort` (the node fetch's own
    controller), which errors the node's body, and `idle` tells `_finish` why."""

    def __init__(self, node_body, mode: str, idle_s: float = 0.0, abort=None) -> None:
        native = mode == "native"
        watched = idle_s > 0 and abort is not None
        self._controller = None  # a watched guarded relay's TransformStream controller
        if native:
            stream = js.IdentityTransformStream.new()
        elif watched:  # one Python call more, for end_stalled
            start = create_once_callable(self._started)
            stream = js.TransformStream.new(js_obj({"start": start}))
        else:
            stream = js.TransformStream.new()
        self.native = native
        self.writable = stream.writable
        self.readable = stream.readable
        self.idle = False
        self.abort_errors: list[str] = []  # what a stall's aborts threw (logged with the cut)
        self._watch: IdleWatch | None = None
        options = _PIPE_OPTIONS
        # Called at a stall, after the aborts (the shell sets it for a guarded event stream):
        # the pipe itself may notice its abort only when the silent node writes again
        # (workerd checks the signal between reads), which can be never, so the client's
        # stream is ended from here, not when the pipe settles.
        self.on_stall: Callable[[], None] | None = None
        if watched:
            node_body, branch = node_body.tee()
            # A stall ends the pipe itself too (its signal), not only the node fetch: an
            # aborted fetch's body was seen to error only at the node's next write.
            self._pipe = js.AbortController.new()
            self._abort = abort
            self._watch = IdleWatch(branch, idle_s, self._stalled)
            options = js_obj({"preventClose": True, "preventAbort": True,
                              "signal": self._pipe.signal})  # fmt: skip
        self.piped = node_body.pipeTo(stream.writable, options)
        self.piped.catch(IGNORE)  # awaited by the shell; a torn-down request must not log it

    def _started(self, controller) -> None:
        self._controller = controller

    def _stalled(self) -> None:
        self.idle = True
        for abort in (self._abort, self._pipe.abort):
            # The offline runtime now and then throws from the node fetch's abort ("internal
            # error": io-context.c++ checkFarGet, an IoOwn already gone), seen under load. The
            # client's stream must still end here: once `idle` is set nothing else ends it.
            # The node's body is cancelled regardless: the pipe cancels its side when the
            # transform ends, and the watch cancelled its own.
            try:
                abort()
            except Exception as exc:
                self.abort_errors.append(str(exc)[:200])
        if self.on_stall is not None:
            self.on_stall()

    def end_stalled(self, event: str) -> bool:
        """A guarded relay after a stall: `event` (the final error event) and the end, put
        on the client's side through the transform's own controller, so they do not wait for
        the pipe to let go of the writable side. False when that side is gone (the client
        left) or this is no guarded relay."""
        c = self._controller
        if c is None:
            return False
        try:
            c.enqueue(js.TextEncoder.new().encode(event))
            c.terminate()
        except Exception:  # TypeError: the readable side is closed or errored (client left)
            return False
        return True

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None


class IdleWatch:
    """Calls `on_idle` once the node has sent nothing for `idle_s`, without a Python call per
    chunk. A JS interval ticks every `idle_s / IDLE_TICKS`; at a tick with no read outstanding
    it starts one BYOB read of `branch` (a tee of the node's body), which takes whatever came
    since in one go. The read settles into a JS array through a bound builtin (`push`), so a
    tick is the only Python call. A read still pending at a tick means nothing came since the
    read before it settled, which was no later than the tick that started this one: the node
    has been silent for at least `now - issued`. A stall is therefore seen between `idle_s`
    and `idle_s` plus two ticks after the node's last byte; a node that sends anything within
    `idle_s` is never cut. Each tick costs ~0.45 ms of CPU offline (docs/benchmarks.md).

    If the request is torn down first (the client left), the runtime drops the interval with
    it; the tick's proxy is then never destroyed (no FinalizationRegistry offline)."""

    def __init__(self, branch, idle_s: float, on_idle) -> None:
        self._reader = branch.getReader(mode="byob")
        self._idle_s = idle_s
        self._on_idle = on_idle
        self._settled = js.Array.new()
        self._push = self._settled.push.bind(self._settled)
        self._issued: float | None = None
        self._tick = create_proxy(self._on_tick)
        tick_ms = max(IDLE_TICK_MIN_MS, int(idle_s * 1000 / IDLE_TICKS))
        self._timer = js.setInterval(self._tick, tick_ms)

    def _on_tick(self, *_) -> None:
        now = time.monotonic()
        if self._issued is not None and not self._settled.length:
            if now - self._issued >= self._idle_s:
                self.stop()
                self._on_idle()
            return
        if self._settled.length:
            got = self._settled.pop()
            if js.Reflect.get(got, "done") is not False:  # the end, or the read failed
                self.stop()
                return
        self._issued = now
        read = self._reader.read(js.Uint8Array.new(_IDLE_READ_BYTES))
        read.then(self._push, self._push)

    def stop(self) -> None:
        if self._timer is None:
            return
        js.clearInterval(self._timer)
        self._timer = None
        self._reader.cancel().catch(IGNORE)
        self._tick.destroy()


def js_obj(d: dict):
    return to_js(d, dict_converter=js.Object.fromEntries)


class KvStore:
    """storage.HealthStore over the HEALTH_KV binding, looked up only when KV is used: most
    requests never touch it, and every lookup is a crossing into JS. Without the binding
    (a local run without KV) it reads nothing and writes nowhere."""

    def __init__(self, env) -> None:
        self._env = env

    async def read(self) -> str | None:
        kv = getattr(self._env, "HEALTH_KV", None)
        if kv is None:
            return None
        # 60 s is the shortest edge cache KV allows.
        raw = await kv.get(KV_KEY, cacheTtl=60)
        return None if raw is None else str(raw)

    async def write(self, body: str, ttl_s: int) -> None:
        kv = getattr(self._env, "HEALTH_KV", None)
        if kv is not None:
            await kv.put(KV_KEY, body, expirationTtl=ttl_s)


class Upstream:
    """forward.Upstream: one fetch per node, up to the response head, with the client's
    request body (buffered once, so any node can be sent the same bytes)."""

    def __init__(self, config: GatewayConfig, route, method: str, headers, body, client) -> None:
        self._config = config
        self._route = route
        self._method = method
        self._headers = headers
        self._body = body
        # The incoming request's AbortSignal fires when the client disconnects before our
        # response (compat flag enable_request_signal; docs/client-faults.md). The runtime
        # ignores it for subrequests, so each fetch gets a fresh signal that follows it.
        self._client = client
        self._tried = 0

    async def head(self, node: int, timeout_s: float):
        if self._tried and self._client.aborted:  # gone while the last node failed
            return "client_gone"
        self._tried += 1
        url = upstream_url(self._config.node(node).base_url, self._route)
        # Each node fetch's own AbortController travels with its head (Head.abort): aborting
        # it after the head errors the node's body (how a stalled stream is ended: Relay).
        controller = js.AbortController.new()
        resp, error = await fetch_head(
            url,
            timeout_s,
            self._client,
            controller,
            method=self._method,
            headers=self._headers,
            body=self._body,
        )
        if error:
            return "client_gone" if self._client.aborted else error
        h = resp.headers
        return Head(int(resp.status), {f: h.get(f) for f in HEAD_FIELDS}, resp, controller)

    def discard(self, head: Head) -> None:
        discard(head.response)


class Prober:
    """cron.Prober: GET a node path with the node token and a head time-out."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        h = {"ngrok-skip-browser-warning": "1", "accept": "application/json, text/plain"}
        if config.node_token:
            h["authorization"] = f"Bearer {config.node_token}"
        self._headers = js_obj(h)

    async def get(self, node: int, path: str, timeout_s: float):
        url = self._config.node(node).base_url + path
        resp, error = await fetch_head(url, timeout_s, method="GET", headers=self._headers)
        if error:
            return error
        h = resp.headers
        head = Head(int(resp.status), {f: h.get(f) for f in _PROBE_FIELDS})
        if not 200 <= head.status < 300:
            discard(resp)
            return head, ""
        return head, str(await resp.text())


def end_loudly(writer, rid: str, kind: str = "upstream_disconnected") -> None:
    """After a node's event stream broke (or went silent): one final error event, then a
    clean end. Queued in JS and not awaited: the writes settle as the client reads them,
    possibly after the request is over, and a task waiting on them would then never resume
    (bench/README.md)."""
    writer.write(js.TextEncoder.new().encode(sse_error_event(rid, kind))).catch(IGNORE)
    writer.close().catch(IGNORE)


def end_abruptly(writer) -> None:
    """After a node's chunked (non-event-stream) body broke: abort the client's body rather
    than close it. The offline workerd still ends it with a final chunk (kj's chunked writer
    does when a body is torn down: bench/README.md), so the client gets the short body."""
    writer.abort(js.Error.new("upstream disconnected")).catch(IGNORE)


def body_contains(body, needle: bytes) -> bool:
    """Whether the request body (the JS buffer read_body returned) contains `needle`, copied
    into Python one bounded window at a time (capability.contains): never the whole body at
    once, never parsed."""
    if body is None:
        return False
    total = int(body.byteLength)
    return capability.contains(lambda a, b: body.subarray(a, b).to_bytes(), total, needle)


async def read_body(js_req, headers, config: GatewayConfig):
    """The whole request body, read once under the upload deadline, before any node is
    contacted: a slow or broken upload is the client's fault and must never cost a node a
    mark or GPU time, and a truncated body must never reach a node as if whole.
    Returns the bytes (a JS buffer, or None) or a BodyError for the client."""
    limit = config.max_body_bytes
    declared = content_length(headers.get("content-length"), limit)
    if isinstance(declared, BodyError):
        return declared
    stream = js_req.body
    if stream is None:
        return None
    # A body framed by its Content-Length is read up to it; a chunked one (or one that also
    # declares a length it is not framed by) up to the limit: by BYOB reads in growing steps,
    # a few runtime calls per body instead of a Python crossing per network chunk.
    framed = declared if "transfer-encoding" not in headers else None
    try:
        body = await read_whole(stream, framed, limit, config.timeouts.upload_s)
    except TimeoutError:
        secs = config.timeouts.upload_s
        return BodyError(408, "upload_timeout", f"request body not sent within {secs:g} s")
    except Exception as exc:  # bad chunked framing, a client that dropped mid-upload
        fault = read_fault(str(exc))
        if fault is None:
            raise  # our own misuse of the stream: a logged internal error
        return body_error(fault)
    if body is None:
        return BodyError(413, TOO_LARGE, f"request body exceeds the {limit} byte limit")
    fault = short_body_fault(declared, int(body.byteLength))
    return body_error(fault) if fault else body


class _UploadDeadline:
    """A JS timer that cancels `reader` at `upload_s`, cleared when the read is over: no
    Python timer or promise outlives the request (either leaks what it holds:
    bench/README.md). `passed` says afterwards whether the deadline is what ended the read."""

    def __init__(self, reader, upload_s: float) -> None:
        self._upload_s = upload_s
        self._started = time.monotonic()
        self._timer = js.setTimeout(reader.cancel.bind(reader), max(1, int(upload_s * 1000)))

    def __enter__(self) -> "_UploadDeadline":
        return self

    def __exit__(self, *_exc) -> None:
        js.clearTimeout(self._timer)

    @property
    def passed(self) -> bool:
        return time.monotonic() - self._started >= self._upload_s - 0.05  # coarse clocks


async def read_whole(stream, declared: int | None, limit: int, upload_s: float):
    """Read a body whole with BYOB `readAtLeast` calls sized by `next_read_size`: each fills
    its buffer inside the runtime in one await (1 MiB and 10 MiB bodies at ~1x bare Python's
    latency, bench/README.md), with the upload deadline's timer cancelling the reader.
    Returns the bytes, or None when an undeclared length went over `limit`.
    TimeoutError when the upload deadline cut the upload short."""
    reader = stream.getReader(mode="byob")
    chunks = []
    total = 0
    with _UploadDeadline(reader, upload_s) as deadline:
        try:
            while (size := next_read_size(total, declared, limit)) > 0:
                got = await reader.readAtLeast(size, js.Uint8Array.new(size))
                value = got.value
                n = 0 if value is None else int(value.byteLength)
                if n:
                    chunks.append(value)
                    total += n
                if got.done or n < size:
                    break
        except Exception:
            if deadline.passed:  # the timer's cancel can fail a read in flight
                raise TimeoutError from None
            raise
    if total > limit:
        reader.cancel()
        return None
    if deadline.passed and (declared is None or total < declared):
        raise TimeoutError  # the timer ended the read: whatever came is not the whole body
    if len(chunks) == 1:
        return chunks[0]
    joined = js.Uint8Array.new(total)
    offset = 0
    for c in chunks:
        joined.set(c, offset)
        offset += c.byteLength
    return joined


async def fetch_head(url: str, timeout_s: float, client=None, controller=None, **init):
    """fetch() until the response head arrives: (response, None), or (None, "timeout" |
    "refused" | "error"). The time-out covers the head only: a JS timer aborts the fetch and
    is cleared once the head is in, so a body that then streams for longer is not cut. (A
    Python timer — asyncio.wait_for — would outlive a request that ends first and leak what it
    holds: bench/README.md.) With the client's signal, the fetch also stops when it leaves.
    `controller` (made here if not given) stays armed after the head: aborting it then
    errors the response's body."""
    if controller is None:
        controller = js.AbortController.new()
    signal = controller.signal
    if client is not None:
        signal = js.AbortSignal.any(to_js([signal, client]))
    timer = js.setTimeout(controller.abort.bind(controller), max(1, int(timeout_s * 1000)))
    try:
        resp = await js.fetch(url, signal=signal, redirect="manual", **init)
    except Exception as exc:  # workerd's network errors arrive as JsException
        if controller.signal.aborted:
            return None, "timeout"
        # "refused" (connection lost or refused) or "error" (DNS, TLS, anything else)
        return None, connection_error_kind(str(exc))
    finally:
        js.clearTimeout(timer)
    return resp, None


def discard(resp) -> None:
    """Free the connection of an answer we will not relay."""
    if resp is not None and resp.body is not None:
        resp.body.cancel()
