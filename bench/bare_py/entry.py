"""Bare Python pass-through Worker: the floor a Python Worker can reach on this runtime.

Forwards every request to the UPSTREAM var (same method, path, headers, body) and returns
the upstream response, body stream untouched. No auth, no routing, no logging."""

import js
from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        req = getattr(request, "js_object", request)
        url = js.URL.new(req.url)
        target = str(self.env.UPSTREAM) + url.pathname + url.search
        return Response(await js.fetch(js.Request.new(target, req)))
