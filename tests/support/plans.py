"""Which statements scan a table: `recorded` collects the distinct SQL a block runs on a
`SqliteDb` (each with its first bound parameters), `table_scans` asks SQLite's EXPLAIN QUERY PLAN
for each and returns those whose plan scans where an index should serve."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from tests.support.stores import SqliteDb


@contextmanager
def recorded(db: SqliteDb) -> Iterator[dict[str, list[object]]]:
    """The statements run inside the block, in first-run order, each with its bound params."""
    seen: dict[str, list[object]] = {}
    check = db._check

    def record(sql: str, params: Sequence[object]) -> list[object]:
        bound = check(sql, params)
        seen.setdefault(sql, bound)
        return bound

    db._check = record  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        db._check = check  # type: ignore[method-assign]


def table_scans(
    db: SqliteDb,
    statements: Mapping[str, Sequence[object]],
    allowed: tuple[str, ...] = (),
    allow_virtual: bool = False,
) -> list[tuple[str, list[str]]]:
    """(sql, plan) of each statement whose plan has a SCAN step other than those starting with
    an `allowed` prefix (and, with `allow_virtual`, a virtual table's such as json_each under
    any alias)."""
    found = []
    for sql, params in statements.items():
        plan = [r[3] for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql, list(params))]
        scans = [
            p
            for p in plan
            if p.startswith("SCAN")
            and not p.startswith(allowed)
            and not (allow_virtual and "VIRTUAL TABLE" in p)
        ]
        if scans:
            found.append((sql, plan))
    return found
