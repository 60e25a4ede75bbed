"""The node's batch worker: pulls batch work from the gateway with leases and runs it on the
node's own vLLM (docs/batch.md, "Node API").

    python -m heady_node.batch_worker --gateway https://<worker> --engine http://127.0.0.1:8000 \\
        --node 7          # secrets from the environment: HEADY_NODE_CREDENTIAL, NODE_TOKEN

One loop: ask for a lease (with the model names the local engine serves and whether its queue is
empty), do the work, commit. `validate` work streams the input file through
heady_shared.batchlines and commits its errors or shard plan; `lines` work runs the shard's lines
against the local engine, heartbeating meanwhile, PUTs the output and error parts, then commits.

Nothing durable lives here: if this process dies (kill -9 included) its lease simply expires on
the gateway and another node takes the shard; if the gateway refuses a commit (409, the lease was
taken over) the shard's results are dropped, never served twice. Results are PUT under
lease-specific keys before the commit, so a refused commit leaves only garbage behind.

Handing the GPU over (SIGTERM, `drain(proc, timeout_s)`; docs/batch.md): no new lease and no
new line; each shard's unstarted lines go back to the gateway at once (POST .../release), the
running ones get `--drain-s` to finish and are committed, what did not finish goes back too,
and the process exits 0. A second signal stops at once.

Engine failures: an answer with 429/5xx or a refused/reset connection is retried with backoff; a
line becomes an error line only when the engine keeps *answering* with an error. When it keeps
not answering at all (the engine is restarting or gone), the shard is abandoned uncommitted, so
its lease expires and the lines run elsewhere instead of becoming errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from heady_node import batch_lines as bl
from heady_node import launcher
from heady_shared import metrics
from heady_shared.batchlines import Validator, asplit_lines, is_blank
from heady_shared.routes import DEFAULT_POOLS, role_of

log = logging.getLogger("heady_node.batch")

CREDENTIAL_ENV = "HEADY_NODE_CREDENTIAL"
GATEWAY_ENV = "HEADY_GATEWAY_URL"
ENGINE_TOKEN_ENV = "NODE_TOKEN"
API = "/api/nodes/v1/leases"
TOKEN_HEADER = "x-heady-lease-token"
_LEASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class LeaseLost(Exception):
    """The gateway answered 409: the lease is not ours any more."""


class EngineDown(Exception):
    """The local engine stopped answering at all (connection refused/reset) despite retries."""


class GatewayError(Exception):
    """The gateway answered something the contract does not allow here."""


@dataclass
class WorkerConfig:
    gateway_url: str
    credential: str
    engine_url: str
    engine_token: str
    node: int = 0
    always: bool = True  # a batch-role node; False: ask for work only while the engine is idle
    concurrency: int = 32  # lines in flight to start with
    max_concurrency: int = 256
    adaptive: bool = True
    poll_s: float = 2.0  # first wait after "no work"; doubles up to poll_max_s
    poll_max_s: float = 30.0
    retries: int = 4  # per line, for 429/5xx and connection errors
    retry_base_s: float = 0.5
    retry_max_s: float = 8.0
    request_timeout_s: float = 600.0  # one line's answer (the gateway's ROLE_TIMEOUTS_S)
    tune_interval_s: float = 1.0
    gateway_attempts: int = 3  # PUT/commit tries on a network error before giving the shard up
    # Shards held at once, at least: the next one starts while the last one drains. More are
    # held when the line limit exceeds what these shards' lines can fill (BatchWorker.run).
    max_shards: int = 2
    # A drain (SIGTERM, `drain`): lines already running get this long to finish, then the rest
    # are cancelled and given back with the lines never started.
    drain_s: float = 30.0


def check_gateway_url(url: str) -> str:
    """HTTPS, or plain HTTP only to this machine (make dev): the credential travels with it."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"gateway URL must be http(s)://host, got {url!r}")
    if parts.scheme == "http" and parts.hostname not in _LOCAL_HOSTS:
        raise ValueError("gateway URL must use https (plain http only to 127.0.0.1/localhost)")
    return url.strip().rstrip("/")


