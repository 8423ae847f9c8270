//! Job records and their states.
//!
//! ```text
//! queued ──claim──▶ running ──ok──▶ succeeded
//!    ▲                 │  ├──error, attempts left──▶ failed ──(run_at passes)──▶ running
//!    │                 │  └──error, no attempts left──▶ dead ──retry──▶ queued
//!    └──lease lost / handed back      cancel: queued|failed ▶ cancelled; running ▶ stops at next check
//! ```
//!
//! Every change of state that causes more work (submit, a retry, a requeue) writes the job and
//! pushes its queue task in one transaction.

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    Db, DbError, now_ms,
    queue::{self, Enqueue},
    rfc3339,
    users::{Role, User},
    with_pool, with_tx,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Dead,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
        Status::Dead,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Dead => "dead",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
    /// No more attempts will run (until an operator retries a dead job).
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Cancelled | Status::Dead)
    }
}

/// A job as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub id: String,
    pub user_id: String,
    pub kind: String,
    pub queue: String,
    pub input: String,
    pub priority: i32,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub progress: Option<String>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub worker: Option<String>,
    pub cancel_requested: bool,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub run_at: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

const COLUMNS: &str = "id, user_id, kind, queue, input, priority, status, attempts, max_attempts, \
    progress, result, error, worker, cancel_requested, idempotency_key, request_hash, run_at, \
    created_at, started_at, finished_at, updated_at";

fn parse_json(text: &Option<String>) -> Value {
    text.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

impl Job {
    pub fn status(&self) -> Status {
        Status::parse(&self.status).unwrap_or(Status::Dead)
    }

    /// The job as the API shows it.
    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "kind": self.kind,
            "queue": self.queue,
            "status": self.status,
            "input": parse_json(&Some(self.input.clone())),
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "progress": parse_json(&self.progress),
            "result": parse_json(&self.result),
            "error": self.error,
            "worker": self.worker,
            "cancel_requested": self.cancel_requested,
            "idempotency_key": self.idempotency_key,
            "run_at": rfc3339(self.run_at),
            "created_at": rfc3339(self.created_at),
            "started_at": self.started_at.map(rfc3339),
            "finished_at": self.finished_at.map(rfc3339),
            "updated_at": rfc3339(self.updated_at),
        })
    }
}

/// A submission, already validated.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: String,
    pub queue: &'static str,
    pub input: Value,
    pub priority: i32,
    pub run_at_ms: Option<i64>,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request, to tell a replay from a different request under the same key.
    pub request_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job not found")]
    NotFound,
    #[error("the Idempotency-Key was already used for a different request (job {0})")]
    IdempotencyConflict(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Db(DbError::Sqlx(e))
    }
}

/// Submits one job: the record and its queue task commit together. With an idempotency key,
/// a replay of the same request returns the first job (`false`: nothing new was created).
pub async fn submit(db: &Db, user_id: &str, new: NewJob) -> Result<(Job, bool), JobError> {
    let mut created = submit_many(db, user_id, vec![new]).await?;
    created.pop().ok_or(JobError::NotFound)
}

