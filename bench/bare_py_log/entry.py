"""bare-py plus one structured log line per request (about the size of the gateway's): with
it, the memory section can tell whether the runtime keeps log output. Otherwise identical to
bench/bare_py/entry.py."""

import json

import js
from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        req = getattr(request, "js_object", request)
        url = js.URL.new(req.url)
        target = str(self.env.UPSTREAM) + url.pathname + url.search
        resp = await js.fetch(js.Request.new(target, req))
        line = {
            "msg": "request",
            "rid": "0123456789abcdef",
            "method": str(req.method),
            "path": str(url.pathname),
            "status": int(resp.status),
            "attempts": [{"node": 1, "outcome": "pass", "reason": "ok", "ms": 1.0}],
            "ms": 1.0,
        }
        print(json.dumps(line, separators=(",", ":")))
        return Response(resp)
