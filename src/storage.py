"""The storage the pure core is written against, as Protocols: the shell adapts the runtime's
bindings to them (jsio.KvStore, jsstore.R2Blobs, jsstore.D1Db) and the unit tests use
in-memory fakes.

- `HealthStore`: the one Workers KV record every isolate shares (node health, sync.py).
- `Blobs`: an R2 bucket (binding FILES): uploaded files, batch inputs and outputs.
- `Db`: a D1 (SQLite) database (binding JOBS_DB): jobs and their state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


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
