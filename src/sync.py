"""An isolate's health view <-> the one KV record every edge location shares.

KV is a hint, never a dependency: every read and write has a short time-out, and a failed or
slow read leaves the isolate routing on its own knowledge. Only the first request of a cold
isolate waits for KV (at most KV_TIMEOUT_S); a request arriving while that read is under way
does not wait for it — workerd cancels a request that awaits another request's I/O — and
routes on what the isolate knows so far. Writes are coalesced (at most one per
KV_MIN_WRITE_INTERVAL_S, only after a transition, skipped when KV already says the same).
The store is a `storage.HealthStore`: the shell's is Workers KV, the tests' a dict.
"""

from __future__ import annotations

import asyncio

import health
from config import HealthPolicy
from services import Services
from storage import HealthStore


class HealthSync:
    """One isolate's node health (`view`, under `policy`) and its exchange with KV. Each
    method takes the request's `Services` (store, clock, waitUntil, log)."""

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self.view = health.HealthView()
        self.flushing = False
        self._reading: asyncio.Future[None] | None = None

    async def refresh(self, io: Services) -> None:
        """Before routing: a cold isolate waits (briefly) for KV; a warm one refreshes in
        the background when its view is older than HEALTH_REFRESH_S."""
        if not self.view.needs_refresh(io.clock(), self.policy):
            return
        if self._reading is not None:
            # Another request's read is under way. Not awaited: workerd cancels a request
            # that waits on I/O started by another request ("The script will never generate
            # a response"), so a follower routes on what this isolate knows so far.
            return
        self._reading = asyncio.ensure_future(self.read(io))
        if self.view.loaded_at is None:
            await asyncio.shield(self._reading)  # bounded by KV_TIMEOUT_S
        else:
            io.background(self._reading)

    async def read(self, io: Services) -> None:
        try:
            records, written_at = await self._snapshot(io.store, io.clock())
            self.view.merge(records, written_at, io.clock())
        except Exception as exc:  # time-out or KV error: route on what this isolate knows
            io.log({"msg": "kv_read_failed", "error": _why(exc)})
            # Not re-read on every request while KV is sick: the refresh interval applies.
            self.view.loaded_at = io.clock()
        finally:
            self._reading = None

    def flush_due(self, now: float) -> bool:
        """A transition is owed to KV, the write interval has passed, and no flush runs."""
        return self.view.may_write(now, self.policy) and not self.flushing

    def maybe_flush(self, io: Services) -> None:
        """After a request: start a flush in the background (ctx.waitUntil) when one is due."""
        if self.flush_due(io.clock()):
            self.flushing = True
            io.background(self.flush(io))

    async def flush(self, io: Services) -> bool:
        """Read-merge-write the record, skipping the write if KV already knows. True when
        nothing is left to write."""
        self.flushing = True
        view, policy = self.view, self.policy
        try:
            if io.store is None:
                view.dirty = False
                return True
            now = io.clock()
            records, written_at = await self._snapshot(io.store, now)
            view.dirty = any(
                not health.covers(records.get(n), mine, policy) for n, mine in view.nodes.items()
            )
            view.merge(records, written_at, now)
            if not view.may_write(now, policy):
                return not view.dirty
            body, ttl = health.encode(view, now)
            noted = view.changes
            await asyncio.wait_for(io.store.write(body, ttl), policy.kv_timeout_s)
            view.written_at = now
            # A transition made while the write was in flight is not in `body`: still owed.
            view.dirty = view.changes != noted
            return not view.dirty
        except Exception as exc:  # e.g. KV's 1 write/s per key limit: stay dirty, retry later
            io.log({"msg": "kv_write_failed", "error": _why(exc)})
            return False
        finally:
            self.flushing = False

    async def _snapshot(self, store: HealthStore | None, now: float):
        if store is None:
            return {}, 0.0
        raw = await asyncio.wait_for(store.read(), self.policy.kv_timeout_s)
        return health.decode(raw, now)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return str(exc)[:200] or type(exc).__name__
