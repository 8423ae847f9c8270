-- Live events: nothing to store on SQLite. The process that commits a change to a job tells its
-- own event streams (an in-process broadcast); another process's streams see it at their
-- fallback poll. This file keeps the two migration histories in step with Postgres's
-- job_events (its NOTIFY triggers).
SELECT 1;
