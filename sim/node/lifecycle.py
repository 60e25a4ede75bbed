"""A node's life: its port, its switchable mode, its request log, start/stop/reset.

``Node`` serves one port; the vLLM behaviour is ``sim.node.vllm.VllmApi``, the fault modes
``sim.node.faults``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from heady_shared import capabilities as caps
from sim.node import faults
from sim.node.capacity import UNLIMITED, Capacity, Scheduler, parse_capacity
from sim.node.images import ImageSim
from sim.node.lora import LoraRegistry
from sim.node.modes import HEALTHY, number, parse_mode
from sim.node.record import HISTORY, RecordedRequest
from sim.node.vllm import VllmApi
from sim.server import HTTPConnection, HTTPServer, Request, Response

__all__ = ["DEFAULT_MODEL", "Node"]

DEFAULT_MODEL = "sim-org/Sim-Model-1B-Instruct"


class Node(VllmApi):
    """A single simulated node on one port. All methods run on the node's event loop,
    except ``set_load``/``set_served_names``/``requests``/``clear_requests`` and the read-only
    properties, which are safe from any thread.

    ``model`` is the checkpoint path (the ``root`` of every model card); ``served_names`` the
    names the engine answers to (vLLM's ``--served-model-name``; default: ``model``);
    ``capacity`` its ``--max-num-seqs`` and time per token (``sim.node.capacity``; default: no
    limit, no delay)."""

    def __init__(
        self,
        number: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        served_names: Sequence[str] | None = None,
        dev_mode: bool = False,
        history: int = HISTORY,
        capacity: Capacity = UNLIMITED,
        capabilities: Sequence[str] = (caps.CHAT,),
        images: ImageSim | None = None,
        loras: LoraRegistry | None = None,
    ) -> None:
        self.number = number
        self.loras = loras  # vLLM with --enable-lora (sim.node.lora); None: without
        self.model = model
        self.served_names = _names(served_names or (model,))
        self.api_key = api_key
        self.dev_mode = dev_mode
        self.load = 0
        self.paused = False
        self.sleeping = False
        self._resumed: asyncio.Event | None = None
        self._server = HTTPServer(
            self._handle, host, port, on_head=self._record, on_close=self._closed
        )
        self._mode = HEALTHY
        self._log: deque[RecordedRequest] = deque(maxlen=history)
        self._log_lock = threading.Lock()
        self._total = 0
        # Admits completions (vllm:num_requests_running / _waiting); reset() restores `capacity`.
        self._scheduler = Scheduler(capacity)
        self._capacity = capacity
        self._seq = 0
        self._hung: set[HTTPConnection] = set()
        self._node_header = ("x-sim-node", str(number))
        self._started = False
        # What vLLM serves (the guard reports it) and the image engine beside it, if any.
        self.capabilities = _capabilities(capabilities)
        self.images = images
        self._start_caps = (self.capabilities, images)  # what reset() restores

    # -- properties ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode.name

    @property
    def mode_params(self) -> dict[str, Any]:
        return dict(self._mode.params)

    @property
    def request_count(self) -> int:
        """Requests received since the last clear (not bounded by the history size)."""
        return self._total

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        self._resumed = asyncio.Event()
        self._resumed.set()
        if self._mode.name != "refuse":
            await self._server.start()

    async def stop(self) -> None:
        self._started = False
        await self._server.stop()
        self._hung.clear()

    async def set_mode(self, mode: str, /, **params: Any) -> None:
        """Switch behaviour; returns once the change is in effect (port closed/re-bound)."""
        config = parse_mode(mode, params)
        old = self._mode
        if config.name == "refuse":
            self._mode = config
            # A dead node also kills its keep-alive connections, else pooled clients never notice.
            self._server.close_listener()
            self._server.abort_connections()
        else:
            if self._started and not self._server.listening:
                await self._server.start()  # same port again (SO_REUSEADDR)
            self._mode = config
        if old.name == "hang" and config.name != "hang":
            hung, self._hung = self._hung, set()
            for conn in hung:
                conn.abort()

    def set_load(self, load: int) -> None:
        self.load = int(number("load", load, integer=True))

    def set_served_names(self, names: Sequence[str] | None) -> None:
        """Answer to these model names from now on (None: the checkpoint path only)."""
        self.served_names = _names(names or (self.model,))

    def set_capabilities(
        self, capabilities: Sequence[str], images: ImageSim | bool | None = True
    ) -> None:
        """What vLLM serves from now on; `images` False drops the image engine (as if it had
        stopped), True keeps the current one, an ImageSim replaces it."""
        self.capabilities = _capabilities(capabilities)
        if images is False:
            self.images = None
        elif isinstance(images, ImageSim):
            self.images = images

    def reported_capabilities(self) -> tuple[str, ...]:
        """What this node's /metrics says it serves."""
        have = set(self.capabilities) | ({caps.IMAGE_GENERATION} if self.images else set())
        return tuple(c for c in caps.KNOWN if c in have)

    def requests(self) -> list[RecordedRequest]:
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()
            self._total = 0

    @property
    def capacity(self) -> Capacity:
        return self._scheduler.capacity

    async def set_capacity(self, **params: Any) -> None:
        """Change ``max_num_seqs`` (None: no limit) and/or ``token_s``; the others stay."""
        self._scheduler.set_capacity(parse_capacity(params, self._scheduler.capacity))

    async def reset(self) -> None:
        self._scheduler.set_capacity(self._capacity)
        self.capabilities, self.images = self._start_caps
        await self.set_mode("healthy")
        self.load = 0
        self._set_paused(False)
        self.sleeping = False
        if self.loras is not None:
            self.loras.reset()
        self.clear_requests()

    def state(self) -> dict[str, Any]:
        return {
            "node": self.number,
            "url": self.url,
            "mode": self.mode,
            "params": self.mode_params,
            "load": self.load,
            "requests": self.request_count,
            "api_key": self.api_key is not None,
            "model": self.model,
            "served_names": list(self.served_names),
            "loras": list(self.loras.loaded) if self.loras is not None else None,
            "dev_mode": self.dev_mode,
            "paused": self.paused,
            **self._scheduler.capacity.to_dict(),
            "running": self._scheduler.running,
            "waiting": self._scheduler.waiting,
            "capabilities": list(self.reported_capabilities()),
            **(
                {
                    "image_model": self.images.model,
                    "images_running": self.images.queue.running,
                    "images_waiting": self.images.queue.waiting,
                }
                if self.images
                else {}
            ),
        }

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self._resumed is not None:
            if paused:
                self._resumed.clear()
            else:
                self._resumed.set()

    # -- bookkeeping (server hooks, loop thread) ----------------------------------------------
    def _record(self, req: Request) -> None:
        rec = RecordedRequest(
            self.number,
            req.method,
            req.path,
            req.query,
            tuple(req.headers),
            b"",
            req.arrived,
            time.time(),
            req.declared,
        )
        req.meta = rec
        with self._log_lock:
            self._log.append(rec)
            self._total += 1

    def _closed(self, reqs: list[Request]) -> None:
        now = time.monotonic()
        for req in reqs:
            rec = req.meta
            if isinstance(rec, RecordedRequest):
                rec.received = req.received
                rec.closed = now

    # -- request handling ---------------------------------------------------------------------
    async def _handle(self, req: Request, resp: Response) -> None:
        rec = req.meta
        if isinstance(rec, RecordedRequest):
            rec.body, rec.received, rec.complete = req.body, req.received, True
        mode = self._mode
        name = mode.name
        if name in ("healthy", "stream_reset", "stream_eof", "body_cut", "chunked_json"):
            await self._serve(req, resp)
        elif name == "slow_headers":
            await asyncio.sleep(mode.params["delay"])
            await self._serve(req, resp)
        elif name == "hang":
            await faults.hang(resp, self._hung)
        elif name == "status":
            faults.send_status(resp, mode.params, self.number, self._node_header)
        elif name == "ngrok_offline":
            faults.ngrok_offline(resp, self.number, self._node_header)
        elif name == "cf_tunnel_down":
            faults.cf_tunnel_down(resp, self.number, self._node_header)
        elif name == "sse":
            await faults.sse(
                resp, mode.params["events"], mode.params["interval"], self._node_header
            )
        else:  # "refuse": a request raced the listener closing; behave like a dead origin
            resp.connection.abort()


def _capabilities(names: Sequence[str]) -> tuple[str, ...]:
    unknown = set(names) - set(caps.KNOWN)
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {', '.join(caps.KNOWN)}")
    return tuple(c for c in caps.KNOWN if c in set(names))


def _names(names: Sequence[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(names))
    if not out or not all(isinstance(n, str) and n for n in out):
        raise ValueError(f"served names must be non-empty strings, got {names!r}")
    return out
