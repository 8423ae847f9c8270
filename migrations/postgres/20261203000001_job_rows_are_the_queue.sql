-- The job row is its queue entry: a worker claims runnable jobs straight from tally_jobs
-- (`FOR UPDATE SKIP LOCKED`), in priority order, then by due time. apalis' task table is no
-- longer written. Jobs a worker may take: queued, or failed and awaiting their next attempt.
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

-- Idle workers wake on channel tally_queue, whose payload is a queue's name: every statement
-- that inserts runnable jobs notifies each of their queues once. (Statements that make a job
-- runnable again, such as a hand-back, notify from the code.)
CREATE FUNCTION tally_queue_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tally_queue', q.queue)
    FROM (SELECT DISTINCT queue FROM added WHERE status IN ('queued', 'failed')) AS q;
    RETURN NULL;
END
$$;

CREATE TRIGGER tally_jobs_queued AFTER INSERT ON tally_jobs
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION tally_queue_notify();
