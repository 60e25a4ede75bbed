"""The op-bench Worker: one runtime operation per request, so that `python -m bench.ops` can
price it by workerd's CPU time per request against a request that does nothing.

Clocks inside the isolate stand still while it computes, so operations are priced from the
outside (CPU of the workerd process, /proc) over thousands of requests. Each operation is
one of the choices the gateway's shell makes (see bench/README.md, "What a crossing costs").
"""

import json

import js
from pyodide.ffi import create_proxy, to_js
from workers import Response, WorkerEntrypoint

IGNORE = create_proxy(lambda *_: None)
BODY = '{"model": "reasoning", "prompt": "hello there", "max_tokens": 8}'
LINE = {
    "msg": "request",
    "request_id": "0123456789abcdef01234567",
    "method": "POST",
    "route": "/api/heavy/*",
    "role": "reasoning",
    "status": 200,
    "ms": 1.2,
    "attempts": [{"node": 1, "outcome": "pass", "reason": "ok", "status": 200, "ms": 1.0}],
}
HEADERS = {
    "content-type": "application/json",
    "content-encoding": "identity",
    "x-heady-node": "1",
    "x-heady-role": "reasoning",
    "x-heady-attempts": "1",
    "x-heady-fallback": "false",
    "x-request-id": "0123456789abcdef01234567",
    "access-control-allow-origin": "*",
}


def _obj(d: dict):
    return to_js(d, dict_converter=js.Object.fromEntries)


def _request():
    return js.Request.new(
        "http://ops.invalid/", method="POST", body=BODY, headers=_obj({"content-type": "a/b"})
    )


async def op_noop(req):
    return None


async def op_attr(req):
    return req.method


async def op_await_js(req):
    await js.Promise.resolve(1)


async def op_headers_to_py(req):
    js.Object.fromEntries(req.headers).to_py()


async def op_dict_to_js(req):
    _obj(HEADERS)


async def op_print_line(req):
    print(json.dumps(LINE, separators=(",", ":")))


async def op_console_log_line(req):
    js.console.log(json.dumps(LINE, separators=(",", ":")))


async def op_response_js(req):
    return js.Response.new("ok", status=200, headers=_obj(HEADERS))


async def op_response_sdk(req):
    return Response(js.Response.new("ok", status=200, headers=_obj(HEADERS)))


async def op_signal_any(req):
    c = js.AbortController.new()
    js.AbortSignal.any(to_js([c.signal, req.signal]))


async def op_signal_listener(req):
    c = js.AbortController.new()
    req.signal.addEventListener("abort", c.abort.bind(c))


async def op_head_timer(req):
    c = js.AbortController.new()
    js.clearTimeout(js.setTimeout(c.abort.bind(c), 60_000))


async def op_body_new(req):
    _request()


async def op_body_array_buffer(req):
    await _request().arrayBuffer()


async def op_body_reader_loop(req):
    reader = _request().body.getReader()
    timer = js.setTimeout(reader.cancel.bind(reader), 60_000)
    while not (await reader.read()).done:
        pass
    js.clearTimeout(timer)


async def op_body_read_at_least(req):
    reader = _request().body.getReader(mode="byob")
    timer = js.setTimeout(reader.cancel.bind(reader), 60_000)
    n = len(BODY)
    await reader.readAtLeast(n, js.Uint8Array.new(n))
    js.clearTimeout(timer)


async def op_transform_stream(req):
    js.TransformStream.new()


async def op_identity_stream(req):
    js.IdentityTransformStream.new()


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        req = getattr(request, "js_object", request)
        name = js.URL.new(req.url).searchParams.get("op") or "noop"
        op = OPS.get(name)
        if op is None:
            return Response(json.dumps(sorted(OPS)), status=404)
        out = await op(req)
        # A Response made by the operation is what the request answers (so it is priced
        # whole, through the runtime's hand-over); anything else answers a plain "ok".
        return out if out is not None and name.startswith("response") else Response("ok")
