-- Live events across processes: every statement that inserts or updates job records notifies
-- channel tally_jobs with the changed jobs' ids, comma-separated, in chunks of about 6,900 bytes
-- (a chunk ends with the id that crosses that mark, and ids are shorter than 1,000 bytes, so a
-- payload stays under the 8,000 Postgres allows): a batch of 2,048 outcomes sends about eleven.
-- Notifications are delivered when the writing transaction commits, and not at all if it
-- rolls back. Statement-level triggers with transition tables: one call per statement, not
-- per row. An id too long to fit a notification (none is: ids are UUIDs) would be left to the
-- listeners' fallback poll rather than fail the statement.
CREATE FUNCTION tally_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids TEXT;
BEGIN
    FOR ids IN
        SELECT string_agg(id, ',')
        FROM (
            SELECT id, SUM(octet_length(id) + 1) OVER (ROWS UNBOUNDED PRECEDING) / 6900 AS chunk
            FROM changed
            WHERE octet_length(id) < 1000
        ) AS c
        GROUP BY chunk
    LOOP
        PERFORM pg_notify('tally_jobs', ids);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER tally_jobs_inserted AFTER INSERT ON tally_jobs
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION tally_jobs_notify();

CREATE TRIGGER tally_jobs_updated AFTER UPDATE ON tally_jobs
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION tally_jobs_notify();
