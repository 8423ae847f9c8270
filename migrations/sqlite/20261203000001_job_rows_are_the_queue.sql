-- The job row is its queue entry: a worker claims runnable jobs straight from tally_jobs, in
-- priority order, then by due time. apalis' task table is no longer written. Jobs a worker
-- may take: queued, or failed and awaiting their next attempt.
CREATE INDEX jobs_runnable ON tally_jobs (queue, priority DESC, run_at, id)
    WHERE status IN ('queued', 'failed');

-- Worker processes and their heartbeats: a job running under a process whose heartbeat is
-- older than the lease is queued again by any other process (the rescue).
CREATE TABLE tally_workers (
    name        TEXT PRIMARY KEY,
    queues      TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL
);
