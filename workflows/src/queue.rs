//! The queue task that runs a job: an apalis task whose payload is only the job's id. It is
//! pushed inside the same transaction that writes the job's state, so there is never a job
//! without its task or a task without its job.

use apalis::prelude::TaskBuilder;
use serde::{Deserialize, Serialize};

use crate::{DbError, db::Tx};

/// The payload of every queue task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRef {
    pub job_id: String,
    /// The job's kind, so a worker can start what the kind reads while it claims the job
    /// (absent from tasks written before it was added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One task to push: which job, on which queue, how urgent and from when.
#[derive(Debug, Clone)]
pub struct Enqueue {
    pub job_id: String,
    pub kind: String,
    pub queue: &'static str,
    pub priority: i32,
    /// Earliest start, milliseconds since the epoch. apalis stores whole seconds: a time in the
    /// future is rounded up so a task never starts early; a due one is rounded down so it
    /// starts at once.
    pub run_at_ms: i64,
}

/// Attempts apalis itself may make at one task. Tally counts a job's attempts on the job; this
/// only covers a task whose handler hit an infrastructure error (the database went away).
const TASK_MAX_ATTEMPTS: usize = 10;

/// The task's payload: the job reference as JSON.
fn payload(e: &Enqueue) -> Result<Vec<u8>, DbError> {
    serde_json::to_vec(&JobRef {
        job_id: e.job_id.clone(),
        kind: Some(e.kind.clone()),
    })
    .map_err(|err| DbError::Queue(err.to_string()))
}

/// The task's start in apalis' whole seconds.
fn run_at_secs(e: &Enqueue) -> u64 {
    let ms = e.run_at_ms.max(0) as u64;
    if e.run_at_ms > crate::now_ms() {
        ms.div_ceil(1000)
    } else {
        ms / 1000
    }
}

fn build(e: &Enqueue) -> Result<apalis::prelude::Task<Vec<u8>>, DbError> {
    Ok(TaskBuilder::new(payload(e)?)
        .priority(e.priority.max(0) as usize)
        .max_attempts(TASK_MAX_ATTEMPTS)
        .run_at_timestamp(run_at_secs(e))
        .build())
}

/// Postgres: the columns of apalis' task rows for `items`, as arrays, so the statement that
/// writes their jobs inserts them too (see [`pg_insert_tasks`]).
#[derive(Debug, Default)]
pub(crate) struct PgTaskRows {
    pub job_ids: Vec<String>,
    /// apalis' task ids (ULIDs, as apalis makes them).
    pub ids: Vec<String>,
    pub queues: Vec<&'static str>,
    pub payloads: Vec<Vec<u8>>,
    pub run_at_secs: Vec<i64>,
    pub priorities: Vec<i32>,
}

impl PgTaskRows {
    pub(crate) fn of(items: &[Enqueue]) -> Result<Self, DbError> {
        let mut rows = PgTaskRows::default();
        for e in items {
            rows.job_ids.push(e.job_id.clone());
            rows.ids.push(ulid::Ulid::generate().to_string());
            rows.queues.push(e.queue);
            rows.payloads.push(payload(e)?);
            rows.run_at_secs.push(run_at_secs(e) as i64);
            rows.priorities.push(e.priority.max(0));
        }
        Ok(rows)
    }
}

/// A writable CTE over `j` (the ids of the jobs the statement inserted) that inserts the tasks
/// of those jobs, as `apalis_postgres::queries::push_tasks` would (its trigger notifies idle
/// workers). The rows come from [`PgTaskRows`], bound from `$first` on in field order.
pub(crate) fn pg_insert_tasks(first: usize) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, \
         priority, metadata, idempotency_key) \
         SELECT t.id, t.queue, t.payload, 'Pending', 0, {TASK_MAX_ATTEMPTS}, to_timestamp(t.run_at), \
         t.priority, NULL, NULL \
         FROM UNNEST({}::text[], {}::text[], {}::text[], {}::bytea[], {}::bigint[], {}::int[]) \
         AS t (job_id, id, queue, payload, run_at, priority) WHERE t.job_id IN (SELECT id FROM j)",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
    )
}

/// Pushes tasks inside `tx`, grouped by queue.
pub async fn push(tx: &mut Tx, items: &[Enqueue]) -> Result<(), DbError> {
    let mut queues: Vec<&'static str> = items.iter().map(|e| e.queue).collect();
    queues.sort_unstable();
    queues.dedup();
    for queue in queues {
        let tasks = items
            .iter()
            .filter(|e| e.queue == queue)
            .map(build)
            .collect::<Result<Vec<_>, _>>()?;
        match tx {
            Tx::Postgres(tx) => apalis_postgres::queries::push_tasks(&mut **tx, queue, tasks)
                .await
                .map_err(|e| DbError::Queue(e.to_string()))?,
            Tx::Sqlite(tx) => apalis_sqlite::queries::push_tasks(&mut **tx, queue, &tasks)
                .await
                .map_err(|e| DbError::Queue(e.to_string()))?,
        }
    }
    Ok(())
}

