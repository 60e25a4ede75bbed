-- Fine-tuning jobs (issue 19): OpenAI's fine_tuning.jobs over D1, trained by nodes that lease
-- one `work` row of kind 'train' per job (work.batch_id holds the job id; 0001's `work` table has
-- no CHECK on kind, so nothing there changes). See docs/fine-tuning-jobs.md.

CREATE TABLE IF NOT EXISTS ft_jobs (
  id TEXT PRIMARY KEY,                 -- "ftjob-<24 hex>"
  owner TEXT NOT NULL,                 -- hex(sha256(client key))[:16]
  model TEXT NOT NULL,                 -- the base model
  training_file TEXT NOT NULL,
  validation_file TEXT,
  -- stored: validating_files (no node has accepted the files yet), running (files accepted:
  -- shown as `queued` while no live lease holds the work), succeeded, failed, cancelled
  status TEXT NOT NULL CHECK (status IN
    ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
  hyperparameters TEXT NOT NULL,       -- JSON {batch_size, learning_rate_multiplier, n_epochs}
  method TEXT NOT NULL,                -- JSON {type: "supervised", supervised: {hyperparameters}}
  suffix TEXT,
  seed INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  finished_at INTEGER,
  fine_tuned_model TEXT,
  trained_tokens INTEGER,
  error TEXT,                          -- JSON {code, message, param}
  result_files TEXT NOT NULL DEFAULT '[]',
  metadata TEXT,                       -- JSON object
  node_events INTEGER NOT NULL DEFAULT 0 -- events its nodes stored (capped; no count(*) per call)
);
CREATE INDEX IF NOT EXISTS ft_jobs_owner_created ON ft_jobs (owner, created_at, id);
CREATE INDEX IF NOT EXISTS ft_jobs_status ON ft_jobs (status, created_at);
CREATE INDEX IF NOT EXISTS ft_jobs_training_file ON ft_jobs (training_file, status);
CREATE INDEX IF NOT EXISTS ft_jobs_validation_file ON ft_jobs (validation_file, status)
  WHERE validation_file IS NOT NULL;

CREATE TABLE IF NOT EXISTS ft_events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, -- insertion order: events are listed by it
  id TEXT NOT NULL UNIQUE,             -- "ftevent-<24 hex>"
  job_id TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  level TEXT NOT NULL CHECK (level IN ('info', 'warn', 'error')),
  message TEXT NOT NULL,
  type TEXT NOT NULL CHECK (type IN ('message', 'metrics')),
  data TEXT                            -- JSON
);
CREATE INDEX IF NOT EXISTS ft_events_job ON ft_events (job_id, seq);

CREATE TABLE IF NOT EXISTS ft_checkpoints (
  id TEXT PRIMARY KEY,                 -- "ftckpt-<24 hex>"
  job_id TEXT NOT NULL,
  step_number INTEGER NOT NULL,
  metrics TEXT NOT NULL,               -- JSON {step, train_loss, ...}
  fine_tuned_model_checkpoint TEXT NOT NULL,
  blob TEXT NOT NULL,                  -- R2 key of the checkpoint tar (lease-specific)
  bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ft_checkpoints_step ON ft_checkpoints (job_id, step_number);

CREATE TABLE IF NOT EXISTS ft_adapters (
  name TEXT PRIMARY KEY,               -- the fine_tuned_model, "ft:<base>:heady:<suffix>:<hex>"
  owner TEXT NOT NULL,
  job_id TEXT NOT NULL,
  base TEXT NOT NULL,
  slug TEXT NOT NULL UNIQUE,           -- heady_shared.ftnames.slug(name): the LoRA name on nodes
  blob TEXT NOT NULL,                  -- R2 key of the adapter tar
  bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ft_adapters_owner ON ft_adapters (owner, created_at);

-- A lease picks train work by kind among the open rows.
CREATE INDEX IF NOT EXISTS work_kind_state ON work (kind, state, expires_at);
