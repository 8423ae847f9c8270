-- Cron: one row per tick of a schedule that made a job. The primary key is the claim: however
-- many processes run a schedule, one inserts the tick's row, and only it submits the job, in the
-- same transaction.
CREATE TABLE tally_cron_ticks (
    name        TEXT NOT NULL,
    -- The tick's time (ms since the epoch, UTC).
    tick_at     BIGINT NOT NULL,
    job_id      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (name, tick_at)
);

-- A job's tick, for its view.
CREATE UNIQUE INDEX cron_ticks_by_job ON tally_cron_ticks (job_id);

-- The platform's own user: an admin that owns the jobs cron makes. Its key hash is no SHA-256
-- of any key, so nobody can log in as it.
INSERT INTO users (id, email, role, key_hash, created_at)
VALUES ('00000000-0000-0000-0000-000000000000', 'platform@tally.local', 'admin', 'none: the platform has no key', 0);
