"""An isolate's health view <-> the one KV record every edge location shares.

KV is a hint, never a dependency: every read and write has a short time-out, a failed or
slow read leaves the isolate routing on its own knowledge, and concurrent cold requests
make one read (the first waits for it, the others route on what the isolate knows). Writes
are coalesced (at most one per KV_MIN_WRITE_INTERVAL_S, only after a transition, skipped
when KV already says the same). The I/O is a `HealthStore`; the shell's
is Workers KV, the tests' is a dict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import health as hl
from config import HealthPolicy

Log = Callable[[dict], None]
Background = Callable[[Awaitable[None]], None]  # ctx.waitUntil for work after the response


class HealthStore(Protocol):
    async def read(self) -> str | None: ...

    async def write(self, body: str, ttl_s: int) -> None: ...


class HealthSync:
    def __init__(self) -> None:
        self.view = hl.HealthView()
        self.flushing = False
        self._reading: asyncio.Future[None] | None = None

    async def refresh(
        self,
        store: HealthStore | None,
        policy: HealthPolicy,
        clock: Callable[[], float],
        background: Background,
        log: Log,
    ) -> None:
        """Before routing: a cold isolate waits (briefly) for KV; a warm one refreshes in
        the background when its view is older than HEALTH_REFRESH_S."""
        if not self.view.needs_refresh(clock(), policy):
            return
        if self._reading is not None:
            # Another request's read is under way. Not awaited: workerd cancels a request
            # that waits on I/O started by another request ("The script will never generate
            # a response"), so a follower routes on what this isolate knows so far.
            return
        self._reading = asyncio.ensure_future(self.read(store, policy, clock, log))
        if self.view.loaded_at is None:
            await asyncio.shield(self._reading)  # bounded by KV_TIMEOUT_S
        else:
            background(self._reading)

    async def read(
        self, store: HealthStore | None, policy: HealthPolicy, clock: Callable[[], float], log: Log
    ) -> None:
        try:
            records, written_at = await self._snapshot(store, policy, clock())
            self.view.merge(records, written_at, clock())
        except Exception as exc:  # time-out or KV error: route on what this isolate knows
            log({"msg": "kv_read_failed", "error": _why(exc)})
            # Not re-read on every request while KV is sick: the refresh interval applies.
            self.view.loaded_at = clock()
        finally:
            self._reading = None

    def maybe_flush(
        self,
        store: HealthStore | None,
        policy: HealthPolicy,
        clock: Callable[[], float],
        background: Background,
        log: Log,
    ) -> None:
        if self.view.may_write(clock(), policy) and not self.flushing:
            self.flushing = True
            background(self.flush(store, policy, clock, log))

    async def flush(
        self, store: HealthStore | None, policy: HealthPolicy, clock: Callable[[], float], log: Log
    ) -> bool:
        """Read-merge-write the record, skipping the write if KV already knows. True when
        nothing is left to write."""
        self.flushing = True
        view = self.view
        try:
            if store is None:
                view.dirty = False
                return True
            now = clock()
            records, written_at = await self._snapshot(store, policy, now)
            view.dirty = any(
                not hl.covers(records.get(n), mine, policy) for n, mine in view.nodes.items()
            )
            view.merge(records, written_at, now)
            if not view.may_write(now, policy):
                return not view.dirty
            body, ttl = hl.encode(view, now)
            noted = view.changes
            await asyncio.wait_for(store.write(body, ttl), policy.kv_timeout_s)
            view.written_at = now
            # A transition made while the write was in flight is not in `body`: still owed.
            view.dirty = view.changes != noted
            return not view.dirty
        except Exception as exc:  # e.g. KV's 1 write/s per key limit: stay dirty, retry later
            log({"msg": "kv_write_failed", "error": _why(exc)})
            return False
        finally:
            self.flushing = False

    @staticmethod
    async def _snapshot(store: HealthStore | None, policy: HealthPolicy, now: float):
        if store is None:
            return {}, 0.0
        raw = await asyncio.wait_for(store.read(), policy.kv_timeout_s)
        return hl.decode(raw, now)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return str(exc)[:200] or type(exc).__name__
