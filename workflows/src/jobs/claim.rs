//! The worker's side of a job before its outcome: claiming attempts, progress, cancel checks,
//! and handing running jobs back when a worker stops.

use serde_json::Value;

use super::{Status, control::release_holds};
use crate::{Db, DbError, now_ms, with_pool, with_tx};

/// What a worker needs to run one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: String,
    pub user_id: String,
    pub kind: String,
    pub input: String,
    pub attempts: i32,
    pub max_attempts: i32,
}

/// What the claim answers for one job.
#[derive(Debug)]
pub enum Claim {
    /// Marked running on this worker: run the attempt.
    Run(Claimed),
    /// Must not run (cancelled, finished, unknown, or twice in the batch): its task is done.
    Drop,
    /// Over a per-user limit ([`crate::limits`]): left as it was, its attempt not counted; its
    /// task goes back to be fetched later.
    Wait,
}

/// Marks each job running on `worker` and counts the attempt, in one statement. A job left
/// `running` by a worker that lost its lease is claimed again. With `limits` set, a job over
/// one of them waits.
pub async fn claim_many(
    db: &Db,
    worker: &str,
    ids: &[String],
    limits: &crate::limits::Limits,
) -> Result<Vec<Claim>, DbError> {
    let now = now_ms();
    const RETURNING: &str =
        " RETURNING tally_jobs.id, user_id, kind, input, attempts, max_attempts";
    // Per-user limits: counted and claimed under per-user locks (see `crate::limits`).
    let mut held = std::collections::HashSet::new();
    let claimed: Vec<Claimed> = match db {
        _ if limits.is_set() => {
            let (claimed, over) = crate::limits::claim(db, worker, ids, now, limits).await?;
            held = over;
            claimed
        }
        // One prepared statement whatever the batch size; the join on the array of ids keeps
        // the plan on the primary key (a generic plan for `id = ANY($3)` may not).
        Db::Postgres(pool) => {
            let sql = format!(
                "UPDATE tally_jobs SET status = 'running', attempts = attempts + 1, worker = $1, \
                 started_at = COALESCE(started_at, $2), updated_at = $2 \
                 FROM UNNEST($3::text[]) AS c (id) WHERE tally_jobs.id = c.id \
                 AND status IN ('queued', 'failed', 'running') AND NOT cancel_requested{RETURNING}"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(worker)
                .bind(now)
                .bind(ids)
                .fetch_all(pool)
                .await?
        }
        Db::Sqlite(pool) => {
            let mut qb = sqlx::QueryBuilder::new(
                "UPDATE tally_jobs SET status = 'running', attempts = attempts + 1, worker = ",
            );
            qb.push_bind(worker)
                .push(", started_at = COALESCE(started_at, ")
                .push_bind(now)
                .push("), updated_at = ")
                .push_bind(now)
                .push(" WHERE status IN ('queued', 'failed', 'running') AND NOT cancel_requested AND id");
            qb.push(" IN (");
            let mut list = qb.separated(", ");
            for id in ids {
                list.push_bind(id);
            }
            qb.push(")").push(RETURNING);
            qb.build_query_as().fetch_all(pool).await?
        }
    };
    crate::events::publish(claimed.iter().map(|c| c.id.as_str()));
    let mut by_id: std::collections::HashMap<String, Claimed> =
        claimed.into_iter().map(|c| (c.id.clone(), c)).collect();
    let answers: Vec<Option<Claimed>> = ids.iter().map(|id| by_id.remove(id)).collect();
    let refused: Vec<&String> = ids
        .iter()
        .zip(&answers)
        .filter(|(id, a)| a.is_none() && !held.contains(*id))
        .map(|(id, _)| id)
        .collect();
    if !refused.is_empty() {
        // A cancel that arrived while a job was between attempts or being rescued ends it here,
        // and its credits go back.
        let mut tx = db.begin().await?;
        let ended: Vec<String> = with_tx!(&mut tx, conn => {
            let mut qb = sqlx::QueryBuilder::new("UPDATE tally_jobs SET status = 'cancelled', finished_at = ");
            qb.push_bind(now).push(", updated_at = ").push_bind(now).push(
                " WHERE cancel_requested AND status IN ('queued', 'failed', 'running') AND id IN (",
            );
            let mut list = qb.separated(", ");
            for id in &refused {
                list.push_bind(*id);
            }
            qb.push(") RETURNING id");
            qb.build_query_scalar().fetch_all(&mut *conn).await?
        });
        release_holds(&mut tx, &ended, now).await?;
        tx.commit().await?;
        crate::events::publish(ended);
    }
    Ok(ids
        .iter()
        .zip(answers)
        .map(|(id, answer)| match answer {
            Some(c) => Claim::Run(c),
            None if held.contains(id) => Claim::Wait,
            None => Claim::Drop,
        })
        .collect())
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

/// Puts a stopping worker's running jobs back in the queue; the interrupted attempt is not
/// counted. Returns their ids.
pub async fn hand_back(db: &Db, worker: &str) -> Result<Vec<String>, DbError> {
    let sql = "UPDATE tally_jobs SET status = 'queued', attempts = attempts - 1, worker = NULL, updated_at = $2 \
        WHERE worker = $1 AND status = 'running' RETURNING id";
    let ids: Vec<String> = with_pool!(db, pool => {
        sqlx::query_scalar(sql).bind(worker).bind(now_ms()).fetch_all(pool).await?
    });
    crate::events::publish(ids.iter().map(String::as_str));
    Ok(ids)
}
