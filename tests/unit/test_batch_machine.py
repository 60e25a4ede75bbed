"""The exactly-once proof: hypothesis drives the batch core through any interleaving of leases,
heartbeats, clock jumps (lease lapse, the 24 h window), result uploads, commits, node death,
cancels, cron runs, stale commits and releases (a draining node gives back its whole lease or
all but a prefix it keeps), with three nodes (two of the batch pool, one idle helper)
over two batches of several shards, on the real SQL (sqlite3) and a dict R2.

Invariants after every step: a shard is committed at most once; request_counts are the sums
of the accepted commits (a refused commit changes nothing); a closed batch's output and error
files hold exactly the committed lines. At the end the surviving nodes finish: every batch is
closed, a completed batch holds every custom_id exactly once in output + error, a cancelled or
expired one exactly the lines of the shards committed before it closed.
"""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import batches
from jobdb import BatchSettings
from tests.support.batchkit import MODEL, Gateway, custom_ids, jsonl, results, shard_plan
from tests.support.stores import drive

OWNER = "0123456789abcdef"
NODES = (1, 2, 3)  # 1, 2: the batch pool; 3: another role's node helping while idle
MODELS = {1: [MODEL], 2: [MODEL, "other/model"], 3: [MODEL]}
FINAL = ("completed", "failed", "cancelled", "expired")
SETTINGS = BatchSettings(shard_lines=3, lease_s=120, heartbeat_s=30, helpers=True)


def prefix_bytes(data: bytes, lines: int) -> int:
    at = 0
    for _ in range(lines):
        at = data.index(b"\n", at) + 1
    return at


def ids_in(blob: bytes) -> list[str]:
    return [json.loads(line)["custom_id"] for line in blob.splitlines() if line.strip()]


