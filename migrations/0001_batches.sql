-- Files + Batch API (issue 16): files in R2, these rows in D1. See docs/batch.md.
-- Times are epoch seconds: INTEGER for the OpenAI-visible timestamps, REAL for lease expiry.

CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY,            -- "file-<24 hex>"
  owner TEXT NOT NULL,            -- hex(sha256(client key))[:16]
  purpose TEXT NOT NULL,
  filename TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER,
  status TEXT NOT NULL,
  blob TEXT,                      -- uploaded: the raw multipart body in R2 (NULL once purged)
  data_offset INTEGER NOT NULL DEFAULT 0,
  parts TEXT,                     -- virtual (batch output): JSON [[blob, offset, length], ...]
  deleted_at INTEGER
);
CREATE INDEX IF NOT EXISTS files_owner_created ON files (owner, created_at, id);
CREATE INDEX IF NOT EXISTS files_deleted ON files (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS batches (
  id TEXT PRIMARY KEY,            -- "batch_<24 hex>"
  owner TEXT NOT NULL,
  role TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  input_file_id TEXT NOT NULL,
  completion_window TEXT NOT NULL,
  status TEXT NOT NULL,
  model TEXT,
  created_at INTEGER NOT NULL,
  in_progress_at INTEGER,
  expires_at INTEGER NOT NULL,
  finalizing_at INTEGER,
  completed_at INTEGER,
  failed_at INTEGER,
  expired_at INTEGER,
  cancelling_at INTEGER,
  cancelled_at INTEGER,
  total INTEGER NOT NULL DEFAULT 0,
  completed INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0,
  output_file_id TEXT,
  error_file_id TEXT,
  errors TEXT,                    -- JSON list of {code, line, message, param}
  metadata TEXT,                  -- JSON object
  usage TEXT,                     -- JSON {input_tokens, output_tokens, total_tokens}
  output_expires_s INTEGER        -- output_expires_after.seconds, for the output files
);
CREATE INDEX IF NOT EXISTS batches_owner_created ON batches (owner, created_at, id);
CREATE INDEX IF NOT EXISTS batches_status_expiry ON batches (status, expires_at);
CREATE INDEX IF NOT EXISTS batches_input ON batches (input_file_id, status);

CREATE TABLE IF NOT EXISTS work (
  id TEXT PRIMARY KEY,            -- "wrk_<24 hex>"
  batch_id TEXT NOT NULL,
  kind TEXT NOT NULL,             -- 'validate' | 'lines'
  seq INTEGER NOT NULL,           -- 0 for validate, 1.. for the shards in file order
  state TEXT NOT NULL,            -- 'pending' | 'leased' | 'done' | 'cancelled'
  offset INTEGER NOT NULL,        -- byte range of the file's data
  length INTEGER NOT NULL,
  first_line INTEGER NOT NULL,    -- 0-based index of its first request in the batch
  n_lines INTEGER NOT NULL,
  lease_id TEXT,
  token TEXT,
  node INTEGER,
  leased_at REAL,
  expires_at REAL,
  attempts INTEGER NOT NULL DEFAULT 0,
  completed INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0,
  out_blob TEXT,
  out_bytes INTEGER NOT NULL DEFAULT 0,
  err_blob TEXT,
  err_bytes INTEGER NOT NULL DEFAULT 0,
  usage TEXT
);
CREATE INDEX IF NOT EXISTS work_state_expiry ON work (state, expires_at);
CREATE INDEX IF NOT EXISTS work_batch ON work (batch_id, state, seq);
CREATE UNIQUE INDEX IF NOT EXISTS work_lease ON work (lease_id) WHERE lease_id IS NOT NULL;
