"""The node guard: the only HTTP surface the tunnel publishes is /v1/*, /health and /metrics.

vLLM's own `--api-key` check covers only paths under /v1 (and /v2, /inference, /cohere:
vllm/entrypoints/serve/middleware/authenticate.py, GUARDED_PREFIX, vLLM 0.33.0), so through a
tunnel anyone could reach /invocations (inference), /pause, /tokenize, /metrics and the dev-mode
endpoints. This guard answers everything else with 404 and demands the node token on every
exposed path except /health (the gateway's and the tunnels' liveness probe).

It runs inside vLLM's API server process: `vllm serve ... --middleware heady_node.guard.NodeGuard`.
vLLM 0.33 applies `--middleware` in `init_entrypoints_middleware`
(vllm/entrypoints/serve/middleware/register.py): a class is added with `app.add_middleware(cls)`
after vLLM's own middlewares, so Starlette makes it the outermost layer and it sees every request
first. The class gets no arguments, so the token comes from the environment (TOKEN_ENV); without
one the guard refuses to start and vLLM with it: fail closed, never open.

Pure ASGI on purpose: Starlette's BaseHTTPMiddleware re-wraps response bodies, while this passes
`send` through untouched, so streamed (SSE) answers leave as the engine writes them. It imports
nothing beyond the standard library and this package (relay, heady_shared), so vLLM's process
needs nothing extra installed.

The join with the image engine (vision nodes; docs/images.md): one tunnel, one guard. With
IMAGES_URL_ENV set, an allowed `/v1/images/*` request is relayed to the image engine's loopback
port (heady_node.relay) instead of vLLM, and `/metrics` gets the image engine's gauges and this
node's capabilities appended (heady_shared.capabilities). Every other request takes exactly the
path it took before: one prefix test more, `send` still untouched, so a chat stream's events
are not delayed by the join (tests/node/test_image_join.py measures it).
"""

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from heady_node import relay
from heady_shared import capabilities

TOKEN_ENV = "HEADY_NODE_TOKEN"
# Set by the node session for vLLM's process: where the image engine listens (loopback), and
# what vLLM itself serves (chat; image_input when started with image limits).
IMAGES_URL_ENV = "HEADY_IMAGES_URL"
CAPABILITIES_ENV = "HEADY_NODE_CAPABILITIES"
IMAGES_PREFIX = "/v1/images/"
METRICS_PATH = "/metrics"
IMAGE_METRICS_TIMEOUT_S = 2.0
IMPORT_PATH = "heady_node.guard.NodeGuard"
# Marks the guard's own refusals, so the launcher can tell "guard answered" from a route's 404.
MARK_HEADER = "x-heady-guard"
PUBLIC_PATHS = frozenset({"/health"})
TOKEN_PATHS = frozenset({"/metrics"})
TOKEN_PREFIXES = ("/v1/",)
# Mounted under /v1 when VLLM_ALLOW_RUNTIME_LORA_UPDATING is on (LoRA nodes: the resolver plugin
# needs it); they load any local path or hub id, so never from outside (docs/fine-tuning.md).
HIDDEN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Denial:
    status: int
    kind: str
    message: str


NOT_EXPOSED = Denial(404, "not_found", "not found")
NO_TOKEN = Denial(401, "unauthorized", "missing or invalid node token")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _exposed(path: str) -> bool:
    # Dot segments never reach a route, but a proxy in front might resolve them: refuse outright.
    segments = path.split("/")
    if "." in segments or ".." in segments or "\\" in path or "\x00" in path:
        return False
    if path.rstrip("/") in HIDDEN_PATHS:
        return False
    return path in PUBLIC_PATHS or path in TOKEN_PATHS or path.startswith(TOKEN_PREFIXES)