class BatchMachine(RuleBasedStateMachine):
    CANCEL_FROM = 5  # a cancel goes through when chance (0..5) is at least this: rarely

    def __init__(self) -> None:
        super().__init__()
        self.g = Gateway(SETTINGS)
        self.inputs: dict[str, bytes] = {}
        self.held: dict[int, list[dict]] = {n: [] for n in NODES}
        self.dead: set[int] = set()
        self.accepted: set[tuple[str, int, int]] = set()  # (batch, seq, first_line) committed
        self.lines: dict[str, Counter] = {}  # batch -> custom ids in accepted commits
        self.counts: dict[str, list[int]] = {}  # batch -> [completed, failed] accepted

    @initialize(
        sizes=st.lists(st.integers(1, 10), min_size=1, max_size=2), validated=st.integers(0, 3)
    )
    def upload(self, sizes: list[int], validated: int) -> None:
        for i, n in enumerate(sizes):
            data = jsonl(n, prefix=f"b{i}")
            f = self.g.upload(OWNER, data)
            assert f.status == 200, f.body
            b = self.g.create_batch(OWNER, f.body["id"])
            assert b.status == 200, b.body
            self.inputs[b.body["id"]] = data
            self.lines[b.body["id"]] = Counter()
            self.counts[b.body["id"]] = [0, 0]
        while validated < 3 and (lease := self.g.lease(1, models=[])) is not None:
            # Start most runs with shards to fight over (no models: validate work only).
            assert lease["kind"] == "validate" and self._prepare(lease, 0)
            self._commit(1, lease)

    # ------------------------------------------------------------------ helpers

    def _holding(self) -> bool:
        return any(self.held[n] for n in NODES if n not in self.dead)

    def _pick(self, pick: int) -> tuple[int, dict]:
        """One lease some live node holds (the rules below run only when there is one)."""
        held = [(n, lease) for n in NODES if n not in self.dead for lease in self.held[n]]
        return held[pick % len(held)]

    def _drop(self, node: int, lease: dict) -> None:
        self.held[node] = [h for h in self.held[node] if h is not lease]

    def _snapshot(self) -> list:
        """What a refused commit must leave alone: counts and the committed shards. (It may
        expire a batch past its window: that move is due whoever asks first.)"""
        return self.g.db.rows(
            "SELECT id, completed, failed, total FROM batches ORDER BY id"
        ) + self.g.db.rows(
            "SELECT id, completed, failed, out_blob, err_blob FROM work"
            " WHERE state = 'done' ORDER BY id"
        )

    def _prepare(self, lease: dict, upto: int) -> bool:
        """The node runs its shard (all lines, or `upto` when cancelling) and uploads."""
        data = self.g.read_input(lease)
        if not isinstance(data, bytes):
            assert data.status == 409, data.body
            return False
        if lease["kind"] == "validate":
            total, shards = shard_plan(data, SETTINGS.shard_lines)
            lease["body"] = {"ok": True, "model": MODEL, "total": total, "shards": shards}
            return True
        partial = lease.get("cancel", False)
        out, err, completed, failed = results(data, upto if partial else None)
        for part, blob in (("output", out), ("error", err)):
            if blob:
                target = self.g.put(lease, part, blob)
                if not isinstance(target, str):
                    assert target.status == 409, target.body
                    return False
        lease["body"] = {"completed": completed, "failed": failed, "partial": partial}
        lease["ids"] = ids_in(out) + ids_in(err)
        return True

    def _commit(self, node: int, lease: dict) -> None:
        before = self._snapshot()
        result = self.g.commit(lease, lease["body"])
        self._drop(node, lease)
        if result.status != 200:
            assert result.status == 409, result.body
            assert result.body["error"]["code"] == "lease_lost"
            assert self._snapshot() == before, "a refused commit changed state"
            event("refused commit")
            return
        key = (lease["batch_id"], lease["seq"], lease["first_line"])
        assert key not in self.accepted, f"shard {key} committed twice"
        self.accepted.add(key)
        if lease["body"].get("partial"):
            event("partial commit")
        if lease["kind"] == "lines":
            body = lease["body"]
            self.lines[lease["batch_id"]].update(lease["ids"])
            self.counts[lease["batch_id"]][0] += body["completed"]
            self.counts[lease["batch_id"]][1] += body["failed"]

    # -------------------------------------------------------------------- rules

    @rule(node=st.sampled_from(NODES), idle=st.booleans(), run=st.booleans())
    def lease(self, node: int, idle: bool, run: bool) -> None:
        """A node leases; with `run` it also runs the work and uploads its parts at once
        (the commit comes in a later step, maybe after its lease lapsed)."""
        if node in self.dead:
            return
        lease = self.g.lease(node, MODELS[node], may_lease_any=node != 3, idle=idle)
        if lease is not None:
            assert node != 3 or idle, "a busy helper node got work"
            self.held[node].append(lease)
            if run and not self._prepare(lease, 0):
                self._drop(node, lease)

    @precondition(_holding)
    @rule(pick=st.integers(0, 7))
    def heartbeat(self, pick: int) -> None:
        node, lease = self._pick(pick)
        result = self.g.heartbeat(lease)
        assert result.status in (200, 409), result.body
        if result.status == 409:
            self._drop(node, lease)
        elif result.body["cancel"]:
            lease["cancel"] = True

    @precondition(_holding)
    @rule(pick=st.integers(0, 7), upto=st.integers(0, 3))
    def run_and_upload(self, pick: int, upto: int) -> None:
        node, lease = self._pick(pick)
        if "body" not in lease and not self._prepare(lease, upto):
            self._drop(node, lease)

    @precondition(_holding)
    @rule(pick=st.integers(0, 7), upto=st.integers(0, 3), beat=st.booleans())
    def commit(self, pick: int, upto: int, beat: bool) -> None:
        """A node commits (running the work first if it has not); with `beat` it heartbeats
        just before, as its worker does, and learns of a cancel."""
        node, lease = self._pick(pick)
        if beat:
            self.heartbeat(pick)
            if all(lease is not h for h in self.held[node]):
                return
        if "body" not in lease and not self._prepare(lease, upto):
            self._drop(node, lease)
            return
        self._commit(node, lease)

    @precondition(_holding)
    @rule(pick=st.integers(0, 7))
    def stale_token_commit(self, pick: int) -> None:
        _, lease = self._pick(pick)
        before = self._snapshot()
        forged = {**lease, "token": lease["token"] + "x"}
        result = self.g.commit(forged, {"completed": lease["n_lines"], "failed": 0})
        assert result.status == 409, result.body
        assert self._snapshot() == before

    @precondition(_holding)
    @rule(pick=st.integers(0, 7), keep=st.integers(0, 3))
    def release(self, pick: int, keep: int) -> None:
        """A draining node gives back what it will not run: the whole lease (keep 0), or all
        but its first `keep` lines, which it then uploads and commits as usual."""
        node, lease = self._pick(pick)
        before = self._snapshot()
        data = self.g.read_input(lease)
        if not isinstance(data, bytes):
            assert data.status == 409, data.body
            self._drop(node, lease)
            return
        n = lease["n_lines"] if lease["kind"] == "lines" else 0
        keep = min(keep, n)
        result = self.g.release(lease, keep, prefix_bytes(data, keep))
        if result.status == 409:
            assert self._snapshot() == before, "a refused release changed state"
            self._drop(node, lease)
            return
        assert result.status == 200, result.body
        if keep == 0:
            event("released whole")
            self._drop(node, lease)
        elif keep < n:
            event("released the rest")
            lease["n_lines"] = keep
            lease.pop("body", None)  # what it ran and uploaded for all n lines is redone
            lease.pop("ids", None)

    @rule(node=st.sampled_from(NODES), chance=st.integers(0, 3))
    def die(self, node: int, chance: int) -> None:
        """The node (and its worker) stops calling for good; its leases lapse."""
        if chance == 3 and len(self.dead) < len(NODES) - 1:
            self.dead.add(node)
            self.held[node] = []

    @rule(dt=st.sampled_from([1, 29, 60, 119, 121, 121, 500] * 4 + [24 * 3600]))
    def tick(self, dt: int) -> None:
        """Time passes: a heartbeat interval, a lapsed lease, rarely the whole window."""
        self.g.now += dt

    @rule(which=st.integers(0, 1), chance=st.integers(0, 5))
    def cancel(self, which: int, chance: int) -> None:
        if chance < self.CANCEL_FROM:
            return  # rarer than the node traffic, so most batches run to an end
        batch_id = sorted(self.inputs)[which % len(self.inputs)]
        status = self.g.batch(OWNER, batch_id)["status"]
        result = drive(batches.cancel_batch(self.g.db, self.g.ids, OWNER, batch_id, self.g.now))
        if status in ("validating", "in_progress", "cancelling"):
            assert result.status == 200, result.body
            assert result.body["status"] in ("cancelling", "cancelled")
        else:
            assert result.status == 409, result.body

    @rule()
    def cron(self) -> None:
        drive(batches.expire_due(self.g.db, self.g.blobs, self.g.ids, self.g.now))

    # --------------------------------------------------------------- invariants

    @invariant()
    def counts_are_the_accepted_commits(self) -> None:
        for batch_id in self.inputs:
            row = self.g.db.rows("SELECT * FROM batches WHERE id = ?", [batch_id])[0]
            assert [row["completed"], row["failed"]] == self.counts[batch_id]
            done = self.g.db.rows(
                "SELECT seq, first_line FROM work WHERE batch_id = ? AND state = 'done'",
                [batch_id],
            )
            assert {(batch_id, d["seq"], d["first_line"]) for d in done} == {
                k for k in self.accepted if k[0] == batch_id
            }
            assert max(self.lines[batch_id].values(), default=0) <= 1, "a line committed twice"
            if row["status"] in FINAL:
                self._check_files(batch_id)

    def _check_files(self, batch_id: str) -> None:
        b = self.g.batch(OWNER, batch_id)
        got: Counter = Counter()
        for key in ("output_file_id", "error_file_id"):
            if b[key]:
                got.update(ids_in(self.g.content(OWNER, b[key])))
        assert got == self.lines[batch_id], "the served files differ from the commits"
        counts = b["request_counts"]
        assert counts["completed"] + counts["failed"] == sum(got.values())
        if b["status"] == "completed":
            assert got == Counter(custom_ids(self.inputs[batch_id])), "a line lost or doubled"
            assert counts["total"] == len(custom_ids(self.inputs[batch_id]))

    def teardown(self) -> None:
        """The survivors finish: each completes or reports what it holds, then the leases of
        the dead lapse and a survivor drains whatever is left."""
        for batch_id in self.inputs:
            event(f"before the end: {self.g.batch(OWNER, batch_id)['status']}")
        for node in NODES:
            for lease in list(self.held[node]):
                beat = self.g.heartbeat(lease)
                if beat.status != 200:
                    continue
                lease["cancel"] = beat.body["cancel"]
                if "body" in lease or self._prepare(lease, lease["n_lines"]):
                    self._commit(node, lease)
            self.held[node] = []
        survivor = next(n for n in NODES if n not in self.dead)
        for _ in range(50):
            self.g.now += SETTINGS.lease_s + 1
            drive(batches.expire_due(self.g.db, self.g.blobs, self.g.ids, self.g.now))
            lease = self.g.lease(survivor, MODELS[survivor], may_lease_any=True, idle=True)
            if lease is None and all(
                self.g.batch(OWNER, b)["status"] in FINAL for b in self.inputs
            ):
                break
            if lease is not None and self._prepare(lease, lease["n_lines"]):
                self._commit(survivor, lease)
        self.counts_are_the_accepted_commits()
        for batch_id in self.inputs:
            status = self.g.batch(OWNER, batch_id)["status"]
            assert status in FINAL
            event(f"batch {status}")


BatchMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBatchMachine = BatchMachine.TestCase


class CancelMachine(BatchMachine):
    """The same with frequent cancels, so nodes often learn of one by heartbeat and commit
    partial shards."""

    CANCEL_FROM = 0


CancelMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCancelMachine = CancelMachine.TestCase


def test_machine_reaches_every_outcome() -> None:
    """Not vacuous: plain runs of the same machinery complete, cancel and expire batches."""
    g = Gateway(SETTINGS)
    f = g.upload(OWNER, jsonl(7))
    b = g.create_batch(OWNER, f.body["id"]).body
    g.drain(7)
    assert g.batch(OWNER, b["id"])["status"] == "completed"
