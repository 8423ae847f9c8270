//! Leases: a worker process that stops beating loses its running jobs. Each process writes its
//! heartbeat to `tally_workers` every third of the lease ([`beat`]); any process queues again the
//! jobs still `running` under a process whose heartbeat is older than the lease ([`rescue`]),
//! so a process killed in the middle of an attempt delays its jobs by about one lease, and
//! never loses them. The attempt that died stays counted: a job that kills its worker every
//! time ends `dead` after its attempts, not in a loop.

use crate::{Db, DbError, now_ms, with_pool};

/// How long a heartbeat row outlives its process before it is deleted (its jobs were rescued
/// long before).
const FORGET_AFTER_MS: i64 = 24 * 3_600_000;

/// Records that `worker` (serving `queues`) is alive now.
pub async fn beat(db: &Db, worker: &str, queues: &[String]) -> Result<(), DbError> {
    let now = now_ms();
    let sql = "INSERT INTO tally_workers (name, queues, started_at, last_seen) VALUES ($1, $2, $3, $3) \
        ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, queues = excluded.queues";
    with_pool!(db, pool => {
        sqlx::query(sql).bind(worker).bind(queues.join(",")).bind(now).execute(pool).await?;
    });
    Ok(())
}

/// Queues again the jobs running under a process that has not beaten for `lease`, and deletes
/// heartbeats a day stale. Returns the ids of the jobs rescued.
pub async fn rescue(db: &Db, lease: std::time::Duration) -> Result<Vec<String>, DbError> {
    let now = now_ms();
    let alive_since = now - lease.as_millis() as i64;
    // The running jobs, through their index (a handful per process), whose process has no
    // fresh heartbeat; a job claimed by a process that never wrote one (an older release) too.
    let sql = "UPDATE tally_jobs SET status = 'queued', worker = NULL, updated_at = $1 \
        WHERE status = 'running' AND NOT EXISTS (SELECT 1 FROM tally_workers AS w \
        WHERE w.name = tally_jobs.worker AND w.last_seen >= $2) RETURNING id, queue";
    let rows: Vec<(String, String)> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(now).bind(alive_since).fetch_all(pool).await?
    });
    with_pool!(db, pool => {
        sqlx::query("DELETE FROM tally_workers WHERE last_seen < $1")
            .bind(now - FORGET_AFTER_MS.max(lease.as_millis() as i64))
            .execute(pool)
            .await?;
    });
    let (ids, queues): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
    if !ids.is_empty() {
        tracing::warn!(
            jobs = ids.len(),
            "rescued jobs whose worker stopped beating; queued again"
        );
        super::claim::wake(db, &queues).await?;
        crate::events::publish(ids.iter().map(String::as_str));
    }
    Ok(ids)
}

/// Removes a stopping process's heartbeat (after it handed its jobs back).
pub async fn retire(db: &Db, worker: &str) -> Result<(), DbError> {
    with_pool!(db, pool => {
        sqlx::query("DELETE FROM tally_workers WHERE name = $1").bind(worker).execute(pool).await?;
    });
    Ok(())
}
