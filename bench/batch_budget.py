"""D1 and R2 operations of one batch, counted by running the batch core's own calls (the ones the
Worker shell makes, in the order a node makes them) over the test stores: every SQL statement
runs in SQLite (`tests/support/stores.SqliteDb`), every R2 call is counted by kind. ::

    .venv/bin/python -m bench.batch_budget [--lines 10000] [--shard-lines 100] [--beats 2]

D1 bills rows read and rows written, not statements. Rows written = rows a statement changed
(SQLite's change count) plus one per index entry it changed (D1's rule: an index on a written
column adds a written row). Rows read are estimated, since SQLite does not expose its scan
counters to Python: 1 per row a statement returns or changes (index lookups), plus the rows the
two scanning statements visit: a lease's pick (every open work row of open batches) and the
recount after each commit (the batch's done shards, three subqueries). docs/budgets.md has the
table this prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.common import ROOT

sys.path.insert(0, str(ROOT / "src"))  # the core's modules, as the unit tests import them

from tests.support import batchkit
from tests.support.stores import MemoryBlobs, SqliteDb

OWNER = "budget-owner"
# Indexes on `work` columns a statement writes (migrations/0001_batches.sql): (state,
# expires_at), (batch_id, state, seq), unique (lease_id).
WORK_INDEX_COLS = {"state": 2, "expires_at": 1, "lease_id": 1}


@dataclass
class Tally:
    statements: int = 0
    read: int = 0
    written: int = 0
    r2: Counter[str] = field(default_factory=Counter)


class CountingDb(SqliteDb):
    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.tally: dict[str, Tally] = {}

    def _t(self) -> Tally:
        return self.tally.setdefault(self.phase, Tally())

    def _count(self, sql: str, params: Sequence[object], returned: int, changed: int) -> None:
        t = self._t()
        t.statements += 1
        t.read += max(returned, changed, 1)
        if sql.startswith("UPDATE work SET state = 'leased'"):
            row = self.conn.execute(
                "SELECT COUNT(*) FROM work WHERE state IN ('pending', 'leased')"
            ).fetchone()
            t.read += row[0]
        if "SET completed = (SELECT" in sql:
            row = self.conn.execute(
                "SELECT COUNT(*) FROM work WHERE batch_id = ? AND state = 'done'", (params[0],)
            ).fetchone()
            t.read += 3 * row[0]
        if changed > 0 and not sql.startswith("SELECT"):
            extra = 0
            if re.match(r"(UPDATE|INSERT INTO) work", sql):
                head = sql.split(" WHERE ", 1)[0]
                extra = sum(n for col, n in WORK_INDEX_COLS.items() if col in head)
                if sql.startswith("INSERT"):
                    extra = 4  # every index of the new row
            elif re.match(r"(UPDATE|INSERT INTO) (batches|files)", sql):
                extra = 2 if "status" in sql.split(" WHERE ", 1)[0] or "INSERT" in sql else 0
            t.written += changed * (1 + extra)

    async def all(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, object]]:
        rows = await super().all(sql, params)
        writes = not sql.lstrip().startswith("SELECT")
        self._count(sql, params, len(rows), len(rows) if writes else 0)
        return rows

    async def run(self, sql: str, params: Sequence[object] = ()) -> int:
        changed = await super().run(sql, params)
        self._count(sql, params, 0, max(changed, 0))
        return changed

    async def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[int]:
        changes = await super().batch(statements)
        for (sql, params), changed in zip(statements, changes, strict=True):
            self._count(sql, params, 0, max(changed, 0))
        return changes


class CountingBlobs(MemoryBlobs):
    def __init__(self, db: CountingDb) -> None:
        super().__init__()
        self.db = db

    async def put(self, key: str, body: object, **kw: object) -> int:
        self.db._t().r2["A: PutObject"] += 1
        return await super().put(key, body, **kw)  # type: ignore[arg-type]

    async def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        self.db._t().r2["B: GetObject"] += 1
        return await super().get_range(key, offset, length)

    async def size(self, key: str) -> int | None:
        self.db._t().r2["B: HeadObject"] += 1
        return await super().size(key)

    async def delete(self, keys: Sequence[str]) -> None:
        self.db._t().r2["free: DeleteObject"] += len(keys)
        await super().delete(keys)


def run(lines: int, shard_lines: int, beats: int, polls: int) -> dict[str, Tally]:
    from jobdb import BatchSettings

    gw = batchkit.Gateway(BatchSettings(shard_lines=shard_lines))
    db = CountingDb()
    gw.db, gw.blobs = db, CountingBlobs(db)
    data = batchkit.jsonl(lines)
    db.phase = "files.create (the shell also reads 64 KiB from each end)"
    f = gw.upload(OWNER, data)
    key = f.body["id"]
    # The shell reads both ends of the stored body (jobs_shell: two ranged GETs).
    db._t().r2["B: GetObject"] += 2
    db.phase = "batches.create"
    b = gw.create_batch(OWNER, key).body
    db.phase = "validate (lease, input, commit of the plan)"
    lease = gw.lease(7)
    assert lease is not None and lease["kind"] == "validate"
    assert gw.validate(lease).status == 200
    db.phase = f"shards: lease, input, {beats} heartbeats, result PUTs, commit"
    shards = 0
    while (lease := gw.lease(7 + shards % 2)) is not None:
        for _ in range(beats):
            assert gw.heartbeat(lease).status == 200
        assert gw.run_shard(lease).status == 200
        shards += 1
    db.phase = "an idle node's lease poll (204)"
    assert gw.lease(7) is None
    db.phase = f"batches.retrieve x {polls}"
    for _ in range(polls):
        body = gw.batch(OWNER, b["id"])
    assert body["status"] == "completed", body
    db.phase = "files.content (output + error)"
    for fid in (body["output_file_id"], body["error_file_id"]):
        if fid:
            gw.content(OWNER, fid)
    return db.tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batch_budget", description=__doc__)
    ap.add_argument("--lines", type=int, default=10_000)
    ap.add_argument("--shard-lines", type=int, default=100)
    ap.add_argument("--beats", type=int, default=2, help="heartbeats per shard")
    ap.add_argument("--polls", type=int, default=100, help="batches.retrieve calls")
    args = ap.parse_args(argv)
    tally = run(args.lines, args.shard_lines, args.beats, args.polls)
    head = f"{args.lines:,} lines, SHARD_LINES {args.shard_lines}, {args.beats} heartbeats a shard"
    print(head + "\n")
    print("| phase | D1 statements | rows read (est.) | rows written | R2 |")
    print("|---|---:|---:|---:|---|")
    total = Tally()
    for phase, t in tally.items():
        r2 = ", ".join(f"{k} {v}" for k, v in sorted(t.r2.items())) or "-"
        print(f"| {phase} | {t.statements:,} | {t.read:,} | {t.written:,} | {r2} |")
        if not phase.startswith("an idle"):
            total.statements += t.statements
            total.read += t.read
            total.written += t.written
            total.r2.update(t.r2)
    r2 = ", ".join(f"{k} {v}" for k, v in sorted(total.r2.items()))
    print(
        f"| **one batch** | **{total.statements:,}** | **{total.read:,}** | "
        f"**{total.written:,}** | {r2} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