/// Submits jobs in one transaction (one multi-row insert, one batched queue push).
pub async fn submit_many(
    db: &Db,
    user_id: &str,
    jobs: Vec<NewJob>,
) -> Result<Vec<(Job, bool)>, JobError> {
    let now = now_ms();
    let mut tx = db.begin().await?;
    let mut out = Vec::with_capacity(jobs.len());
    let mut pushes = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(500) {
        let mut rows = Vec::with_capacity(chunk.len());
        for new in chunk {
            rows.push(Job {
                id: uuid::Uuid::now_v7().to_string(),
                user_id: user_id.to_owned(),
                kind: new.kind.clone(),
                queue: new.queue.to_owned(),
                input: new.input.to_string(),
                priority: new.priority,
                status: Status::Queued.as_str().to_owned(),
                attempts: 0,
                max_attempts: new.max_attempts as i32,
                progress: None,
                result: None,
                error: None,
                worker: None,
                cancel_requested: false,
                idempotency_key: new.idempotency_key.clone(),
                request_hash: Some(new.request_hash.clone()),
                run_at: new.run_at_ms.unwrap_or(now),
                created_at: now,
                started_at: None,
                finished_at: None,
                updated_at: now,
            });
        }
        let inserted: Vec<String> = with_tx!(&mut tx, conn => {
            let mut qb = sqlx::QueryBuilder::new(
                "INSERT INTO tally_jobs (id, user_id, kind, queue, input, priority, status, attempts, \
                 max_attempts, idempotency_key, request_hash, run_at, created_at, updated_at) ",
            );
            qb.push_values(&rows, |mut b, j| {
                b.push_bind(&j.id)
                    .push_bind(&j.user_id)
                    .push_bind(&j.kind)
                    .push_bind(&j.queue)
                    .push_bind(&j.input)
                    .push_bind(j.priority)
                    .push_bind(&j.status)
                    .push_bind(0i32)
                    .push_bind(j.max_attempts)
                    .push_bind(&j.idempotency_key)
                    .push_bind(&j.request_hash)
                    .push_bind(j.run_at)
                    .push_bind(j.created_at)
                    .push_bind(j.updated_at);
            });
            qb.push(" ON CONFLICT DO NOTHING RETURNING id");
            qb.build_query_scalar().fetch_all(&mut *conn).await?
        });
        for row in rows {
            if inserted.contains(&row.id) {
                pushes.push(Enqueue {
                    job_id: row.id.clone(),
                    queue: chunk_queue(chunk, &row),
                    priority: row.priority,
                    run_at_ms: row.run_at,
                });
                out.push((row, true));
            } else {
                // Only the idempotency key can collide: return the first job, if it matches.
                let key = row.idempotency_key.clone().unwrap_or_default();
                let sql = "SELECT id, user_id, kind, queue, input, priority, status, attempts, max_attempts, \
                    progress, result, error, worker, cancel_requested, idempotency_key, request_hash, run_at, \
                    created_at, started_at, finished_at, updated_at FROM tally_jobs WHERE user_id = $1 AND idempotency_key = $2";
                let first: Option<Job> = with_tx!(&mut tx, conn => {
                    sqlx::query_as(sql).bind(user_id).bind(&key).fetch_optional(&mut *conn).await?
                });
                let first = first.ok_or_else(|| {
                    DbError::Corrupt(format!(
                        "job insert for key {key:?} conflicted but no job holds it"
                    ))
                })?;
                if first.request_hash != row.request_hash {
                    return Err(JobError::IdempotencyConflict(first.id));
                }
                out.push((first, false));
            }
        }
    }
    queue::push(&mut tx, &pushes).await?;
    tx.commit().await?;
    Ok(out)
}

fn chunk_queue(chunk: &[NewJob], row: &Job) -> &'static str {
    chunk
        .iter()
        .find(|n| n.queue == row.queue)
        .map(|n| n.queue)
        .unwrap_or("system")
}

/// The job, if the caller may see it (its owner, or an admin).
pub async fn get(db: &Db, id: &str, caller: &User) -> Result<Job, JobError> {
    let sql = format!("SELECT {COLUMNS} FROM tally_jobs WHERE id = $1 AND (user_id = $2 OR $3)");
    let job: Option<Job> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(&caller.id)
            .bind(caller.role == Role::Admin)
            .fetch_optional(pool)
            .await?
    });
    job.ok_or(JobError::NotFound)
}

/// Filters for listing a user's jobs, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub kind: Option<String>,
    /// Only jobs older than this id (the previous page's `next_cursor`).
    pub before: Option<String>,
    pub limit: u32,
}

pub async fn list(
    db: &Db,
    user_id: &str,
    f: &ListFilter,
) -> Result<(Vec<Job>, Option<String>), JobError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM tally_jobs WHERE user_id = $1 \
         AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR kind = $3) AND ($4 IS NULL OR id < $4) \
         ORDER BY id DESC LIMIT $5"
    );
    let limit = f.limit.clamp(1, 200) as i64;
    let status = f.status.map(|s| s.as_str().to_owned());
    let mut jobs: Vec<Job> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(&status)
            .bind(&f.kind)
            .bind(&f.before)
            .bind(limit + 1)
            .fetch_all(pool)
            .await?
    });
    let next = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id.clone())
    } else {
        None
    };
    Ok((jobs, next))
}