@dataclass
class _Lease:
    id: str
    token: str
    kind: str
    batch_id: str
    endpoint: str
    seq: int
    n_lines: int
    heartbeat_s: float
    input: str
    shard_lines: int | None = None  # a validate lease: the gateway's SHARD_LINES
    max_lines: int | None = None

    @classmethod
    def parse(cls, data: object) -> _Lease:
        if not isinstance(data, Mapping):
            raise GatewayError("lease is not an object")
        lid, token = data.get("id"), data.get("token")
        if not isinstance(lid, str) or not _LEASE_ID.match(lid):
            raise GatewayError("lease id missing or malformed")
        if not isinstance(token, str) or not token:
            raise GatewayError("lease token missing")
        inp = data.get("input")
        if not (isinstance(inp, str) and inp.startswith(API + "/")):
            inp = f"{API}/{lid}/input"  # never send the credential anywhere but the gateway
        beat = data.get("heartbeat_s")
        beat = float(beat) if isinstance(beat, int | float) and beat > 0 else 30.0
        n = data.get("n_lines")
        seq = data.get("seq")
        limits = {
            k: v
            for k in ("shard_lines", "max_lines")
            if isinstance(v := data.get(k), int) and v > 0
        }
        return cls(
            id=lid,
            token=token,
            kind=str(data.get("kind")),
            batch_id=str(data.get("batch_id")),
            endpoint=str(data.get("endpoint") or ""),
            seq=seq if isinstance(seq, int) else -1,
            n_lines=n if isinstance(n, int) else -1,
            heartbeat_s=max(0.05, beat),
            input=inp,
            **limits,
        )


class _Heartbeat:
    """Beats every `heartbeat_s` until stopped; a 409 means lost, `cancel: true` cancelled.
    Either sets `stop_starting`: no new line starts after it."""

    def __init__(self, worker: BatchWorker, lease: _Lease) -> None:
        self.lost = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.stop_starting = asyncio.Event()
        self.beats = 0
        self._worker, self._lease = worker, lease
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        lease = self._lease
        while True:
            await asyncio.sleep(lease.heartbeat_s)
            try:
                resp = await self._worker.gw.post(
                    f"{API}/{lease.id}/heartbeat", json={"token": lease.token}
                )
            except httpx.HTTPError:
                continue  # one missed beat is fine: the lease outlives several of them
            self.beats += 1
            if resp.status_code == 409:
                self.lost.set()
                self.stop_starting.set()
                return
            if resp.status_code == 200:
                with contextlib.suppress(ValueError):
                    data = resp.json()
                    if isinstance(data, dict) and data.get("cancel") is True:
                        self.cancelled.set()
                        self.stop_starting.set()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class _Outcome:
    line: bytes
    ok: bool
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(eq=False)  # identity: kept in a set while it runs
class _Shard:
    """The running shard's results, in input order (None: not finished)."""

    results: list[_Outcome | None]
    in_flight: int = 0
    draining: bool = False  # every line has started (or none will): room for the next shard
    kept: int = 0  # lines the lease still holds (fewer once a drain gave the rest back)
    # Set when a line of ANY shard finishes: room under the shared limit may have opened for
    # this shard's waiting lines (without it they waited for one of their own to finish).
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    def finished(self) -> list[_Outcome]:
        return [r for r in self.results if r is not None]