/// Completes queue tasks inside the transaction that records their jobs' outcomes, so a task
/// is done exactly when its attempt's outcome is stored. (Tally acknowledges tasks itself:
/// apalis' own acknowledgement is switched off.) A completed task is deleted: the job's record
/// (`tally_jobs`) keeps the history, and a delete writes no new row version or index entries,
/// where marking it `Done` wrote both and left the queue table growing.
///
/// Only tasks still locked by one of `holders` (this process's apalis workers) are completed: a
/// task that apalis re-enqueued and another process now holds is that process's to complete.
///
/// This is SQLite's; on Postgres the outcome statement does it ([`pg_complete_tasks`]).
pub(crate) async fn sqlite_complete(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    task_ids: &[String],
    holders: &[String],
) -> Result<(), DbError> {
    if task_ids.is_empty() || holders.is_empty() {
        return Ok(());
    }
    let mut qb = sqlx::QueryBuilder::new("DELETE FROM Jobs WHERE id IN (");
    let mut list = qb.separated(", ");
    for id in task_ids {
        list.push_bind(id);
    }
    qb.push(") AND lock_by IN (");
    let mut list = qb.separated(", ");
    for holder in holders {
        list.push_bind(holder);
    }
    qb.push(")");
    qb.build().execute(&mut **tx).await?;
    Ok(())
}

/// Postgres: a writable CTE's body that completes (see [`sqlite_complete`]) the tasks whose ids
/// `ids` (a subquery) gives, if one of the `holders` (an array parameter) still locks them.
pub(crate) fn pg_complete_tasks(holders: &str, ids: &str) -> String {
    format!("DELETE FROM apalis.jobs WHERE lock_by = ANY({holders}) AND id = ANY(ARRAY({ids}))")
}

/// Postgres: deletes the tasks written with jobs that their transaction then refused.
pub(crate) async fn pg_drop(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    task_ids: &[&str],
) -> Result<(), DbError> {
    if !task_ids.is_empty() {
        sqlx::query("DELETE FROM apalis.jobs WHERE id = ANY($1)")
            .bind(task_ids)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Puts a task back for a later try after its handler failed on an infrastructure error.
pub async fn release(db: &crate::Db, task_id: &str, delay_secs: i64) -> Result<(), DbError> {
    match db {
        crate::Db::Postgres(pool) => sqlx::query(
            "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, \
             run_at = NOW() + make_interval(secs => $2) WHERE id = $1",
        )
        .bind(task_id)
        .bind(delay_secs as f64)
        .execute(pool)
        .await?
        .rows_affected(),
        crate::Db::Sqlite(pool) => sqlx::query(
            "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, \
             run_at = strftime('%s', 'now') + $2 WHERE id = $1",
        )
        .bind(task_id)
        .bind(delay_secs)
        .execute(pool)
        .await?
        .rows_affected(),
    };
    Ok(())
}

/// Puts tasks back untouched, to be fetched again after `delay`: their jobs were held back by
/// a per-user limit (see `crate::limits`). apalis counts nothing for them.
pub async fn hold_back(
    db: &crate::Db,
    task_ids: &[String],
    delay: std::time::Duration,
) -> Result<(), DbError> {
    if task_ids.is_empty() {
        return Ok(());
    }
    match db {
        crate::Db::Postgres(pool) => {
            sqlx::query(
                "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, \
                 run_at = NOW() + make_interval(secs => $2) WHERE id = ANY($1)",
            )
            .bind(task_ids)
            .bind(delay.as_secs_f64())
            .execute(pool)
            .await?;
        }
        // apalis-sqlite's run times are whole seconds.
        crate::Db::Sqlite(pool) => {
            let mut qb = sqlx::QueryBuilder::new(
                "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, \
                 run_at = strftime('%s', 'now') + ",
            );
            qb.push_bind(delay.as_secs_f64().ceil() as i64)
                .push(" WHERE id IN (");
            let mut list = qb.separated(", ");
            for id in task_ids {
                list.push_bind(id);
            }
            qb.push(")");
            qb.build().execute(pool).await?;
        }
    }
    Ok(())
}

/// Hands back the tasks a stopping worker still holds, so another process takes them at once
/// instead of after the lease.
pub async fn hand_back(db: &crate::Db, worker_names: &[String]) -> Result<u64, DbError> {
    let mut total = 0;
    for name in worker_names {
        let n = match db {
            crate::Db::Postgres(pool) => sqlx::query(
                "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL \
                 WHERE lock_by = $1 AND status IN ('Queued', 'Running')",
            )
            .bind(name)
            .execute(pool)
            .await?
            .rows_affected(),
            crate::Db::Sqlite(pool) => sqlx::query(
                "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL \
                 WHERE lock_by = $1 AND status IN ('Queued', 'Running')",
            )
            .bind(name)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        total += n;
    }
    Ok(total)
}