/// Cancels a job: a queued or failed job becomes `cancelled` at once and never runs; a running
/// job is asked to stop and becomes `cancelled` at its next check.
pub async fn cancel(db: &Db, id: &str, caller: &User) -> Result<Job, JobError> {
    let now = now_ms();
    let sql = format!(
        "UPDATE tally_jobs SET cancel_requested = TRUE, updated_at = $4, \
           finished_at = CASE WHEN status IN ('queued', 'failed') THEN $4 ELSE finished_at END, \
           status = CASE WHEN status IN ('queued', 'failed') THEN 'cancelled' ELSE status END \
         WHERE id = $1 AND (user_id = $2 OR $3) AND status IN ('queued', 'failed', 'running') \
         RETURNING {COLUMNS}"
    );
    let job: Option<Job> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(&caller.id)
            .bind(caller.role == Role::Admin)
            .bind(now)
            .fetch_optional(pool)
            .await?
    });
    match job {
        Some(job) => Ok(job),
        None => {
            let job = get(db, id, caller).await?;
            Err(JobError::Conflict(format!(
                "job is already {}; only queued, failed or running jobs can be cancelled",
                job.status
            )))
        }
    }
}

/// Requeues a dead job with a fresh set of attempts.
pub async fn retry(db: &Db, id: &str, caller: &User) -> Result<Job, JobError> {
    let now = now_ms();
    let sql = format!(
        "UPDATE tally_jobs SET status = 'queued', attempts = 0, cancel_requested = FALSE, result = NULL, \
           progress = NULL, finished_at = NULL, run_at = $4, updated_at = $4 \
         WHERE id = $1 AND (user_id = $2 OR $3) AND status = 'dead' RETURNING {COLUMNS}"
    );
    let mut tx = db.begin().await?;
    let job: Option<Job> = with_tx!(&mut tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(&caller.id)
            .bind(caller.role == Role::Admin)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?
    });
    let Some(job) = job else {
        drop(tx);
        let job = get(db, id, caller).await?;
        return Err(JobError::Conflict(format!(
            "job is {}; only dead jobs can be retried",
            job.status
        )));
    };
    queue::push(&mut tx, &[enqueue_of(&job, now)?]).await?;
    tx.commit().await?;
    Ok(job)
}

fn enqueue_of(job: &Job, run_at_ms: i64) -> Result<Enqueue, DbError> {
    let spec = crate::kinds::lookup(&job.kind).ok_or_else(|| {
        DbError::Corrupt(format!("job {} has unknown kind {:?}", job.id, job.kind))
    })?;
    Ok(Enqueue {
        job_id: job.id.clone(),
        queue: spec.queue,
        priority: job.priority,
        run_at_ms,
    })
}

// ---- the worker's side ----

/// What a worker needs to run one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: String,
    pub kind: String,
    pub input: String,
    pub attempts: i32,
    pub max_attempts: i32,
}

/// Marks the job running on `worker` and counts the attempt. `None` when the job must not run
/// (cancelled, finished, or unknown); a job left `running` by a worker that lost its lease is
/// claimed again.
pub async fn claim(db: &Db, id: &str, worker: &str) -> Result<Option<Claimed>, DbError> {
    let now = now_ms();
    let sql = "UPDATE tally_jobs SET status = 'running', attempts = attempts + 1, worker = $2, \
          started_at = COALESCE(started_at, $3), updated_at = $3 \
        WHERE id = $1 AND status IN ('queued', 'failed', 'running') AND NOT cancel_requested \
        RETURNING id, kind, input, attempts, max_attempts";
    let claimed: Option<Claimed> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(id).bind(worker).bind(now).fetch_optional(pool).await?
    });
    if claimed.is_none() {
        // A cancel that arrived while the job was between attempts or being rescued ends it here.
        let sql = "UPDATE tally_jobs SET status = 'cancelled', finished_at = $2, updated_at = $2 \
            WHERE id = $1 AND cancel_requested AND status IN ('queued', 'failed', 'running')";
        with_pool!(db, pool => sqlx::query(sql).bind(id).bind(now).execute(pool).await?.rows_affected());
    }
    Ok(claimed)
}

