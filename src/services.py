"""The I/O the shell hands the pure core, bundled once per request (`Services`) instead of
passed piece by piece: the health store, the clock, ctx.waitUntil and the log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from storage import HealthStore

Clock = Callable[[], float]  # epoch seconds
Log = Callable[[dict], None]  # one JSON log line
Background = Callable[[Awaitable[None]], None]  # ctx.waitUntil: work after the response


@dataclass(frozen=True, slots=True)
class Services:
    """Built by the shell per request (`background` is that request's ctx.waitUntil);
    `store` is None where there is no KV (a local run without the binding)."""

    store: HealthStore | None
    clock: Clock
    background: Background
    log: Log
