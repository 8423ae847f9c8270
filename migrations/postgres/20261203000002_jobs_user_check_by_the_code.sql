-- A job's user is checked by the code that submits it (the authenticated caller, or the
-- platform's user for cron), and users are never deleted: the foreign key from tally_jobs to
-- users only cost every submission a lookup and a key-share lock of the user's row per job
-- (about 30% of a batch insert's time on the server, measured with EXPLAIN ANALYZE), and
-- made concurrent submissions of one user share that lock. A user deletion, should one ever
-- come, must decide what becomes of their jobs. (SQLite keeps its key: dropping one there
-- means rebuilding the table, and SQLite has one writer anyway.)
ALTER TABLE tally_jobs DROP CONSTRAINT tally_jobs_user_id_fkey;