@dataclass
class BatchWorker:
    cfg: WorkerConfig
    rand: Callable[[], float] = random.random
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    gw: httpx.AsyncClient = field(init=False)
    engine: httpx.AsyncClient = field(init=False)
    limit: int = field(init=False)
    leases: int = field(init=False, default=0)
    _shards: set[_Shard] = field(init=False, default_factory=set)  # lines shards running now
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _shard_lines: int = field(init=False, default=1)  # lines of the last shard leased
    _tuner: asyncio.Task[None] | None = field(init=False, default=None)
    _drain: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _drain_at: float = field(init=False, default=0.0)  # monotonic deadline of the running lines

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.limit = max(1, min(cfg.concurrency, cfg.max_concurrency))
        self.gw = httpx.AsyncClient(
            base_url=check_gateway_url(cfg.gateway_url),
            headers={"authorization": f"Bearer {cfg.credential}"},
            timeout=httpx.Timeout(60.0, connect=10.0),
        )
        conns = cfg.max_concurrency + 8  # the shard's lines plus the tuner's /metrics reads
        self.engine = httpx.AsyncClient(
            base_url=cfg.engine_url.rstrip("/"),
            headers={"authorization": f"Bearer {cfg.engine_token}"},
            timeout=httpx.Timeout(cfg.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
        )

    async def aclose(self) -> None:
        await self.gw.aclose()
        await self.engine.aclose()

    # -- the loop -----------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Hand the GPU over: lease nothing more, start no new line, give each shard's unstarted
        lines back to the gateway now (POST .../release: the partner node leases them at once),
        let running lines finish for `drain_s`, give back what did not, commit the rest; `run`
        then returns."""
        if not self._drain.is_set():
            self._drain_at = time.monotonic() + self.cfg.drain_s
            self._drain.set()
            self._wake.set()
            running = sum(s.in_flight for s in self._shards)
            log.info("draining: %d lines running get %gs to finish", running, self.cfg.drain_s)

    @property
    def draining(self) -> bool:
        return self._drain.is_set()

    async def run(
        self,
        stop: asyncio.Event | None = None,
        max_leases: int | None = None,
        drain: asyncio.Event | None = None,
    ) -> None:
        """Lease, work, commit, until `stop` is set (shards in progress are abandoned: their
        leases expire), `max_leases` leases were handled, or `drain` is set (begin_drain) and
        the work in hand is committed or given back.

        The engine's batch stays full across shard boundaries: once every line of the running
        shard has started, its tail runs while the next shard is leased and started (at most
        `max_shards` at once, all sharing `self.limit` lines in flight)."""
        stop = stop or asyncio.Event()
        active: set[asyncio.Task[str]] = set()
        idle_rounds = 0
        watch = asyncio.create_task(_then(drain.wait(), self.begin_drain)) if drain else None
        try:
            while not stop.is_set():
                active = {t for t in active if not t.done()}
                more = (max_leases is None or self.leases < max_leases) and not self.draining
                if not (more or active):
                    return
                self._wake.clear()
                delay = None
                # Enough shards to fill the line limit: with 25-line shards and 64 lines in
                # flight, two shards would leave the engine's batch a third empty.
                fill = -(-self.limit // max(1, self._shard_lines)) + 1
                room = len(active) < max(self.cfg.max_shards, fill)
                if more and room and all(shard.draining for shard in self._shards):
                    lease = await self._ask_logged()
                    if lease is not None:
                        self.leases += 1
                        idle_rounds = 0
                        active.add(asyncio.create_task(self.handle(lease)))
                        await asyncio.sleep(0)  # let it register its shard before we look
                        continue
                    delay = bl.backoff_s(
                        idle_rounds, self.cfg.poll_s, self.cfg.poll_max_s, self.rand()
                    )
                    idle_rounds += 1
                await _first(stop, self._wake, active, delay)
        finally:
            if watch is not None:
                watch.cancel()
            for task in active:
                task.cancel()
            await asyncio.gather(*active, return_exceptions=True)

    async def _ask_logged(self) -> _Lease | None:
        try:
            return await self.ask()
        except (httpx.HTTPError, GatewayError) as exc:
            log.warning("lease request failed: %s", _why(exc))
            return None

    async def step(self) -> bool:
        """One round: ask for a lease and handle it. False when there was nothing to do."""
        lease = await self._ask_logged()
        if lease is None:
            return False
        self.leases += 1
        await self.handle(lease)
        return True

    async def engine_state(self) -> tuple[list[str], bool]:
        """(model names the local engine serves, whether its queue is empty). An engine that
        does not answer serves nothing and is not idle."""
        try:
            resp = await self.engine.get("/v1/models", timeout=10.0)
            data = resp.json() if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return [], False
        cards = data.get("data") if isinstance(data, dict) else None
        models = [
            c["id"] for c in cards or () if isinstance(c, dict) and isinstance(c.get("id"), str)
        ]
        load = await self._load()
        idle = load is not None and load[0] == 0 and load[1] == 0
        return models, idle

    async def _load(self) -> tuple[int, int] | None:
        """(waiting, running) from the engine's /metrics, or None when unknown."""
        try:
            resp = await self.engine.get("/metrics", timeout=5.0)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        parsed = metrics.parse_metrics(resp.text)
        waiting = metrics.gauge(parsed, metrics.WAITING)
        running = metrics.gauge(parsed, metrics.RUNNING)
        if waiting is None:
            return None
        return waiting, running or 0

    async def ask(self) -> _Lease | None:
        models, idle = await self.engine_state()
        if not self.cfg.always and not idle:
            return None  # a node of another role helps only while nobody else needs it
        resp = await self.gw.post(API, json={"models": models, "idle": idle})
        if resp.status_code == 204:
            return None
        if resp.status_code != 200:
            raise GatewayError(f"lease request answered HTTP {resp.status_code}{_code(resp)}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise GatewayError("lease answer is not JSON") from exc
        return _Lease.parse(data.get("lease") if isinstance(data, dict) else None)

    async def handle(self, lease: _Lease) -> str:
        """Do one lease's work; returns (and logs) its outcome in one line."""
        start = time.monotonic()
        beat = _Heartbeat(self, lease)
        try:
            if lease.kind == "validate":
                outcome = await self._validate_or_give_back(lease)
            elif lease.kind == "lines":
                outcome = await self._lines(lease, beat)
            else:
                outcome = f"unknown kind {lease.kind!r}: left to expire"
        except LeaseLost:
            outcome = "lease lost: results dropped"
        except EngineDown:
            outcome = "engine not answering: shard abandoned, its lease will expire"
        except (httpx.HTTPError, GatewayError) as exc:
            outcome = f"gateway failed ({_why(exc)}): shard abandoned, its lease will expire"
        except Exception as exc:  # a bug must cost one lease (it expires), never the worker
            log.exception("lease %s failed", lease.id)
            outcome = f"worker error {type(exc).__name__}: shard abandoned, its lease will expire"
        finally:
            await beat.stop()
        log.info(
            "lease %s %s %s seq %s: %s (%.1fs, %d heartbeats)",
            lease.id, lease.kind, lease.batch_id, lease.seq, outcome,
            time.monotonic() - start, beat.beats,
        )  # fmt: skip
        return outcome

    async def _by_deadline(self, tasks: set[asyncio.Task[Any]]) -> bool:
        """Wait for `tasks`; once a drain begins, only until its deadline. True: all done."""
        waiter = asyncio.create_task(self._drain.wait())
        try:
            while pending := {t for t in tasks if not t.done()}:
                timeout = None
                if self.draining:
                    timeout = self._drain_at - time.monotonic()
                    if timeout <= 0:
                        return False
                extra = () if self.draining else (waiter,)
                await asyncio.wait(
                    (*pending, *extra), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            return True
        finally:
            waiter.cancel()

    async def _release(self, lease: _Lease, lines: int, size: int) -> None:
        """Give back all of the lease (lines 0) or all but its first `lines` lines (`size`
        bytes of its input range): leasable by another node at once (work.release)."""
        await self._gateway(
            "POST",
            f"{API}/{lease.id}/release",
            json={"token": lease.token, "lines": lines, "bytes": size},
        )

    # -- validate -----------------------------------------------------------------------------
    async def _validate_or_give_back(self, lease: _Lease) -> str:
        task = asyncio.create_task(self._validate(lease))
        try:
            if await self._by_deadline({task}):
                return task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._release(lease, 0, 0)
        return "drained: validation given back"

    async def _validate(self, lease: _Lease) -> str:
        limits = {"shard_lines": lease.shard_lines, "max_lines": lease.max_lines}
        checker = Validator(lease.endpoint, **{k: v for k, v in limits.items() if v})
        async with self.gw.stream("GET", lease.input, headers={TOKEN_HEADER: lease.token}) as resp:
            _expect(resp, 200)
            async for raw in asplit_lines(resp.aiter_bytes()):
                checker.feed(raw)
                if checker.exhausted:
                    break
        verdict = checker.finish()
        await self._commit(lease, verdict.commit_body())
        if verdict.ok:
            return f"valid: {verdict.total} lines, {len(verdict.shards)} shards, {verdict.model}"
        return f"invalid: {len(verdict.errors)} errors (first: line {verdict.errors[0].line})"

    # -- lines --------------------------------------------------------------------------------
    async def _lines(self, lease: _Lease, beat: _Heartbeat) -> str:
        shard = _Shard([])
        self._shards.add(shard)
        try:
            return await self._run_shard(lease, beat, shard)
        finally:
            self._shards.discard(shard)
            shard.draining = True
            self._wake.set()
            if not self._shards and self._tuner is not None:
                self._tuner.cancel()
                self._tuner = None

    async def _run_shard(self, lease: _Lease, beat: _Heartbeat, shard: _Shard) -> str:
        # A shard is SHARD_LINES lines: read it whole (streamed, then the connection is free)
        # rather than hold the gateway's response open for the minutes the lines take.
        raws: list[bytes] = []
        ends: list[int] = []  # where each line ends in the shard's bytes: a drain's cut points
        at = 0
        async with self.gw.stream("GET", lease.input, headers={TOKEN_HEADER: lease.token}) as resp:
            _expect(resp, 200)
            async for raw in asplit_lines(resp.aiter_bytes()):
                at += len(raw)
                if not is_blank(raw):
                    raws.append(raw)
                    ends.append(at)
        requests = [bl.parse_request(raw, lease.endpoint) for raw in raws]
        shard.results = [None] * len(requests)
        shard.kept = len(requests)
        self._shard_lines = max(1, len(requests))

        async def keep(lines: int) -> None:  # a drain: the lines after `lines` go back now
            await self._release(lease, lines, ends[lines - 1] if lines else 0)
            shard.kept = lines

        await self._run_all(requests, shard, beat, keep)
        if beat.lost.is_set():
            raise LeaseLost
        if self.draining and not beat.cancelled.is_set():
            # Commit the finished prefix; lines cancelled at the deadline (and any finished
            # after them) go back with the rest: the gateway's work items are byte ranges.
            k = next((i for i, r in enumerate(shard.results) if r is None), len(requests))
            if k < shard.kept:
                await keep(k)
            if k == 0 and requests:
                return f"drained: gave back all {len(requests)} lines"
            done = [r for r in shard.results[:k] if r is not None]
            partial = False
        else:
            done = shard.finished()
            partial = len(done) < len(requests)
        out = b"".join(r.line for r in done if r.ok)
        err = b"".join(r.line for r in done if not r.ok)
        completed = sum(1 for r in done if r.ok)
        for part, body in (("output", out), ("error", err)):
            if body:
                await self._gateway(
                    "PUT",
                    f"{API}/{lease.id}/results/{part}",
                    content=body,
                    headers={TOKEN_HEADER: lease.token, "content-type": "application/jsonl"},
                )
        tokens_in = sum(r.input_tokens for r in done)
        tokens_out = sum(r.output_tokens for r in done)
        await self._commit(
            lease,
            {
                "completed": completed,
                "failed": len(done) - completed,
                "partial": partial,
                "usage": {
                    "input_tokens": tokens_in,
                    "output_tokens": tokens_out,
                    "total_tokens": tokens_in + tokens_out,
                },
            },
        )
        what = "cancelled, partial" if partial else "committed"
        if len(done) < len(requests) and not partial:
            what = f"drained, gave back {len(requests) - len(done)} lines, committed"
        return f"{what}: {len(done)}/{len(requests)} lines ({len(done) - completed} failed)"

    async def _run_all(
        self,
        requests: list[bl.Request],
        shard: _Shard,
        beat: _Heartbeat,
        keep: Callable[[int], Awaitable[None]],
    ) -> None:
        """Keep lines in flight (this shard's share of `self.limit`) until all ran or the
        heartbeat says stop; then lines still running are cancelled (they would not be
        committed). A drain starts no new line and gives the unstarted ones back at once
        (`keep`); the running ones get until the drain's deadline."""
        running: dict[asyncio.Task[_Outcome], int] = {}
        stopper = asyncio.create_task(beat.stop_starting.wait())
        drainer = asyncio.create_task(self._drain.wait())
        freed: asyncio.Task[bool] | None = None
        cut = False
        if self.cfg.adaptive and (self._tuner is None or self._tuner.done()):
            self._tuner = asyncio.create_task(self._tune())
        nxt = 0
        try:
            while True:
                draining = self.draining
                others = sum(s.in_flight for s in self._shards if s is not shard)
                while (
                    not beat.stop_starting.is_set()
                    and not draining
                    and nxt < len(requests)
                    and len(running) < max(1, self.limit - others)
                ):
                    running[asyncio.create_task(self._run_line(requests[nxt]))] = nxt
                    nxt += 1
                shard.in_flight = len(running)
                stopping = beat.stop_starting.is_set() or draining
                if not shard.draining and (nxt == len(requests) or stopping):
                    shard.draining = True
                    self._wake.set()  # the loop may lease the next shard now
                if draining and not cut and not beat.stop_starting.is_set():
                    cut = True
                    if nxt < len(requests):
                        await keep(nxt)  # the partner may lease these while ours finish
                if not running or beat.stop_starting.is_set():
                    break
                timeout = None
                if draining:
                    timeout = self._drain_at - time.monotonic()
                    if timeout <= 0:
                        break  # the running rest is cancelled and given back
                if freed is None or freed.done():
                    shard.freed.clear()
                    freed = asyncio.create_task(shard.freed.wait())
                extra = () if draining else (drainer,)
                done, _ = await asyncio.wait(
                    (*running, stopper, freed, *extra),
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                finished = False
                for task in done:
                    if task not in (stopper, freed, drainer):
                        shard.results[running.pop(task)] = task.result()  # EngineDown rises
                        finished = True
                if finished:
                    for other in self._shards:
                        if other is not shard:
                            other.freed.set()
        finally:
            shard.in_flight = 0
            extra = (stopper, drainer) if freed is None else (stopper, drainer, freed)
            for task in (*running, *extra):
                task.cancel()
            await asyncio.gather(*running, *extra, return_exceptions=True)

    async def _tune(self) -> None:
        """Adjust `self.limit` from the engine's queue (batch_lines.next_concurrency)."""
        lim = bl.Limits(low=1, high=self.cfg.max_concurrency, step=max(1, self.limit // 4))
        before = 0
        while True:
            await asyncio.sleep(self.cfg.tune_interval_s)
            load = await self._load()
            if load is None:
                continue
            in_flight = sum(s.in_flight for s in self._shards)
            self.limit = bl.next_concurrency(self.limit, in_flight, load[0], before, lim)
            before = load[0]

    async def _run_line(self, req: bl.Request) -> _Outcome:
        if req.problem is not None or req.url is None:
            return _Outcome(
                bl.failure_line(req.custom_id, "invalid_request", req.problem or ""), False
            )
        cfg = self.cfg
        attempt = 0
        while True:
            try:
                resp = await self.engine.post(req.url, json=req.body)
            except httpx.TimeoutException:
                msg = f"the engine did not answer within {cfg.request_timeout_s:.0f}s"
                return _Outcome(bl.failure_line(req.custom_id, "timeout", msg), False)
            except httpx.TransportError as exc:
                if attempt >= cfg.retries:
                    raise EngineDown(type(exc).__name__) from exc
            else:
                if not (bl.retryable_status(resp.status_code) and attempt < cfg.retries):
                    return _answer(req, resp)
            await self.sleep(bl.backoff_s(attempt, cfg.retry_base_s, cfg.retry_max_s, self.rand()))
            attempt += 1

    # -- gateway calls ------------------------------------------------------------------------
    async def _commit(self, lease: _Lease, body: dict[str, Any]) -> None:
        await self._gateway("POST", f"{API}/{lease.id}/commit", json={"token": lease.token, **body})

    async def _gateway(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A PUT/commit: 409 is LeaseLost, other non-200 a GatewayError; a network error or a
        5xx is tried again a few times (a shard's work is worth a few seconds)."""
        attempt = 0
        while True:
            try:
                resp = await self.gw.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt + 1 >= self.cfg.gateway_attempts:
                    raise
            else:
                if resp.status_code < 500 or attempt + 1 >= self.cfg.gateway_attempts:
                    _expect(resp, 200)
                    return resp
            await self.sleep(bl.backoff_s(attempt, 1.0, 10.0, self.rand()))
            attempt += 1


async def _then(event: Awaitable[Any], action: Callable[[], None]) -> None:
    await event
    action()


async def _first(
    stop: asyncio.Event, wake: asyncio.Event, tasks: set[asyncio.Task[str]], timeout: float | None
) -> None:
    """Wait until stop or wake is set, a task ends, or `timeout` s pass."""
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())]
    try:
        await asyncio.wait((*waiters, *tasks), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _answer(req: bl.Request, resp: httpx.Response) -> _Outcome:
    body = bl.response_body(resp.content)
    rid = resp.headers.get("x-request-id")
    if not rid and isinstance(body, dict) and isinstance(body.get("id"), str):
        rid = body["id"]
    line = bl.answer_line(req.custom_id, resp.status_code, rid or bl.new_line_id(), body)
    if not bl.is_success(resp.status_code):
        return _Outcome(line, False)
    tokens_in, tokens_out = bl.usage_of(body)
    return _Outcome(line, True, tokens_in, tokens_out)


def _expect(resp: httpx.Response, status: int) -> None:
    if resp.status_code == 409:
        raise LeaseLost
    if resp.status_code != status:
        raise GatewayError(f"HTTP {resp.status_code}{_code(resp)} from {resp.request.url.path}")


def _code(resp: httpx.Response) -> str:
    """The OpenAI-shaped error code of a gateway answer, if it has one (already read bodies)."""
    try:
        data = resp.json()
    except (ValueError, httpx.ResponseNotRead):  # a streamed answer's body is not read
        return ""
    err = data.get("error") if isinstance(data, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return f" ({code})" if isinstance(code, str) else ""


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# -- running it -------------------------------------------------------------------------------
async def serve(
    cfg: WorkerConfig, stop: asyncio.Event | None = None, drain: asyncio.Event | None = None
) -> None:
    worker = BatchWorker(cfg)
    try:
        await worker.run(stop, drain=drain)
    finally:
        await worker.aclose()


DRAIN_S = WorkerConfig.drain_s
# What a drain may take beyond the running lines' `drain_s`: the release, the parts' PUTs and
# the commit of each shard (a few gateway round trips, retried on a network error).
DRAIN_SLACK_S = 15.0


def drain(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Hand the GPU over: SIGTERM the worker's process group (start_process made it a group
    leader) and wait until it exits; SIGKILL the group after `timeout_s`. True when it exited
    by itself with status 0 (every shard committed or given back). Give it `drain_s` plus
    DRAIN_SLACK_S; a kill after that loses nothing either: leases it still held lapse."""
    # launcher.stop is exactly that: SIGTERM the group, wait, SIGKILL what is left.
    return launcher.stop(proc, grace=max(0.0, timeout_s)) == 0


def worker_argv(
    gateway_url: str,
    engine_url: str,
    node: int,
    *,
    always: bool | None = None,
    concurrency: int | None = None,
    drain_s: float | None = None,
) -> list[str]:
    """The command that runs a worker (secrets go through the environment, never argv).
    `concurrency`: lines in flight to start with — the engine's --max-num-seqs keeps its batch
    full from the first shard instead of ramping up from the default over several rounds."""
    argv = [sys.executable, "-m", "heady_node.batch_worker", "--gateway", gateway_url,
            "--engine", engine_url, "--node", str(node)]  # fmt: skip
    if always is not None:
        argv.append("--always" if always else "--when-idle")
    if concurrency is not None:
        argv += ["--concurrency", str(max(1, concurrency))]
    if drain_s is not None:
        argv += ["--drain-s", f"{max(0.0, drain_s):g}"]
    return argv


def start_process(
    gateway_url: str,
    credential: str,
    engine_url: str,
    node: int,
    *,
    engine_token: str,
    log_path: Path,
    always: bool | None = None,
    concurrency: int | None = None,
    drain_s: float | None = None,
) -> subprocess.Popen:
    """Start a worker as its own process group: `drain(proc, timeout_s)` hands the GPU over
    cleanly, heady_node.launcher.stop just ends it. For `make dev`: one per simulated node
    7-8 with that node's credential and URL."""
    check_gateway_url(gateway_url)
    env = {CREDENTIAL_ENV: credential, ENGINE_TOKEN_ENV: engine_token, "PYTHONUNBUFFERED": "1"}
    argv = worker_argv(
        gateway_url, engine_url, node, always=always, concurrency=concurrency, drain_s=drain_s
    )
    return launcher.spawn(argv, log_path=log_path, env=env)


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="heady-node batch-worker",
        description="Pull batch work from the gateway and run it on this node's vLLM. Secrets "
        f"from the environment: {CREDENTIAL_ENV} (this node's gateway credential) and "
        f"{ENGINE_TOKEN_ENV} (the engine's token).",
    )
    p.add_argument("--gateway", default=env(GATEWAY_ENV), help=f"default ${GATEWAY_ENV}")
    p.add_argument("--engine", default=f"http://127.0.0.1:{env('HEADY_PORT', '8000')}")
    p.add_argument("--node", type=int, default=int(env("HEADY_NODE", "0") or 0))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--always",
        dest="always",
        action="store_true",
        default=None,
        help="take work whenever there is some (default for batch-role nodes)",
    )
    mode.add_argument(
        "--when-idle",
        dest="always",
        action="store_false",
        help="take work only while the engine's queue is empty (other roles)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="lines in flight to start with")
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--fixed", action="store_true", help="keep --concurrency, do not adapt it")
    p.add_argument(
        "--drain-s",
        type=float,
        default=DRAIN_S,
        help="on SIGTERM/SIGINT: seconds running lines get to finish before the rest is given "
        "back to the gateway (a second signal stops at once)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s batch-worker: %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per engine request
    credential = os.environ.get(CREDENTIAL_ENV, "").strip()
    token = (os.environ.get(ENGINE_TOKEN_ENV) or os.environ.get("HEADY_NODE_TOKEN") or "").strip()
    problems = [
        *([] if args.gateway else [f"--gateway (or ${GATEWAY_ENV}) is required"]),
        *([] if credential else [f"${CREDENTIAL_ENV} is not set"]),
        *([] if token else [f"${ENGINE_TOKEN_ENV} is not set"]),
    ]
    try:
        if args.gateway:
            check_gateway_url(args.gateway)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        print("heady-node batch-worker: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    always = args.always
    if always is None:
        always = args.node > 0 and role_of(args.node, DEFAULT_POOLS) == "batch"
    cfg = WorkerConfig(
        gateway_url=args.gateway,
        credential=credential,
        engine_url=args.engine,
        engine_token=token,
        node=args.node,
        always=always,
        concurrency=args.concurrency,
        max_concurrency=max(args.concurrency, args.max_concurrency),
        adaptive=not args.fixed,
        drain_s=max(0.0, args.drain_s),
    )
    forced = False

    async def run() -> None:
        # The first SIGTERM/SIGINT drains (docs/batch.md, "Handing the GPU over"), a second
        # one stops at once: what is still running is abandoned and its leases lapse.
        stop, drain_now = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            nonlocal forced
            if drain_now.is_set():
                forced = True
                stop.set()
            drain_now.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        log.info(
            "node %s: pulling batch work from %s for %s (%s)", args.node or "?", cfg.gateway_url,
            cfg.engine_url, "always" if always else "only while idle",
        )  # fmt: skip
        await serve(cfg, stop, drain_now)
        log.info("stopped at once: unfinished leases will lapse" if forced else "drained")

    asyncio.run(run())
    return 1 if forced else 0


if __name__ == "__main__":
    raise SystemExit(main())
