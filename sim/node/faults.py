"""What a failing node sends instead of vLLM's answer: the fault modes of ``sim.node.modes``.

Each function writes one faulty answer on ``resp``; ``header`` is the node's ``x-sim-node``
header, so a test can tell which node answered even when the answer is an error page.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import Any

from sim.node.wire import JSON, SSE_TYPE, dumps, error_body
from sim.server import HTTPConnection, Response

__all__ = [
    "cf_tunnel_down",
    "cut_body",
    "die",
    "hang",
    "ngrok_offline",
    "send_status",
    "sse",
]

# How long a dying node lingers after its last byte before the RST: long enough for the peer
# to have read what was sent (an RST can make the peer's kernel drop unread data).
RST_GRACE_S = 0.05
Header = tuple[str, str]

_NGROK_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ngrok - Endpoint offline</title></head>
<body><div class="error">
<h1>The endpoint sim-node-{n}.ngrok-free.app is offline.</h1>
<p>ERR_NGROK_3200</p>
<p>The endpoint is offline: the agent serving it is not connected to ngrok.</p>
</div></body></html>
"""

_CF_HTML = """<!DOCTYPE html>
<html><head><title>Cloudflare Tunnel error | sim-node-{n}.example.com | Cloudflare</title></head>
<body><h1>Error 1033</h1><p>Cloudflare Tunnel error</p>
<p>error code: 1033</p><p>Cloudflare Ray ID: {ray}</p></body></html>
"""


async def hang(resp: Response, hung: set[HTTPConnection]) -> None:
    """Never answer: park the connection in ``hung`` until it is aborted or cancelled."""
    conn = resp.connection
    hung.add(conn)
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        hung.discard(conn)


def send_status(resp: Response, params: Mapping[str, Any], number: int, header: Header) -> None:
    """The ``status`` mode: that status, headers and body (default: a vLLM-shaped error)."""
    status: int = params["status"]
    extra: dict[str, str] = params["headers"]
    body = params["body"]
    ctype = "application/json"
    if body is None:
        message = f"simulated HTTP {status} from sim node {number}"
        payload = dumps(error_body(message, "sim_error", status)).encode()
    elif isinstance(body, bytes):
        payload, ctype = body, "application/octet-stream"
    elif isinstance(body, str):
        payload, ctype = body.encode(), "text/plain; charset=utf-8"
    else:
        payload = dumps(body).encode()
    headers = [(k, v) for k, v in extra.items()]
    if not any(k.lower() == "content-type" for k in extra):
        headers.append(("content-type", ctype))
    headers.append(header)
    resp.send(status, headers, payload)


def ngrok_offline(resp: Response, number: int, header: Header) -> None:
    """ngrok's edge when the agent behind the endpoint is gone (ERR_NGROK_3200)."""
    trace = os.urandom(16).hex()
    resp.send(
        404,
        [
            ("content-type", "text/html"),
            ("ngrok-error-code", "ERR_NGROK_3200"),
            ("ngrok-trace-id", trace),
            header,
        ],
        _NGROK_HTML.format(n=number).encode(),
    )


def cf_tunnel_down(resp: Response, number: int, header: Header) -> None:
    """Cloudflare's edge when the tunnel's connector is down (error 1033)."""
    ray = os.urandom(8).hex() + "-SJC"
    resp.send(
        530,
        [("content-type", "text/html"), ("server", "cloudflare"), ("cf-ray", ray), header],
        _CF_HTML.format(n=number, ray=ray).encode(),
    )


async def sse(resp: Response, events: int, interval: float, header: Header) -> None:
    """The ``sse`` mode: ``events`` numbered events ``interval`` s apart, then ``[DONE]``."""
    resp.start(200, [("content-type", SSE_TYPE), ("cache-control", "no-cache"), header])
    for k in range(events):
        if k and interval:
            await asyncio.sleep(interval)
        await resp.write(b"data: %b\n\n" % dumps({"i": k, "t": time.monotonic()}).encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.end()


async def die(resp: Response) -> None:
    """Let what was written reach the peer, then reset the connection (a dead node)."""
    conn = resp.connection
    while conn.write_buffer_size and not conn.closed:
        await asyncio.sleep(0.005)
    await asyncio.sleep(RST_GRACE_S)
    conn.reset()


async def cut_body(resp: Response, body: bytes, chunked: bool, header: Header) -> None:
    """``body_cut``: Content-Length (or, chunked, the framing) promises the whole body; half of
    it arrives, then the node dies."""
    if chunked:
        resp.start(200, [JSON, header])
    else:
        resp.start_fixed(200, [JSON, header], len(body))
    await resp.write(body[: len(body) // 2])
    await die(resp)
