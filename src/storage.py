"""The storage the pure core is written against, as Protocols: the shell adapts the runtime's
bindings to them (jsio.KvStore, jsstore.R2Blobs, jsstore.D1Db) and the unit tests use
in-memory fakes.

- `HealthStore`: the one Workers KV record every isolate shares (node health, sync.py).
- `Blobs`: an R2 bucket (binding FILES): uploaded files, batch inputs and outputs; `list`
  pages through a prefix for the cron's sweep of unreferenced objects (sweep.py).
- `Db`: a D1 (SQLite) database (binding JOBS_DB): jobs and their state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

LIST_LIMIT = 1000  # R2's list answers at most 1,000 keys a call


@dataclass(frozen=True, slots=True)
class Listing:
    """One page of `Blobs.list`: keys in lexicographic order; `truncated`: more follow (ask
    again with `after` = the last key). A page may hold fewer than the limit and still be
    truncated (R2 shortens pages under memory pressure), so only `truncated` says "more"."""

    keys: tuple[str, ...]
    truncated: bool


class HealthStore(Protocol):
    async def read(self) -> str | None: ...

    async def write(self, body: str, ttl_s: int) -> None: ...


class Blobs(Protocol):  # R2
    async def put(
        self,
        key: str,
        body: object,
        *,
        length: int | None = None,
        content_type: str | None = None,
    ) -> int:
        """Store `body` (bytes, str, or an opaque JS ReadableStream, which never enters
        Python) under `key`; returns the bytes stored."""
        ...

    async def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        """`length` bytes from `offset` (fewer at the end); None when there is no such
        object. For small reads into Python only: large bodies stay JS streams."""
        ...

    async def size(self, key: str) -> int | None: ...

    async def delete(self, keys: Sequence[str]) -> None: ...

    async def list(self, prefix: str, after: str | None = None, limit: int = LIST_LIMIT) -> Listing:
        """Keys starting with `prefix`, after the key `after` (exclusive), at most `limit`
        (1..1,000) of them. One R2 list call: a Class A operation (docs/budgets.md)."""
        ...


class Db(Protocol):  # D1 (SQLite)
    async def all(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, object]]:
        """Every row the statement returns (SELECT, or a write with RETURNING)."""
        ...

    async def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; returns the rows it changed (meta.changes)."""
        ...

    async def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[int]:
        """Run the statements in one transaction (all or none); rows changed per statement."""
        ...