def bearer_matches(authorization: str | None, digest: bytes) -> bool:
    """Constant-time check of `Authorization: Bearer <token>` (digests have a fixed length, so
    the comparison time does not depend on how much of a guess is right)."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token_digest(value.strip()), digest)


def decide(path: str, authorization: str | None, digest: bytes) -> Denial | None:
    """None lets the request through; otherwise the answer the guard gives instead."""
    if not _exposed(path):
        return NOT_EXPOSED
    if path in PUBLIC_PATHS:
        return None
    return None if bearer_matches(authorization, digest) else NO_TOKEN


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _route_path(scope: Scope) -> str:
    # As vLLM's own auth middleware does: the path the router sees, without --root-path.
    path: str = scope.get("path") or "/"
    root: str = scope.get("root_path") or ""
    return path.removeprefix(root) if root else path


def parse_images_url(raw: str | None) -> tuple[str, int] | None:
    """(host, port) of the image engine from IMAGES_URL_ENV; None when unset. A value that is
    not http://host:port is refused at start, like a missing token (fail closed)."""
    if not raw or not raw.strip():
        return None
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        port = None
    if port is None or (
        parts.scheme != "http"
        or not parts.hostname
        or not parts.port
        or parts.path not in ("", "/")
    ):
        raise RuntimeError(f"{IMAGES_URL_ENV} must look like http://127.0.0.1:8001, got {raw!r}")
    return parts.hostname, port


def parse_capabilities(raw: str | None) -> tuple[str, ...]:
    names = {c.strip() for c in (raw or "").split(",") if c.strip()}
    unknown = names - set(capabilities.KNOWN)
    if unknown:
        raise RuntimeError(f"{CAPABILITIES_ENV}: unknown capabilities {sorted(unknown)}")
    return tuple(c for c in capabilities.KNOWN if c in names)


class NodeGuard:
    def __init__(
        self,
        app: ASGIApp,
        token: str | None = None,
        images_url: str | None = None,
        node_capabilities: str | None = None,
    ) -> None:
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not token.strip():
            raise RuntimeError(
                f"{TOKEN_ENV} is not set: the node guard refuses to start without the node token"
            )
        self.app = app
        self._digest = token_digest(token.strip())
        env = os.environ.get
        self.images = parse_images_url(
            images_url if images_url is not None else env(IMAGES_URL_ENV)
        )
        caps = node_capabilities if node_capabilities is not None else env(CAPABILITIES_ENV)
        self.capabilities = parse_capabilities(caps)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        path = _route_path(scope)
        authorization = _header(scope, b"authorization")
        denial = decide(path, authorization, self._digest)
        if denial is None:
            if scope["type"] == "http" and self.images and path.startswith(IMAGES_PREFIX):
                host, port = self.images
                await relay.relay(scope, receive, send, host, port, what="image engine")
            elif (
                scope["type"] == "http"
                and path == METRICS_PATH
                and (self.images or self.capabilities)
            ):
                await self._metrics(scope, receive, send, authorization)
            else:
                await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _send_denial(send, denial)

    async def _metrics(
        self, scope: Scope, receive: Receive, send: Send, authorization: str | None
    ) -> None:
        await _metrics_with_extras(self, scope, receive, send, authorization)


async def _send_denial(send: Send, denial: Denial) -> None:
    body = json.dumps(
        {"error": {"message": denial.message, "type": denial.kind, "code": denial.status}}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (MARK_HEADER.encode(), b"1"),
    ]
    if denial.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": denial.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Captured:
    """An inner app's whole answer (for /metrics only: small, and never streamed)."""

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers") or [])
        elif message["type"] == "http.response.body":
            self.body += message.get("body") or b""


async def _metrics_with_extras(
    guard: "NodeGuard", scope: Scope, receive: Receive, send: Send, authorization: str | None
) -> None:
    # vLLM's Prometheus app gzips when asked to; ask it for plain text so lines can be added.
    inner_scope = dict(scope)
    inner_scope["headers"] = [
        (k, v) for k, v in scope.get("headers") or () if k.lower() != b"accept-encoding"
    ]
    captured = _Captured()
    await guard.app(inner_scope, receive, captured.send)
    body = bytes(captured.body)
    if captured.status == 200:
        extra = capabilities.exposition(guard.capabilities)
        if guard.images:
            host, port = guard.images
            auth = authorization.encode("latin-1") if authorization else None
            text = await relay.fetch_text(host, port, METRICS_PATH, auth, IMAGE_METRICS_TIMEOUT_S)
            extra += text or ""
        if body and not body.endswith(b"\n"):
            body += b"\n"
        body += extra.encode()
    headers = [
        (k, v)
        for k, v in captured.headers
        if k.lower() not in (b"content-length", b"content-encoding", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": captured.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
