"""The gateway's I/O over the runtime's JS objects: fetch to a node up to its head, the KV
store, the cron's probe GET, the request body read, and the end of a relayed stream.

Shell code: it adapts the pure modules' interfaces (forward.Upstream, storage.HealthStore,
cron.Prober) to workerd and decides nothing itself (R2 and D1: jsstore.py). Covered by the
end-to-end suite.
"""

import time

import js
from pyodide.ffi import create_proxy, to_js

import capability
from attempt import Head
from body import (
    TOO_LARGE,
    BodyError,
    body_error,
    content_length,
    read_fault,
    short_body_fault,
)
from config import GatewayConfig
from errors import sse_error_event
from heady_shared.failures import HEAD_FIELDS, connection_error_kind
from health import KV_KEY
from routing import upstream_url

_PROBE_FIELDS = (*HEAD_FIELDS, "content-type")
# Bodies up to this declared size are read in one call into a buffer allocated up front
# (chat prompts mostly are); larger ones chunk by chunk (read_body).
EXACT_READ_MAX_BYTES = 16 * 1024
IGNORE = create_proxy(lambda *_: None)
# The pipe leaves the client's stream open whatever happens: the shell decides its end.
_PIPE_OPTIONS = to_js(
    {"preventClose": True, "preventAbort": True}, dict_converter=js.Object.fromEntries
)


class Relay:
    """A node's event stream (or chunked body) piped JS-side into a stream the gateway owns,
    so that if the node's body breaks the client's stream can be ended loudly (a final error
    event, or an abort) instead of the runtime's silent clean end. Python only awaits `piped`
    (how the pipe ended).

    A standard `TransformStream`, though each chunk then costs JS promise work (~0.1 ms CPU
    an event, docs/benchmarks.md): the runtime's native `IdentityTransformStream` would pump
    for free, but when its source errors, workerd's pipeTo marks the destination errored even
    with preventAbort (`WritableStreamInternalController::doError` in
    src/workerd/api/streams/internal.c++, v1.20241106), so nothing can be written after."""

    def __init__(self, node_body) -> None:
        stream = js.TransformStream.new()
        self.writable = stream.writable
        self.piped = node_body.pipeTo(stream.writable, _PIPE_OPTIONS)
        self.piped.catch(IGNORE)  # awaited by the shell; a torn-down request must not log it
        self.readable = stream.readable


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
        resp, error = await fetch_head(
            url,
            timeout_s,
            self._client,
            method=self._method,
            headers=self._headers,
            body=self._body,
        )
        if error:
            return "client_gone" if self._client.aborted else error
        h = resp.headers
        return Head(int(resp.status), {f: h.get(f) for f in HEAD_FIELDS}, resp)

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


def end_loudly(writer, rid: str) -> None:
    """After a node's event stream broke: one final error event, then a clean end. Queued in
    JS and not awaited: the writes settle as the client reads them, possibly after the request
    is over, and a task waiting on them would then never resume (bench/README.md)."""
    writer.write(js.TextEncoder.new().encode(sse_error_event(rid))).catch(IGNORE)
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
    # A small declared length is read by one readAtLeast (one await: the cheapest read a
    # deadline can cut off, bench/README.md). Its buffer is allocated before a byte arrives,
    # so a larger body, a chunked upload, or one whose framing is not its Content-Length is
    # read by chunks with a running total: memory grows only with what was actually sent.
    exact = (
        declared is not None
        and 0 < declared <= EXACT_READ_MAX_BYTES
        and "transfer-encoding" not in headers
    )
    try:
        if exact:
            body = await read_exact(stream, declared, config.timeouts.upload_s)
        else:
            body = await read_limited(stream, limit, config.timeouts.upload_s)
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


async def read_exact(stream, declared: int, upload_s: float):
    """Read a body framed by its Content-Length: workerd's BYOB `readAtLeast` fills one
    buffer of the declared size in a single await (the HTTP layer delivers no byte past the
    declared length). It returns fewer bytes, done, if the client stopped short.
    TimeoutError when the upload deadline cut it short."""
    reader = stream.getReader(mode="byob")
    with _UploadDeadline(reader, upload_s) as deadline:
        chunk = await reader.readAtLeast(declared, js.Uint8Array.new(declared))
    got = chunk.value
    size = 0 if got is None else int(got.byteLength)
    if size < declared and deadline.passed:
        raise TimeoutError
    return got if got is not None else js.Uint8Array.new(0)


async def read_limited(stream, limit: int, upload_s: float):
    """Read a body with a running total, so an endless upload is cut off at the limit instead
    of exhausting the isolate's memory (None when over it), and within `upload_s`.
    TimeoutError when the upload deadline cut the upload short."""
    reader = stream.getReader()
    chunks = []
    total = 0
    with _UploadDeadline(reader, upload_s) as deadline:
        while True:
            chunk = await reader.read()
            if chunk.done:
                break
            total += chunk.value.byteLength
            if total > limit:
                reader.cancel()
                return None
            chunks.append(chunk.value)
    if deadline.passed:
        raise TimeoutError  # the timer ended the read: whatever came is not the whole body
    if len(chunks) == 1:
        return chunks[0]
    joined = js.Uint8Array.new(total)
    offset = 0
    for c in chunks:
        joined.set(c, offset)
        offset += c.byteLength
    return joined


async def fetch_head(url: str, timeout_s: float, client=None, **init):
    """fetch() until the response head arrives: (response, None), or (None, "timeout" |
    "refused" | "error"). The time-out covers the head only: a JS timer aborts the fetch and
    is cleared once the head is in, so a body that then streams for longer is not cut. (A
    Python timer — asyncio.wait_for — would outlive a request that ends first and leak what it
    holds: bench/README.md.) With the client's signal, the fetch also stops when it leaves."""
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
