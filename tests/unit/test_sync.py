"""sync.py: an isolate's health view <-> the shared KV record, over a fake HealthStore.

KV is a hint: a cold isolate waits briefly for one shared read, a warm one refreshes in the
background, a hung or failing KV call is given up after KV_TIMEOUT_S and routing goes on;
writes are coalesced, skipped when KV already knows, and never run two at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest

import health as hl
from config import HealthPolicy
from health import HealthState, HealthView
from services import Services
from sync import HealthSync

T0 = 1_700_000_000.0
# Generous where KV answers (a loaded machine must not turn a 20 ms fake delay into a
# time-out), short where a KV call hangs on purpose.
POLICY = HealthPolicy(kv_timeout_s=2.0)  # refresh 30 s, write interval 120 s
KV_TIMEOUT_S = 0.2
HUNG = HealthPolicy(kv_timeout_s=KV_TIMEOUT_S)


def run(main) -> None:
    """Run one test's coroutine; a KV call that is never given up fails it fast."""
    asyncio.run(asyncio.wait_for(main(), 5.0))


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeStore:
    """storage.HealthStore in memory. `read_s`/`write_s` delay the call (None: hang forever);
    `ticks` makes every call last that many event-loop turns; `read_error`/`write_error` make
    it raise. Records how many calls were in flight at once."""

    def __init__(self, value: str | None = None) -> None:
        self.value = value
        self.read_s: float | None = 0.0
        self.write_s: float | None = 0.0
        self.read_error: Exception | None = None
        self.write_error: Exception | None = None
        self.ticks = 0
        self.write_gate: asyncio.Event | None = None  # a write waits for it, when set
        self.write_started = asyncio.Event()
        self.reads = 0
        self.writes: list[tuple[str, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def read(self) -> str | None:
        self.reads += 1
        async with self._call():
            await _delay(self.read_s)
            if self.read_error:
                raise self.read_error
            return self.value

    async def write(self, body: str, ttl_s: int) -> None:
        async with self._call():
            self.write_started.set()
            if self.write_gate is not None:
                await self.write_gate.wait()
            await _delay(self.write_s)
            if self.write_error:
                raise self.write_error
            self.writes.append((body, ttl_s))
            self.value = body

    @contextlib.asynccontextmanager
    async def _call(self):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(self.ticks):
                await asyncio.sleep(0)
            yield
        finally:
            self.in_flight -= 1


async def _delay(seconds: float | None) -> None:
    if seconds is None:
        await asyncio.Event().wait()  # a KV call that never answers
    await asyncio.sleep(seconds)


class Shell:
    """What the Worker passes in (as one Services per request): the store, the clock,
    ctx.waitUntil and the log."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.tasks: list[asyncio.Future] = []
        self.logs: list[dict] = []

    def background(self, awaitable) -> None:
        self.tasks.append(asyncio.ensure_future(awaitable))

    def log(self, line: dict) -> None:
        self.logs.append(line)

    async def drain(self) -> None:
        while self.tasks:
            await self.tasks.pop(0)

    def io(self, store) -> Services:
        return Services(store, self.clock, self.background, self.log)

    async def refresh(self, sync: HealthSync, store) -> None:
        await sync.refresh(self.io(store))

    def maybe_flush(self, sync: HealthSync, store) -> None:
        sync.maybe_flush(self.io(store))

    async def flush(self, sync: HealthSync, store) -> bool:
        return await sync.flush(self.io(store))


async def until_loaded(sync: HealthSync) -> None:
    while sync.view.loaded_at is None:
        await asyncio.sleep(0.001)


def record(states: dict[int, HealthState], written_at: float = T0 - 300) -> str:
    v = HealthView()
    v.nodes.update(states)
    return hl.encode(v, written_at)[0]


DOWN3 = HealthState("down", since=T0 - 10, until=T0 + 50, failures=1, reason="busy", at=T0 - 10)


def down(n_until: float, at: float = T0) -> HealthState:
    return HealthState("down", since=at, until=n_until, failures=1, reason="refused", at=at)


# ---- refresh before routing -------------------------------------------------------------------


def test_cold_refresh_waits_for_one_read():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore(record({3: DOWN3}))
        store.read_s = 0.01
        await shell.refresh(sync, store)
        assert store.reads == 1 and shell.tasks == []
        assert sync.view.is_down(3, T0) and sync.view.get(3).reason == "busy"
        assert sync.view.loaded_at == T0
        assert sync.view.written_at == T0 - 300
        assert shell.logs == []

    run(main)


def test_concurrent_cold_refreshes_make_one_read():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore(record({3: DOWN3}))
        store.read_s = 0.02
        seen: dict[int, bool] = {}

        async def request(i: int):
            await shell.refresh(sync, store)
            seen[i] = sync.view.is_down(3, T0)

        await asyncio.gather(*(request(i) for i in range(25)))
        assert len(seen) == 25
        assert seen[0] is True  # the request that started the read routes on KV's knowledge
        await until_loaded(sync)
        assert store.reads == 1
        assert sync.view.is_down(3, T0)

    run(main)


def test_a_cancelled_cold_request_does_not_cancel_the_read():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore(record({3: DOWN3}))
        store.read_s = 0.02
        first = asyncio.ensure_future(shell.refresh(sync, store))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(shell.refresh(sync, store))
        await asyncio.sleep(0)
        first.cancel()  # that client went away
        await second
        await until_loaded(sync)
        assert store.reads == 1 and sync.view.is_down(3, T0)

    run(main)


def test_a_warm_fresh_view_reads_nothing():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore()
        await shell.refresh(sync, store)
        shell.clock.t += POLICY.refresh_s - 0.001
        await shell.refresh(sync, store)
        assert store.reads == 1 and shell.tasks == []

    run(main)


def test_a_warm_stale_view_refreshes_once_in_the_background():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore()
        await shell.refresh(sync, store)
        store.value = record({3: DOWN3})
        store.read_s = 0.02
        shell.clock.t += POLICY.refresh_s
        for _ in range(5):  # concurrent requests on the stale view: none waits for KV
            await shell.refresh(sync, store)
        assert not sync.view.is_down(3, T0)  # not waited for
        assert len(shell.tasks) == 1
        await shell.drain()
        assert store.reads == 2
        assert sync.view.is_down(3, T0) and sync.view.loaded_at == T0 + POLICY.refresh_s
        shell.clock.t += 1
        await shell.refresh(sync, store)
        assert store.reads == 2  # fresh again

    run(main)


def test_a_refresh_keeps_a_newer_local_observation():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore()
        await shell.refresh(sync, store)
        mine = HealthState("up", since=T0 + 5, at=T0 + 5)
        sync.view.nodes[3] = mine
        store.value = record({3: DOWN3, 4: DOWN3})  # observed at T0 - 10: older than mine
        shell.clock.t += POLICY.refresh_s
        await shell.refresh(sync, store)
        await shell.drain()
        assert sync.view.get(3) == mine
        assert sync.view.is_down(4, T0)

    run(main)


def test_a_hung_read_is_given_up_and_routing_goes_on():
    async def main():
        shell, sync, store = Shell(), HealthSync(HUNG), FakeStore()
        store.read_s = None
        started = time.monotonic()
        await shell.refresh(sync, store)
        waited = time.monotonic() - started
        assert KV_TIMEOUT_S * 0.9 <= waited < KV_TIMEOUT_S + 2.0
        assert shell.logs == [{"msg": "kv_read_failed", "error": "timed out"}]
        assert sync.view.loaded_at == T0
        assert sync.view.nodes == {}
        # a sick KV is not re-read on every request: the refresh interval applies
        await shell.refresh(sync, store)
        assert store.reads == 1 and shell.tasks == []
        shell.clock.t += POLICY.refresh_s
        store.read_s = 0.0
        await shell.refresh(sync, store)
        await shell.drain()
        assert store.reads == 2 and sync.view.loaded_at == shell.clock.t

    run(main)


def test_concurrent_cold_refreshes_on_a_hung_kv_give_up_together():
    async def main():
        shell, sync, store = Shell(), HealthSync(HUNG), FakeStore()
        store.read_s = None
        started = time.monotonic()
        await asyncio.gather(*(shell.refresh(sync, store) for _ in range(10)))
        assert time.monotonic() - started < KV_TIMEOUT_S + 2.0
        assert store.reads == 1
        assert [line["msg"] for line in shell.logs] == ["kv_read_failed"]

    run(main)


def test_a_failing_read_is_logged_with_its_error():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore()
        store.read_error = RuntimeError("KV GET failed: 500 Internal Server Error")
        await shell.refresh(sync, store)
        assert shell.logs == [
            {"msg": "kv_read_failed", "error": "KV GET failed: 500 Internal Server Error"}
        ]
        assert sync.view.loaded_at == T0

    run(main)


def test_an_error_without_text_is_named_by_its_type_and_long_ones_are_cut():
    async def main():
        shell = Shell()
        store = FakeStore()
        store.read_error = ConnectionResetError()
        await shell.refresh(HealthSync(POLICY), store)
        store.read_error = RuntimeError("x" * 5000)
        await shell.refresh(HealthSync(POLICY), store)
        assert shell.logs[0]["error"] == "ConnectionResetError"
        assert shell.logs[1]["error"] == "x" * 200

    run(main)


def test_garbage_in_kv_is_no_knowledge_not_an_error():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore("{not json")
        await shell.refresh(sync, store)
        assert shell.logs == [] and sync.view.nodes == {} and sync.view.loaded_at == T0

    run(main)


def test_no_kv_binding_routes_on_local_knowledge():
    async def main():
        shell, sync = Shell(), HealthSync(POLICY)
        await shell.refresh(sync, None)
        assert sync.view.loaded_at == T0 and shell.logs == []

    run(main)


# ---- flush: read-merge-write ----------------------------------------------------------------


def dirty_sync(*states: tuple[int, HealthState], policy: HealthPolicy = POLICY) -> HealthSync:
    sync = HealthSync(policy)
    for n, h in states:
        sync.view.apply(n, h)
    assert sync.view.dirty
    return sync


def test_flush_writes_what_kv_does_not_know():
    async def main():
        shell, store = Shell(), FakeStore(record({4: DOWN3}))
        sync = dirty_sync((3, down(T0 + 30)))
        assert await shell.flush(sync, store) is True
        ((body, ttl),) = store.writes
        records, written_at = hl.decode(body, T0)
        assert written_at == T0
        assert records[3].state == "down" and records[3].until == T0 + 30
        assert records[4].reason == "busy"  # merged with what KV had, not overwritten
        assert ttl >= hl.MIN_KV_TTL_S
        assert (sync.view.dirty, sync.view.written_at, sync.flushing) == (False, T0, False)
        assert shell.logs == []

    run(main)


def test_flush_skips_the_write_when_kv_already_covers():
    async def main():
        shell = Shell()
        # another isolate saw the same outage: KV's cooldown ends (nearly) when ours does
        theirs = down(T0 + 30 - POLICY.cooldown_base_s / 2, at=T0 - 1)
        store = FakeStore(record({3: theirs}))
        sync = dirty_sync((3, down(T0 + 30)))
        assert await shell.flush(sync, store) is True
        assert store.writes == [] and store.reads == 1
        assert not sync.view.dirty

    run(main)


def test_flush_writes_when_kv_says_something_else():
    async def main():
        shell = Shell()
        store = FakeStore(record({3: HealthState("up", since=T0 - 99, at=T0 - 99)}))
        sync = dirty_sync((3, down(T0 + 30)))
        assert await shell.flush(sync, store) is True
        assert len(store.writes) == 1

    run(main)


def test_flush_waits_when_another_isolate_wrote_recently():
    async def main():
        shell = Shell()
        store = FakeStore(record({}, written_at=T0 - 10))
        sync = dirty_sync((3, down(T0 + 30)))
        assert await shell.flush(sync, store) is False
        assert store.writes == []
        assert sync.view.dirty and sync.view.written_at == T0 - 10
        assert not sync.flushing

    run(main)


def test_a_transition_during_the_write_stays_dirty():
    # the body was encoded before the write began: a node marked down while the write is
    # in flight is not in KV, so the view must still owe that write
    async def main():
        shell, store = Shell(), FakeStore()
        store.write_gate = asyncio.Event()
        sync = dirty_sync((3, down(T0 + 30)))
        flushing = asyncio.ensure_future(shell.flush(sync, store))
        await store.write_started.wait()  # the write is under way
        assert sync.view.apply(4, down(T0 + 30))
        store.write_gate.set()
        await flushing
        written, _ = hl.decode(store.writes[0][0], T0)
        assert 3 in written and 4 not in written
        assert sync.view.dirty  # node 4 is still to be written

    run(main)


def test_flush_without_kv_clears_dirty():
    async def main():
        sync = dirty_sync((3, down(T0 + 30)))
        assert await Shell().flush(sync, None) is True
        assert not sync.view.dirty and not sync.flushing

    run(main)


def test_a_slow_write_is_given_up_and_stays_dirty():
    async def main():
        shell, store = Shell(), FakeStore()
        store.write_s = None
        sync = dirty_sync((3, down(T0 + 30)), policy=HUNG)
        started = time.monotonic()
        assert await shell.flush(sync, store) is False
        assert time.monotonic() - started < KV_TIMEOUT_S + 2.0
        assert shell.logs == [{"msg": "kv_write_failed", "error": "timed out"}]
        assert sync.view.dirty and sync.view.written_at == 0.0 and not sync.flushing
        # the next flush tries again
        store.write_s = 0.0
        assert await shell.flush(sync, store) is True
        assert len(store.writes) == 1 and not sync.view.dirty

    run(main)


def test_a_rejected_write_stays_dirty():
    async def main():
        shell, store = Shell(), FakeStore()
        store.write_error = RuntimeError("KV PUT failed: 429 Too Many Requests")
        sync = dirty_sync((3, down(T0 + 30)))
        assert await shell.flush(sync, store) is False
        assert shell.logs == [
            {"msg": "kv_write_failed", "error": "KV PUT failed: 429 Too Many Requests"}
        ]
        assert sync.view.dirty

    run(main)


def test_a_hung_read_before_a_write_is_given_up_too():
    async def main():
        shell, store = Shell(), FakeStore()
        store.read_s = None
        sync = dirty_sync((3, down(T0 + 30)), policy=HUNG)
        assert await shell.flush(sync, store) is False
        assert store.writes == [] and sync.view.dirty and not sync.flushing
        assert shell.logs == [{"msg": "kv_write_failed", "error": "timed out"}]

    run(main)


# ---- maybe_flush: when, and never two at once -------------------------------------------


def test_maybe_flush_does_nothing_without_a_transition():
    async def main():
        shell, sync, store = Shell(), HealthSync(POLICY), FakeStore()
        shell.maybe_flush(sync, store)
        assert shell.tasks == [] and not sync.flushing

    run(main)


def test_maybe_flush_respects_the_write_interval():
    async def main():
        shell, store = Shell(), FakeStore()
        sync = dirty_sync((3, down(T0 + 30)))
        shell.maybe_flush(sync, store)
        await shell.drain()
        assert len(store.writes) == 1 and sync.view.written_at == T0
        # a new transition soon after: held back until the interval has passed
        sync.view.apply(4, down(T0 + 30))
        for dt in (1.0, 60.0, POLICY.min_write_interval_s - 0.001):
            shell.clock.t = T0 + dt
            shell.maybe_flush(sync, store)
            assert shell.tasks == [], dt
        shell.clock.t = T0 + POLICY.min_write_interval_s
        shell.maybe_flush(sync, store)
        await shell.drain()
        assert len(store.writes) == 2 and not sync.view.dirty

    run(main)


def test_maybe_flush_never_starts_a_second_flush_while_one_runs():
    async def main():
        shell, store = Shell(), FakeStore()
        store.write_s = 0.02
        sync = dirty_sync((3, down(T0 + 30)))
        for _ in range(10):
            shell.maybe_flush(sync, store)
            await asyncio.sleep(0)
        assert len(shell.tasks) == 1 and sync.flushing
        await shell.drain()
        assert store.reads == 1 and len(store.writes) == 1 and not sync.flushing

    run(main)


def test_maybe_flush_does_not_overlap_a_running_cron_flush():
    async def main():
        shell, store = Shell(), FakeStore()
        store.read_s = 0.02
        sync = dirty_sync((3, down(T0 + 30)))
        cron = asyncio.ensure_future(shell.flush(sync, store))
        await asyncio.sleep(0)
        shell.maybe_flush(sync, store)
        assert shell.tasks == []
        assert await cron is True

    run(main)


def test_flushes_stay_one_at_a_time_under_a_stream_of_transitions():
    async def main():
        # zero-length sleeps only: the interleaving is the event loop's, not the machine's
        shell, store = Shell(), FakeStore()
        store.ticks = 3
        sync = HealthSync(POLICY)
        for i in range(40):
            shell.clock.t = T0 + i * 30.0  # every 4th step passes the write interval
            sync.view.apply(1 + i % 8, down(shell.clock.t + 5 + i, at=shell.clock.t))
            shell.maybe_flush(sync, store)
            await asyncio.sleep(0)  # a flush (read, then write) spans several steps
        await shell.drain()
        assert store.max_in_flight == 1  # never a read or write of one flush amid another's
        stamps = [hl.decode(body, T0 + 10_000)[1] for body, _ in store.writes]
        assert len(stamps) >= 5, stamps
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert all(g >= POLICY.min_write_interval_s for g in gaps), gaps

    run(main)


@pytest.mark.parametrize("interval", [1.0, 120.0, 600.0])
def test_write_interval_setting_is_the_one_used(interval):
    async def main():
        policy = HealthPolicy(kv_timeout_s=2.0, min_write_interval_s=interval)
        shell, store = Shell(), FakeStore()
        sync = dirty_sync((3, down(T0 + 30)), policy=policy)
        shell.maybe_flush(sync, store)
        await shell.drain()
        sync.view.apply(4, down(T0 + 30))
        shell.clock.t = T0 + interval - 0.5
        shell.maybe_flush(sync, store)
        assert shell.tasks == []
        shell.clock.t = T0 + interval
        shell.maybe_flush(sync, store)
        assert len(shell.tasks) == 1
        await shell.drain()

    run(main)


def test_flush_due_is_the_one_condition_for_the_cron_and_the_request_path():
    sync = dirty_sync((3, down(T0 + 30)))
    assert sync.flush_due(T0)
    sync.flushing = True
    assert not sync.flush_due(T0)  # one flush at a time
    sync.flushing = False
    sync.view.written_at = T0
    assert not sync.flush_due(T0 + POLICY.min_write_interval_s - 0.001)
    assert sync.flush_due(T0 + POLICY.min_write_interval_s)
    assert not HealthSync(POLICY).flush_due(T0)  # nothing owed
