//! The queues as an admin sees them, and their pause switch.
//!
//! A paused queue has a row in `tally_queue_pauses`; every worker process reads the set about
//! once a second and pauses its apalis worker for that queue (see `workers::pause`), so a
//! paused queue's jobs wait `queued` while the jobs already running finish.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::{Db, DbError, config::QUEUES, now_ms, with_pool};

/// The queue named `name`, if Tally knows it.
pub fn lookup(name: &str) -> Option<&'static str> {
    QUEUES.iter().copied().find(|q| *q == name)
}

/// One queue now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QueueView {
    pub name: &'static str,
    /// Jobs waiting to run: `queued`, or `failed` awaiting their next attempt (due or not).
    pub depth: i64,
    pub running: i64,
    /// How long the longest-waiting due job has been due (its `run_at` until now), in
    /// milliseconds; `null` when no waiting job is due.
    pub oldest_queued_ms: Option<i64>,
    pub paused: bool,
}

/// Pauses `queue` (already paused: unchanged). `by` is the admin's user id.
pub async fn pause(db: &Db, queue: &str, by: &str) -> Result<(), DbError> {
    let sql = "INSERT INTO tally_queue_pauses (queue, paused_at, paused_by) VALUES ($1, $2, $3) \
               ON CONFLICT (queue) DO NOTHING";
    with_pool!(db, pool => {
        sqlx::query(sql).bind(queue).bind(now_ms()).bind(by).execute(pool).await?;
    });
    Ok(())
}

/// Resumes `queue` (not paused: unchanged).
pub async fn resume(db: &Db, queue: &str) -> Result<(), DbError> {
    let sql = "DELETE FROM tally_queue_pauses WHERE queue = $1";
    with_pool!(db, pool => { sqlx::query(sql).bind(queue).execute(pool).await?; });
    Ok(())
}

/// The queues paused now.
pub async fn paused(db: &Db) -> Result<BTreeSet<String>, DbError> {
    let sql = "SELECT queue FROM tally_queue_pauses";
    let names: Vec<String> = with_pool!(db, pool => sqlx::query_scalar(sql).fetch_all(pool).await?);
    Ok(names.into_iter().collect())
}

/// Every queue Tally knows, in [`QUEUES`] order.
pub async fn overview(db: &Db) -> Result<Vec<QueueView>, DbError> {
    let now = now_ms();
    // Reads the jobs not yet finished: the waiting ones through the queue's own index
    // (`jobs_runnable`), the running ones through theirs.
    let sql = "SELECT queue, \
               SUM(CASE WHEN status IN ('queued', 'failed') THEN 1 ELSE 0 END) AS depth, \
               SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS running, \
               MIN(CASE WHEN status IN ('queued', 'failed') AND run_at <= $1 THEN run_at END) AS oldest \
               FROM tally_jobs WHERE status IN ('queued', 'failed', 'running') GROUP BY queue";
    let rows: Vec<(String, i64, i64, Option<i64>)> =
        with_pool!(db, pool => sqlx::query_as(sql).bind(now).fetch_all(pool).await?);
    let paused = paused(db).await?;
    Ok(QUEUES
        .iter()
        .map(|&name| {
            let row = rows.iter().find(|r| r.0 == name);
            QueueView {
                name,
                depth: row.map_or(0, |r| r.1),
                running: row.map_or(0, |r| r.2),
                oldest_queued_ms: row.and_then(|r| r.3).map(|at| (now - at).max(0)),
                paused: paused.contains(name),
            }
        })
        .collect())
}
