-- Users and their hashed API keys.
CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- One row per job (named tally_jobs: apalis-sqlite owns a table "Jobs", and SQLite names ignore case): the record users poll. The apalis task that runs it carries only its id.
CREATE TABLE tally_jobs (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL REFERENCES users (id),
    kind             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    input            TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    progress         TEXT,
    result           TEXT,
    error            TEXT,
    worker           TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT 0,
    idempotency_key  TEXT,
    request_hash     TEXT,
    run_at           BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    updated_at       BIGINT NOT NULL
);

CREATE UNIQUE INDEX jobs_idempotency ON tally_jobs (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_user_id ON tally_jobs (user_id, id DESC);
CREATE INDEX jobs_worker_running ON tally_jobs (worker) WHERE status = 'running';
