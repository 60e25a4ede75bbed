"""The fine-tuning lease proof: hypothesis drives train work through any interleaving of leases,
heartbeats, clock jumps (lease lapse), events, checkpoint uploads, adapter uploads and commits
(success, failure, stop-for-cancel), node death, client cancels, reads, the cron and forged
tokens, with two trainer nodes over two jobs, on the real SQL (sqlite3) and a dict R2.

A plain-Python model says what must happen; after every step the stores must agree with it:
a call is accepted exactly when its lease is current (the job's latest lease, not yet ended),
so a stale lease's checkpoint, adapter or commit is refused; a job succeeds at most once and a
cancelled job never does; the node's events are stored in order, each exactly once, never by a
refused call; a new lease resumes from the job's latest accepted checkpoint; exactly the
accepted checkpoints are models of the job's key, whatever the job's status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import finetune
from finetune import FtSettings
from tests.support.ftkit import BASE, FtGateway
from tests.support.stores import drive

OWNER = "0123456789abcdef"
NODES = (1, 2)
FT = FtSettings(lease_s=120, heartbeat_s=30, max_attempts=4)
ACTIVE = ("validating_files", "running")
RARE = 4  # a job-ending rule goes through when its chance (0..5) is at least this


@dataclass
class JobModel:
    status: str = "validating_files"
    work: str = "pending"  # pending | leased | done | cancelled
    holder: str | None = None  # the latest lease id
    expires: float = 0.0
    attempts: int = 0
    events: list[str] = field(default_factory=list)  # the node's messages, accepted
    ckpts: dict[int, bytes] = field(default_factory=dict)
    successes: int = 0


class TrainMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.g = FtGateway(FT)
        self.jobs: dict[str, JobModel] = {}
        self.held: dict[int, list[dict]] = {n: [] for n in NODES}
        self.dead: set[int] = set()
        self.counter = 0

    @initialize(n_jobs=st.integers(1, 2))
    def create(self, n_jobs: int) -> None:
        for _ in range(n_jobs):
            fid = self.g.training_file(OWNER, n=4)
            r = self.g.create_job(OWNER, {"model": BASE, "training_file": fid})
            assert r.status == 200, r.body
            self.jobs[r.body["id"]] = JobModel()
            self.g.now += 1

    # ------------------------------------------------------------------ model helpers

    def _current(self, lease: dict) -> bool:
        m = self.jobs[lease["job_id"]]
        return m.holder == lease["id"] and m.work == "leased"

    def _settle(self, m: JobModel) -> None:
        """What a read or the cron does to a job (finetune.settle)."""
        lapsed = m.work == "leased" and m.expires < self.g.now
        if m.status in ACTIVE and lapsed and m.attempts >= FT.max_attempts:
            m.status, m.work = "failed", "cancelled"
        elif m.status not in ACTIVE and (lapsed or m.work == "pending"):
            m.work = "cancelled"

    def _leasable(self) -> set[str]:
        return {
            j
            for j, m in self.jobs.items()
            if m.status in ACTIVE
            and m.attempts < FT.max_attempts
            and (m.work == "pending" or (m.work == "leased" and m.expires < self.g.now))
        }

    def _pick(self, pick: int) -> tuple[int, dict]:
        held = [(n, le) for n in NODES if n not in self.dead for le in self.held[n]]
        return held[pick % len(held)]

    def _holding(self) -> bool:
        return any(self.held[n] for n in NODES if n not in self.dead)

    # -------------------------------------------------------------------------- rules

    @precondition(lambda self: len(self.dead) < len(NODES))
    @rule(node=st.sampled_from(NODES))
    def lease(self, node: int) -> None:
        if node in self.dead:
            return
        leasable = self._leasable()
        lease = self.g.train_lease(node)
        if lease is None:
            assert not leasable
            return
        assert lease["job_id"] in leasable
        m = self.jobs[lease["job_id"]]
        latest = max(m.ckpts) if m.ckpts else None
        resume = lease["resume_from"]
        assert (resume and resume["step_number"]) == latest
        if latest is not None:
            event("a lease resumes from a checkpoint")
            assert self.g.read_checkpoint(lease) == m.ckpts[latest]
        m.holder, m.work = lease["id"], "leased"
        m.expires, m.attempts = self.g.now + FT.lease_s, m.attempts + 1
        self.held[node].append(lease)

    @precondition(lambda self: self._holding())
    @rule(pick=st.integers(0, 10))
    def heartbeat(self, pick: int) -> None:
        _, lease = self._pick(pick)
        m = self.jobs[lease["job_id"]]
        r = self.g.beat(lease)
        if self._current(lease):
            assert r.status == 200, r.body
            assert r.body["cancel"] == (m.status not in ACTIVE)
            if r.body["cancel"]:
                event("a heartbeat tells a node its job was cancelled")
            m.expires = self.g.now + FT.lease_s
        else:
            assert r.status == 409, r.body

    @rule(seconds=st.sampled_from([10, 60, 121, 400]))
    def clock(self, seconds: int) -> None:
        self.g.now += seconds

    @precondition(lambda self: self._holding())
    @rule(pick=st.integers(0, 10), n=st.integers(1, 3), metrics=st.booleans())
    def events(self, pick: int, n: int, metrics: bool) -> None:
        _, lease = self._pick(pick)
        m = self.jobs[lease["job_id"]]
        texts = [f"n:{self.counter + i}" for i in range(n)]
        self.counter += n
        kind = "metrics" if metrics else "message"
        r = self.g.send_events(lease, [{"message": t, "type": kind} for t in texts])
        if self._current(lease):
            assert r.body == {"accepted": n}, r.body
            m.events += texts
            if metrics and m.status == "validating_files":
                m.status = "running"
        else:
            assert r.status == 409, r.body

    @precondition(lambda self: self._holding())
    @rule(pick=st.integers(0, 10), step=st.integers(1, 30))
    def checkpoint(self, pick: int, step: int) -> None:
        _, lease = self._pick(pick)
        m = self.jobs[lease["job_id"]]
        data = f"{lease['id']}@{step}#{self.counter}".encode()
        self.counter += 1
        r = self.g.put_checkpoint(lease, step, data, {"train_loss": 1.0})
        if self._current(lease) and m.status in ACTIVE:
            assert r.status == 200, r.body
            m.ckpts[step] = data
            if m.status == "validating_files":
                m.status = "running"
        else:
            event("a stale or ended lease's checkpoint is refused")
            assert r.status == 409, r.body

    @precondition(lambda self: self._holding())
    @rule(pick=st.integers(0, 10), chance=st.integers(0, 5))
    def succeed(self, pick: int, chance: int) -> None:
        if chance < RARE:  # let most runs train, die and resume for a while first
            return
        _, lease = self._pick(pick)
        m = self.jobs[lease["job_id"]]
        target = self.g.put_adapter(lease, b"adapter:" + lease["id"].encode())
        current, active = self._current(lease), m.status in ACTIVE
        assert isinstance(target, str) == (current and active), target
        r = self.g.commit_train(lease, {"ok": True, "trained_tokens": 100})
        if current and active and isinstance(target, str):
            assert r.status == 200, r.body
            event("a job succeeds")
            m.status, m.work, m.successes = "succeeded", "done", m.successes + 1
        elif current:
            assert r.status in (400, 409), r.body  # no adapter stored, or the job ended
            if r.status == 409:
                m.work = "done"
        else:
            assert r.status == self._retry(lease), r.body

    def _retry(self, lease: dict) -> int:
        """A lease that is not current: 200 again if it committed (a retried commit), else 409."""
        m = self.jobs[lease["job_id"]]
        return 200 if m.holder == lease["id"] and m.work == "done" else 409

    @precondition(lambda self: self._holding())
    @rule(pick=st.integers(0, 10), stop_for_cancel=st.booleans(), chance=st.integers(0, 5))
    def fail(self, pick: int, stop_for_cancel: bool, chance: int) -> None:
        if chance < RARE:
            return
        _, lease = self._pick(pick)
        m = self.jobs[lease["job_id"]]
        if stop_for_cancel:
            body: dict = {"ok": False, "cancelled": True}
        else:
            body = {"ok": False, "error": {"code": "oom", "message": "out of memory"}}
        r = self.g.commit_train(lease, body)
        if not self._current(lease):
            assert r.status == self._retry(lease), r.body
            return
        if stop_for_cancel and m.status != "cancelled":
            assert r.status == 400, r.body
            return
        assert r.status == 200, r.body
        m.work = "done"
        if m.status in ACTIVE:
            m.status = "failed"

    @rule(node=st.sampled_from(NODES))
    def node_dies(self, node: int) -> None:
        if len(self.dead) < len(NODES) - 1:
            self.dead.add(node)

    @rule(index=st.integers(0, 1), chance=st.integers(0, 5))
    def cancel(self, index: int, chance: int) -> None:
        if chance < RARE:
            return
        job_id = list(self.jobs)[index % len(self.jobs)]
        m = self.jobs[job_id]
        r = self.g.cancel_job(OWNER, job_id)
        if m.status in ACTIVE or m.status == "cancelled":
            assert r.status == 200 and r.body["status"] == "cancelled", r.body
            if m.status in ACTIVE:
                m.status = "cancelled"
                if m.work == "pending" or (m.work == "leased" and m.expires < self.g.now):
                    m.work = "cancelled"
        else:
            assert r.status == 409, r.body

    @rule(index=st.integers(0, 1))
    def read(self, index: int) -> None:
        job_id = list(self.jobs)[index % len(self.jobs)]
        self._settle(self.jobs[job_id])
        self.g.job(OWNER, job_id)

    @rule()
    def cron(self) -> None:
        for m in self.jobs.values():
            self._settle(m)
        drive(finetune.settle_due(self.g.db, self.g.now, FT))

    @precondition(lambda self: self._holding())
    @rule(pick=st.integers(0, 10))
    def forged(self, pick: int) -> None:
        _, lease = self._pick(pick)
        fake = lease | {"token": "forged"}
        assert self.g.beat(fake).status == 409
        assert self.g.send_events(fake, [{"message": "forged"}]).status == 409
        assert self.g.put_checkpoint(fake, 1, b"forged").status == 409
        assert self.g.commit_train(fake, {"ok": True, "trained_tokens": 1}).status == 409

    # --------------------------------------------------------------------- invariants

    @invariant()
    def stores_agree_with_the_model(self) -> None:
        for job_id, m in self.jobs.items():
            [row] = self.g.db.rows(
                "SELECT j.status, j.node_events, w.state, w.lease_id FROM ft_jobs j JOIN work w"
                " ON w.batch_id = j.id WHERE j.id = ?",
                [job_id],
            )
            assert row["status"] == m.status, (row, m)
            assert row["state"] == m.work, (row, m)
            if m.holder is not None:
                assert row["lease_id"] == m.holder
            events = self.g.db.rows(
                "SELECT message FROM ft_events WHERE job_id = ? ORDER BY seq", [job_id]
            )
            messages = [e["message"] for e in events]
            assert [t for t in messages if t.startswith("n:")] == m.events
            assert row["node_events"] == len(m.events)
            made = sum(t.startswith("New fine-tuned model created") for t in messages)
            adapters = self.g.db.rows("SELECT name FROM ft_adapters WHERE job_id = ?", [job_id])
            assert made == len(adapters) == m.successes <= 1
            assert m.status == "succeeded" or not adapters
            ckpts = self.g.db.rows(
                "SELECT step_number, blob FROM ft_checkpoints WHERE job_id = ?", [job_id]
            )
            stored = {c["step_number"]: self.g.blobs.objects[c["blob"]] for c in ckpts}
            assert stored == m.ckpts

    @invariant()
    def exactly_the_accepted_checkpoints_are_models_of_their_key(self) -> None:
        """Whatever the job's status, each accepted checkpoint routes to the base for its key
        only; a step never accepted is no model."""
        for job_id, m in self.jobs.items():
            name = finetune.ftnames.ft_model_name(BASE, None, job_id.removeprefix("ftjob-"))
            missing = next(s for s in range(1, 40) if s not in m.ckpts)
            for step in [*m.ckpts, missing]:
                ckpt = finetune.ftnames.checkpoint_name(name, step)
                mine = drive(finetune.route_ft_model(self.g.db, OWNER, ckpt))
                if step in m.ckpts:
                    assert mine == finetune.FtRoute(ckpt, BASE, finetune.ftnames.slug(ckpt))
                    theirs = drive(finetune.route_ft_model(self.g.db, "f" * 16, ckpt))
                    assert theirs.status == 404
                else:
                    assert mine.status == 404


TrainMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestTrainMachine = TrainMachine.TestCase
