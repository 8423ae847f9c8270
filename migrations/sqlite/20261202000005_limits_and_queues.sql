-- Queues an admin has paused: a row while the queue is paused. Every process reads it (workers
-- about once a second) and stops fetching from a paused queue.
CREATE TABLE tally_queue_pauses (
    queue      TEXT PRIMARY KEY,
    paused_at  BIGINT NOT NULL,
    paused_by  TEXT
);

-- The running jobs of a user, by kind: what a claim counts when per-user limits are set.
CREATE INDEX jobs_running_by_user ON tally_jobs (user_id, kind) WHERE status = 'running';
