//! The worker's side of a job before its outcome: claiming attempts, progress, cancel checks,
//! and giving jobs back (a worker that stops, an attempt that could not be recorded).
//!
//! The job row is its queue entry: a worker claims runnable jobs (`queued`, or `failed` with
//! their retry due) straight from `tally_jobs`, highest priority first, then by due time. On
//! Postgres the claim is one statement (`FOR UPDATE SKIP LOCKED`, so claims never wait on each
//! other); on SQLite one `UPDATE`, which a write transaction already makes exclusive.

use serde_json::Value;

use super::Status;
use crate::{Db, DbError, now_ms, with_pool};

/// The Postgres channel idle workers listen on; the payload is a queue's name. New jobs notify
/// it from a trigger; a job queued again (handed back, rescued, retried) from the code.
pub const WAKE_CHANNEL: &str = "tally_queue";

/// What a worker needs to run one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: String,
    pub user_id: String,
    pub kind: String,
    pub input: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub priority: i32,
    pub run_at: i64,
    /// Asked to stop before this attempt began: the attempt ends it at once, cancelled.
    pub cancel_requested: bool,
}

/// The columns a claim returns, as [`Claimed`] reads them.
pub(crate) const CLAIMED: &str = "tally_jobs.id, user_id, kind, input, attempts, max_attempts, priority, tally_jobs.run_at, cancel_requested";

/// What a claim writes on each job it takes (`$1` the worker, `$2` now).
pub(crate) const TAKE: &str = "status = 'running', attempts = attempts + 1, worker = $1, \
    started_at = COALESCE(started_at, $2), updated_at = $2";

/// The runnable jobs of queue `queue` due at `now`, in the order they run, at most `n` of them
/// (each argument the SQL of a parameter): the candidates of a claim. On Postgres, each is
/// locked and jobs another claim holds are skipped.
pub(crate) fn runnable(backend: crate::db::Backend, now: &str, queue: &str, n: &str) -> String {
    let lock = match backend {
        crate::db::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        crate::db::Backend::Sqlite => "",
    };
    format!(
        "SELECT id FROM tally_jobs WHERE queue = {queue} AND status IN ('queued', 'failed') \
         AND run_at <= {now} ORDER BY priority DESC, run_at, id LIMIT {n}{lock}"
    )
}

/// Claims up to `n` runnable jobs of `queue` for `worker`: each is marked running on it and its
/// attempt counted. With `limits` set, a job over one of them stays where it was, due again
/// after [`crate::limits::HOLD_BACK`]. Answers in the order the jobs should start.
pub async fn claim_next(
    db: &Db,
    worker: &str,
    queue: &str,
    n: usize,
    limits: &crate::limits::Limits,
) -> Result<Vec<Claimed>, DbError> {
    let now = now_ms();
    let mut claimed: Vec<Claimed> = if limits.is_set() {
        crate::limits::claim(db, worker, queue, n, now, limits).await?
    } else {
        // Postgres reads the candidates once into an array and updates them through the
        // primary key: `id IN (subquery)` got a hash join over a scan of every job, finished
        // ones too.
        let picked = runnable(db.backend(), "$2", "$3", "$4");
        let sql = match db {
            Db::Postgres(_) => format!(
                "UPDATE tally_jobs SET {TAKE} WHERE id = ANY(ARRAY({picked})) RETURNING {CLAIMED}"
            ),
            Db::Sqlite(_) => {
                format!("UPDATE tally_jobs SET {TAKE} WHERE id IN ({picked}) RETURNING {CLAIMED}")
            }
        };
        with_pool!(db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(worker)
                .bind(now)
                .bind(queue)
                .bind(n as i64)
                .fetch_all(pool)
                .await?
        })
    };
    claimed.sort_by(|a, b| (b.priority, a.run_at, &a.id).cmp(&(a.priority, b.run_at, &b.id)));
    crate::events::publish(claimed.iter().map(|c| c.id.as_str()));
    Ok(claimed)
}

