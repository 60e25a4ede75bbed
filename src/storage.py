"""The two stores the batch core runs over, as Protocols: R2 (`Blobs`) and D1 (`Db`).

The Worker shell adapts the real bindings to them; the CPython tests use a sqlite3 `Db` and a
dict-of-bytes `Blobs` (tests/support), so every SQL statement the Worker sends is run by SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# The Protocols verbatim from BATCH-DESIGN.md (the shell helper adds the same file).
# ruff: noqa: E501
# fmt: off


class Blobs(Protocol):            # R2
    async def put(self, key: str, body: object, *, length: int | None = None, content_type: str | None = None) -> int: ...
    async def get_range(self, key: str, offset: int, length: int) -> bytes | None: ...
    async def size(self, key: str) -> int | None: ...
    async def delete(self, keys: Sequence[str]) -> None: ...
class Db(Protocol):               # D1
    async def all(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, object]]: ...
    async def run(self, sql: str, params: Sequence[object] = ()) -> int: ...        # rows changed
    async def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[int]: ...  # one transaction
