"""The batch core's stores for CPython tests: `SqliteDb` runs every statement with sqlite3 (the
engine D1 is), on the tables of migrations/0001_batches.sql, and holds the core to D1's rules
(<= 100 bound parameters, no Python bools: D1 binds only null, numbers, text and blobs);
`MemoryBlobs` is R2 as a dict of bytes. `SeqIds` gives readable, deterministic ids.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from jobdb import Ids
from storage import LIST_LIMIT, Listing

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
D1_MAX_PARAMS = 100


class SqliteDb:
    """`storage.Db` over one sqlite3 connection in autocommit mode; `batch` is one
    transaction, rolled back whole if any statement fails (as D1's batch)."""

    def __init__(self, path: str = ":memory:") -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        for sql in sorted(MIGRATIONS.glob("*.sql")):
            self.conn.executescript(sql.read_text())
        self.statements = 0

    def _check(self, sql: str, params: Sequence[object]) -> list[object]:
        params = list(params)
        assert len(params) <= D1_MAX_PARAMS, f"{len(params)} params: D1 allows 100"
        for p in params:
            assert p is None or type(p) in (int, float, str, bytes), f"D1 cannot bind {p!r}"
        assert sql.count("?") == len(params), f"{sql.count('?')} marks, {len(params)} params"
        self.statements += 1
        return params

    async def all(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, object]]:
        cur = self.conn.execute(sql, self._check(sql, params))
        return [dict(r) for r in cur.fetchall()]

    async def run(self, sql: str, params: Sequence[object] = ()) -> int:
        cur = self.conn.execute(sql, self._check(sql, params))
        return cur.rowcount

    async def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[int]:
        changes: list[int] = []
        self.conn.execute("BEGIN")
        try:
            for sql, params in statements:
                cur = self.conn.execute(sql, self._check(sql, params))
                cur.fetchall()
                changes.append(cur.rowcount)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return changes

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, object]]:
        """Synchronous read for assertions."""
        return [dict(r) for r in self.conn.execute(sql, list(params)).fetchall()]


class MemoryBlobs:
    """`storage.Blobs` as a dict of bytes."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.lists = 0  # list calls made (R2 Class A operations)

    async def put(
        self,
        key: str,
        body: object,
        *,
        length: int | None = None,
        content_type: str | None = None,
    ) -> int:
        data = body.encode() if isinstance(body, str) else bytes(body)  # type: ignore[call-overload]
        if length is not None:
            assert len(data) == length
        self.objects[key] = data
        return len(data)

    async def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        data = self.objects.get(key)
        return None if data is None else data[offset : offset + length]

    async def size(self, key: str) -> int | None:
        data = self.objects.get(key)
        return None if data is None else len(data)

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.objects.pop(key, None)

    async def list(self, prefix: str, after: str | None = None, limit: int = LIST_LIMIT) -> Listing:
        assert 1 <= limit <= LIST_LIMIT, limit
        self.lists += 1
        keys = sorted(
            k for k in self.objects if k.startswith(prefix) and (after is None or k > after)
        )
        return Listing(tuple(keys[:limit]), len(keys) > limit)

    async def read_parts(self, parts: Sequence[tuple[str, int, int]]) -> bytes:
        """What the shell streams for a plan of parts (a missing object is a test failure)."""
        out = b""
        for key, offset, length in parts:
            chunk = await self.get_range(key, offset, length)
            assert chunk is not None and len(chunk) == length, (key, offset, length)
            out += chunk
        return out


class SeqIds(Ids):
    """Ids like OpenAI's (prefix + 24 hex) from a counter; tokens unique per call."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)

    def new(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter):024x}"

    def token(self) -> str:
        return f"tok{next(self.counter)}"


def drive(coro):
    """Run a core coroutine to its end without an event loop: the stores above never
    suspend, so each call completes in one step (fast enough for hypothesis)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine suspended: a store awaited something")