/// Notifies each distinct queue of `$2` on channel `$1`.
const WAKE: &str =
    "SELECT pg_notify($1, q) FROM (SELECT DISTINCT q FROM UNNEST($2::text[]) AS q) AS d";

/// Wakes the idle workers of `queues` (Postgres; SQLite's workers watch for commits).
pub(crate) async fn wake(db: &Db, queues: &[String]) -> Result<(), DbError> {
    if let Db::Postgres(pool) = db
        && !queues.is_empty()
    {
        sqlx::query(WAKE)
            .bind(WAKE_CHANNEL)
            .bind(queues)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// [`wake`] inside a transaction: the notification goes out when it commits.
pub(crate) async fn wake_in(tx: &mut crate::db::Tx, queues: &[&str]) -> Result<(), DbError> {
    if let crate::db::Tx::Postgres(conn) = tx
        && !queues.is_empty()
    {
        sqlx::query(WAKE)
            .bind(WAKE_CHANNEL)
            .bind(queues)
            .execute(&mut **conn)
            .await?;
    }
    Ok(())
}

/// Stores progress; returns true if the job has been asked to stop.
pub async fn report_progress(
    db: &Db,
    id: &str,
    worker: &str,
    progress: &Value,
) -> Result<bool, DbError> {
    // The status is a parameter, not a literal: a literal lets the planner pick the partial
    // index of running jobs per worker, which reads every job the worker runs.
    let sql = "UPDATE tally_jobs SET progress = $3, updated_at = $4 \
        WHERE id = $1 AND worker = $2 AND status = $5 \
        RETURNING cancel_requested";
    let text = progress.to_string();
    let flag: Option<bool> = with_pool!(db, pool => {
        sqlx::query_scalar(sql).bind(id).bind(worker).bind(&text).bind(now_ms())
            .bind(Status::Running.as_str()).fetch_optional(pool).await?
    });
    if flag.is_some() {
        crate::events::publish([id]);
    }
    Ok(flag.unwrap_or(true))
}

/// True if the job has been asked to stop (or is no longer this worker's).
pub async fn cancel_requested(db: &Db, id: &str, worker: &str) -> Result<bool, DbError> {
    // By primary key alone: a plan through the index of running jobs per worker reads every
    // job the worker runs (thousands under load) for each check.
    let sql = "SELECT cancel_requested, worker, status FROM tally_jobs WHERE id = $1";
    let row: Option<(bool, Option<String>, String)> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(id).fetch_optional(pool).await?
    });
    Ok(match row {
        Some((cancel, Some(w), status)) if w == worker && status == "running" => cancel,
        _ => true,
    })
}

/// Puts a stopping worker's running jobs back in the queue (those it claimed and had not
/// started too); the interrupted attempts are not counted. Returns their ids.
pub async fn hand_back(db: &Db, worker: &str) -> Result<Vec<String>, DbError> {
    let sql = "UPDATE tally_jobs SET status = 'queued', attempts = attempts - 1, worker = NULL, updated_at = $2 \
        WHERE worker = $1 AND status = 'running' RETURNING id, queue";
    let rows: Vec<(String, String)> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(worker).bind(now_ms()).fetch_all(pool).await?
    });
    let (ids, queues): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
    wake(db, &queues).await?;
    crate::events::publish(ids.iter().map(String::as_str));
    Ok(ids)
}

/// Puts one running job back after its attempt could not be recorded (the database went
/// away): queued again, due in `delay`, the attempt not counted. A job no longer `worker`'s is
/// left alone.
pub async fn release(
    db: &Db,
    id: &str,
    worker: &str,
    delay: std::time::Duration,
) -> Result<(), DbError> {
    let now = now_ms();
    let sql = "UPDATE tally_jobs SET status = 'queued', attempts = attempts - 1, worker = NULL, \
        run_at = $3, updated_at = $4 WHERE id = $1 AND worker = $2 AND status = 'running'";
    with_pool!(db, pool => {
        sqlx::query(sql).bind(id).bind(worker).bind(now + delay.as_millis() as i64).bind(now)
            .execute(pool).await?;
    });
    crate::events::publish([id]);
    Ok(())
}
