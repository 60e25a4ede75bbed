-- Storage hygiene (sweep.py; docs/batch.md, docs/fine-tuning-jobs.md): once a batch or a
-- fine-tuning job is final, the cron deletes the R2 objects under its prefix that no row names
-- (parts and uploads of leases that lost). Additive only, and idempotent like 0001/0002.

-- One row per kind ('batch', 'ft'): the sweep takes final batches / jobs in (ended_at, id)
-- order and each once. (ended_at, id) is the last one swept whole; `head_id` the one under
-- way, its listing to resume after the key `resume_after` (NULL: none under way).
CREATE TABLE IF NOT EXISTS sweep_marks (
  kind TEXT PRIMARY KEY CHECK (kind IN ('batch', 'ft')),
  ended_at INTEGER NOT NULL,
  id TEXT NOT NULL,
  head_id TEXT,
  resume_after TEXT
);

-- A batch's end time: the one final timestamp it has (NULL while it runs).
CREATE INDEX IF NOT EXISTS batches_ended
  ON batches (coalesce(completed_at, failed_at, expired_at, cancelled_at), id);
CREATE INDEX IF NOT EXISTS ft_jobs_finished ON ft_jobs (finished_at, id)
  WHERE finished_at IS NOT NULL;
-- A job's adapter by job (the sweep's referenced keys).
CREATE INDEX IF NOT EXISTS ft_adapters_job ON ft_adapters (job_id);