/// Stores progress; returns true if the job has been asked to stop.
pub async fn report_progress(
    db: &Db,
    id: &str,
    worker: &str,
    progress: &Value,
) -> Result<bool, DbError> {
    let sql = "UPDATE tally_jobs SET progress = $3, updated_at = $4 WHERE id = $1 AND worker = $2 \
        RETURNING cancel_requested";
    let text = progress.to_string();
    let flag: Option<bool> = with_pool!(db, pool => {
        sqlx::query_scalar(sql).bind(id).bind(worker).bind(&text).bind(now_ms()).fetch_optional(pool).await?
    });
    Ok(flag.unwrap_or(true))
}

/// True if the job has been asked to stop (or is no longer this worker's).
pub async fn cancel_requested(db: &Db, id: &str, worker: &str) -> Result<bool, DbError> {
    let sql = "SELECT cancel_requested FROM tally_jobs WHERE id = $1 AND worker = $2 AND status = 'running'";
    let flag: Option<bool> = with_pool!(db, pool => {
        sqlx::query_scalar(sql).bind(id).bind(worker).fetch_optional(pool).await?
    });
    Ok(flag.unwrap_or(true))
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded(Value),
    /// May be retried if attempts are left.
    Failed(String),
    /// Never worth retrying (the input can never work).
    Fatal(String),
    Cancelled,
}

/// Records an attempt's outcome. A failure with attempts left becomes `failed` with its next
/// attempt time, and the task for that attempt is pushed in the same transaction.
pub async fn finish(
    db: &Db,
    claimed: &Claimed,
    worker: &str,
    outcome: Outcome,
    retry_delay: impl FnOnce(u32) -> std::time::Duration,
) -> Result<Status, DbError> {
    let now = now_ms();
    let (status, result, error, run_at) = match outcome {
        Outcome::Succeeded(v) => (Status::Succeeded, Some(v.to_string()), None, None),
        Outcome::Cancelled => (Status::Cancelled, None, Some("cancelled".to_owned()), None),
        Outcome::Fatal(e) => (Status::Dead, None, Some(e), None),
        Outcome::Failed(e) if claimed.attempts >= claimed.max_attempts => {
            (Status::Dead, None, Some(e), None)
        }
        Outcome::Failed(e) => {
            let delay = retry_delay(claimed.attempts.max(1) as u32);
            (
                Status::Failed,
                None,
                Some(e),
                Some(now + delay.as_millis() as i64),
            )
        }
    };
    let finished = if status.is_terminal() {
        Some(now)
    } else {
        None
    };
    let sql = format!(
        "UPDATE tally_jobs SET status = $3, result = $4, error = $5, finished_at = $6, \
           run_at = COALESCE($7, run_at), updated_at = $8 \
         WHERE id = $1 AND worker = $2 AND status = 'running' RETURNING {COLUMNS}"
    );
    let mut tx = db.begin().await?;
    let job: Option<Job> = with_tx!(&mut tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&claimed.id)
            .bind(worker)
            .bind(status.as_str())
            .bind(&result)
            .bind(&error)
            .bind(finished)
            .bind(run_at)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?
    });
    let Some(job) = job else {
        // Another worker took the job over (this one lost its lease): its outcome stands.
        return Ok(Status::Running);
    };
    if let Some(at) = run_at {
        queue::push(&mut tx, &[enqueue_of(&job, at)?]).await?;
    }
    tx.commit().await?;
    Ok(status)
}

/// Puts a stopping worker's running jobs back in the queue; the interrupted attempt is not
/// counted. Returns their ids.
pub async fn hand_back(db: &Db, worker: &str) -> Result<Vec<String>, DbError> {
    let sql = "UPDATE tally_jobs SET status = 'queued', attempts = attempts - 1, worker = NULL, updated_at = $2 \
        WHERE worker = $1 AND status = 'running' RETURNING id";
    let ids: Vec<String> = with_pool!(db, pool => {
        sqlx::query_scalar(sql).bind(worker).bind(now_ms()).fetch_all(pool).await?
    });
    Ok(ids)
}

/// Counts jobs by status (for the benchmark and health checks).
pub async fn count_by_status(db: &Db, status: Status) -> Result<i64, DbError> {
    let sql = "SELECT COUNT(*) FROM tally_jobs WHERE status = $1";
    let n: i64 = with_pool!(db, pool => sqlx::query_scalar(sql).bind(status.as_str()).fetch_one(pool).await?);
    Ok(n)
}
