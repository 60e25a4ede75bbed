"""Storage hygiene: once a batch or a fine-tuning job is final, delete the R2 objects under its
prefix that no row names.

Nodes write under keys named by their lease (`b/<batch>/w/<seq>/<lease>.out|.err`,
`ft/<job>/ckpt/<step>/<lease>.tar`, `ft/<job>/adapter/<lease>.tar`,
`ft/<job>/results/<lease>.csv`), so a lease that lost (lapsed and taken over, or refused at
commit) leaves objects no row will ever name: never served, and until this sweep never deleted.

Why deleting them is safe:
- Only final targets are swept (batches completed/failed/expired/cancelled, jobs
  succeeded/failed/cancelled), and a final target gains no reference: every write that names
  an object is conditional in D1 on a target that is not final (a shard's commit needs a
  current lease of a batch still running or cancelling and inside its window; a batch's close
  is the move to final itself; a checkpoint record and a job's success need an active job,
  so a cancelled job's still-live lease can name nothing). So "unreferenced now" means
  "unreferenced for good", whatever happens after the listing.
- What is referenced is read from D1 for the target's whole prefix and never deleted
  (`doomed` is the one decision; a hypothesis property checks it).
- The grace: a node whose lease was current when it asked for its upload key may still be
  streaming the body into R2. Deleting before it lands would be harmless (it is garbage too)
  but futile: it would land after the sweep and stay. So a target is swept only `grace_s`
  after both its end and the expiry of the last lease any of its work rows held (at most
  MAX_LEASE_WAIT_S after its end: a node heart-beating a cancelled job forever does not hold
  the queue). An upload still streaming past that stays in R2: at most one object per lost
  lease, each within the upload cap.

Bounded per cron run (`Budget`): a few targets, a few list calls (R2 Class A operations; the
deletes are free), a page of at most 1,000 keys each; progress is kept in D1 (`sweep_marks`,
migrations/0003_sweep.sql), so each target is swept once, oldest first, resuming mid-prefix in
the next run when its listing is long. Costs in docs/budgets.md. The mark is an end time:
a target whose final write landed more than MIN_GRACE_S after the clock it stamped would be
passed over (left unswept, never wrongly swept).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import finetune_db
import jobdb
from batches import FINISHED
from finetune_db import FINAL_JOB
from jobdb import Row, num
from storage import LIST_LIMIT, Blobs, Db

MIN_GRACE_S = 10.0  # a close's end time is written within this of the clock it was read from
MAX_LEASE_WAIT_S = 86_400.0  # a final target's live lease holds its sweep at most this long


@dataclass(frozen=True, slots=True)
class Budget:
    """The most one cron run does per kind."""

    targets: int = 4  # batches (or jobs) looked at
    lists: int = 8  # R2 list calls (Class A operations)
    page: int = LIST_LIMIT  # keys per list call


@dataclass(frozen=True, slots=True)
class Kind:
    """Batches or fine-tuning jobs: their final statuses, key prefix and queries."""

    name: str  # sweep_marks.kind
    final: tuple[str, ...]
    root: str  # the prefix's first segment: b/<batch>/, ft/<job>/
    candidates: Callable[[Db, int, str, float, int], Awaitable[list[Row]]]
    referenced: Callable[[Db, str], Awaitable[list[str]]]

    def prefix(self, target_id: str) -> str:
        return f"{self.root}/{target_id}/"


BATCHES = Kind("batch", FINISHED, "b", jobdb.batches_to_sweep, jobdb.batch_blob_keys)
JOBS = Kind("ft", FINAL_JOB, "ft", finetune_db.jobs_to_sweep, finetune_db.job_blob_keys)


@dataclass(frozen=True, slots=True)
class Target:
    """A batch or job as the sweep sees it."""

    id: str
    status: str
    ended_at: float | None  # when it became final (None: it is not)
    leases_until: float | None  # the latest expiry of a lease its work rows hold

    @classmethod
    def of(cls, row: Row) -> Target:
        ended, until = row.get("ended_at"), row.get("leases_until")
        return cls(
            str(row["id"]),
            str(row["status"]),
            None if ended is None else float(ended),  # type: ignore[arg-type]
            None if until is None else float(until),  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class Mark:
    """sweep_marks: the last target swept whole, and the one under way."""

    ended_at: int = 0
    id: str = ""
    head_id: str | None = None
    resume_after: str | None = None

    @classmethod
    def of(cls, row: Row | None) -> Mark:
        if row is None:
            return cls()
        head, after = row.get("head_id"), row.get("resume_after")
        return cls(
            num(row["ended_at"]),
            str(row["id"]),
            None if head is None else str(head),
            None if after is None else str(after),
        )


@dataclass(slots=True)
class Swept:
    """What one run did (the cron's log line)."""

    targets: int = 0  # swept whole
    deleted: int = 0  # objects deleted
    lists: int = 0  # list calls made

    def log(self) -> dict[str, int]:
        return {"targets": self.targets, "deleted": self.deleted, "lists": self.lists}


def grace_for(lease_s: float) -> float:
    """How long after a target's end and its last lease's expiry it is swept: a lease
    period (an upload begun under a live lease has had that long to land), at least
    MIN_GRACE_S."""
    return max(float(lease_s), MIN_GRACE_S)


def due(kind: Kind, t: Target, now: float, grace_s: float) -> bool:
    """May `t`'s prefix be swept now? Only a final target, `grace_s` after its end and after
    the last expiry of its leases (capped at MAX_LEASE_WAIT_S after its end)."""
    if t.status not in kind.final or t.ended_at is None:
        return False
    leases = t.ended_at if t.leases_until is None else t.leases_until
    settled = max(t.ended_at, min(leases, t.ended_at + MAX_LEASE_WAIT_S))
    return now >= settled + max(grace_s, 0.0)


def doomed(prefix: str, listed: Iterable[str], referenced: Iterable[str]) -> list[str]:
    """The listed keys to delete: under `prefix` and named by no row. In listing order."""
    keep = set(referenced)
    return [k for k in dict.fromkeys(listed) if k.startswith(prefix) and k not in keep]


async def sweep(
    db: Db,
    blobs: Blobs,
    kind: Kind,
    now: float,
    grace_s: float,
    budget: Budget = Budget(),
) -> Swept:
    """The cron's sweep of one kind: the final targets due, oldest end first, each once.
    Stops at the first target not yet due (it and the later ones wait for the next run), and
    when the budget is spent (the mark keeps where it stopped)."""
    done = Swept()
    mark = Mark.of(await jobdb.sweep_mark(db, kind.name))
    rows = await kind.candidates(db, mark.ended_at, mark.id, now - grace_s, budget.targets)
    for row in rows:
        t = Target.of(row)
        if done.lists >= budget.lists or not due(kind, t, now, grace_s):
            break
        after = mark.resume_after if mark.head_id == t.id else None
        finished, after = await _sweep_target(db, blobs, kind, t, after, budget, done)
        if not finished:  # out of list calls mid-prefix: the next run resumes after `after`
            await jobdb.save_sweep_mark(db, kind.name, mark.ended_at, mark.id, t.id, after)
            break
        ended = int(t.ended_at)  # type: ignore[arg-type]
        await jobdb.save_sweep_mark(db, kind.name, ended, t.id, None, None)
        mark = Mark(ended, t.id)
        done.targets += 1
    return done


async def _sweep_target(
    db: Db,
    blobs: Blobs,
    kind: Kind,
    t: Target,
    after: str | None,
    budget: Budget,
    done: Swept,
) -> tuple[bool, str | None]:
    """List `t`'s prefix page by page from after `after` and delete what no row names.
    (True, None) when the listing ended; (False, the key to resume after) when the budget's
    list calls ran out first."""
    prefix = kind.prefix(t.id)
    keep: Sequence[str] | None = None
    while done.lists < budget.lists:
        page = await blobs.list(prefix, after, budget.page)
        done.lists += 1
        if page.keys and keep is None:
            keep = await kind.referenced(db, t.id)  # one read, only for a non-empty prefix
        gone = doomed(prefix, page.keys, keep or ())
        if gone:
            await blobs.delete(gone)
            done.deleted += len(gone)
        if not page.truncated or not page.keys:
            return True, None
        after = page.keys[-1]
    return False, after
