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
    Db, DbError,
    effects::{Effects, Rows},
    ledger::{self, LedgerError, Op, RESERVATION_COLUMNS},
    now_ms,
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
    /// The ledger reservation holding this job's credits, when it costs any.
    pub reservation_id: Option<String>,
}

pub(crate) const COLUMNS: &str = "id, user_id, kind, queue, input, priority, status, attempts, max_attempts, \
    progress, result, error, worker, cancel_requested, idempotency_key, request_hash, run_at, \
    created_at, started_at, finished_at, updated_at, reservation_id";

fn parse_json(text: &Option<String>) -> Value {
    text.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

impl Job {
    /// The queue task that runs this job now (or at its `run_at`), on `queue`.
    fn enqueue(&self, queue: &'static str) -> Enqueue {
        Enqueue {
            job_id: self.id.clone(),
            kind: self.kind.clone(),
            queue,
            priority: self.priority,
            run_at_ms: self.run_at,
        }
    }

    pub fn status(&self) -> Status {
        Status::parse(&self.status).unwrap_or(Status::Dead)
    }

    /// Whether the API shows what this job cost.
    pub fn shows_cost(&self) -> bool {
        shows_cost(&self.kind, self.reservation_id.as_deref())
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
    /// The job's id, when the caller chose it (a follow-up's derives from its cause); a new
    /// UUIDv7 otherwise.
    pub id: Option<String>,
    pub user_id: String,
    pub kind: String,
    pub queue: &'static str,
    pub input: Value,
    pub priority: i32,
    pub run_at_ms: Option<i64>,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request, to tell a replay from a different request under the same key.
    pub request_hash: String,
    /// Credits reserved at submission and settled on success (0: free).
    pub price: i64,
    /// Rows of a capability's tables written with the job, only if the job is kept (a chat
    /// question): see [`crate::effects`].
    pub rows: Vec<Rows>,
}

impl NewJob {
    /// A job of `kind` for `user_id`, on the kind's queue, at priority 0, due now, free, with
    /// one attempt and no idempotency key; set what differs.
    pub fn new(user_id: &str, kind: &'static crate::kinds::Kind, input: Value) -> NewJob {
        NewJob {
            id: None,
            user_id: user_id.to_owned(),
            kind: kind.name.to_owned(),
            queue: kind.queue,
            request_hash: String::new(),
            input,
            priority: 0,
            run_at_ms: None,
            max_attempts: 1,
            idempotency_key: None,
            price: 0,
            rows: Vec::new(),
        }
    }
}

/// The id of the job that `cause` (a job id) enqueues as its follow-up `name`: the same for
/// every delivery of the cause's outcome, so it is enqueued once. A UUID (version 8) that
/// starts with the cause's UUIDv7 timestamp, so it sorts near its cause.
pub fn derived_id(cause: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(cause.as_bytes())
        .chain_update([0u8])
        .chain_update(name.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    if let Ok(parent) = uuid::Uuid::parse_str(cause) {
        bytes[..6].copy_from_slice(&parent.as_bytes()[..6]);
    }
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job not found")]
    NotFound,
    #[error("the Idempotency-Key was already used for a different request (job {0})")]
    IdempotencyConflict(String),
    #[error("{0}")]
    Conflict(String),
    #[error("insufficient credits: the job costs {needed} and {available} are available")]
    InsufficientCredits { needed: i64, available: i64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl JobError {
    /// The same refusal again, for a second caller (a database error is not copied: it
    /// would not say anything true about the other request).
    fn same(&self) -> JobError {
        match self {
            JobError::InsufficientCredits { needed, available } => JobError::InsufficientCredits {
                needed: *needed,
                available: *available,
            },
            other => JobError::Conflict(other.to_string()),
        }
    }
}

impl From<LedgerError> for JobError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InsufficientCredits {
                balance, needed, ..
            } => JobError::InsufficientCredits {
                needed,
                available: balance,
            },
            LedgerError::Db(e) => JobError::Db(e),
            other => JobError::Conflict(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Db(DbError::Sqlx(e))
    }
}

/// Submits jobs in one transaction: each record and its queue task commit together. With an
/// idempotency key, a replay of the same request answers with the first job (`false`: nothing
/// new was created). One multi-row insert and one batched queue push per 500 jobs.
/// Each job gets its own answer: an idempotency conflict refuses that job, not the others.
pub async fn submit_many(
    db: &Db,
    jobs: Vec<NewJob>,
) -> Result<Vec<Result<(Job, bool), JobError>>, DbError> {
    let mut tx = db.begin().await?;
    let out = submit_in(&mut tx, jobs).await?;
    tx.commit().await?;
    crate::events::publish(out.iter().filter_map(|a| match a {
        Ok((job, true)) => Some(job.id.as_str()),
        _ => None,
    }));
    Ok(out)
}

/// [`submit_many`] inside the caller's transaction, so other writes (a chat message) commit
/// with the jobs or not at all.
pub async fn submit_in(
    tx: &mut crate::db::Tx,
    mut jobs: Vec<NewJob>,
) -> Result<Vec<Result<(Job, bool), JobError>>, DbError> {
    let now = now_ms();
    // The rows each job stages, written only for the jobs inserted.
    let mut staged: Vec<Vec<Rows>> = jobs
        .iter_mut()
        .map(|j| std::mem::take(&mut j.rows))
        .collect();
    let mut out = Vec::with_capacity(jobs.len());
    let mut fresh: Vec<(usize, &'static str)> = Vec::new();
    // Postgres: the task written with each job, by job id.
    let mut task_ids: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for chunk in jobs.chunks(500) {
        let rows: Vec<Job> = chunk
            .iter()
            .map(|new| {
                let id = new
                    .id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                Job {
                    reservation_id: (new.price > 0).then(|| format!("job:{id}")),
                    id,
                    user_id: new.user_id.clone(),
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
                }
            })
            .collect();
        let inserted: Vec<String> = match &mut *tx {
            // One statement writes the jobs and their queue tasks (a task only for a job it
            // inserted: a replayed idempotency key inserts nothing).
            crate::db::Tx::Postgres(conn) => {
                let enqueues: Vec<Enqueue> = rows
                    .iter()
                    .zip(chunk)
                    .map(|(j, new)| j.enqueue(new.queue))
                    .collect();
                let t = queue::PgTaskRows::of(&enqueues)?;
                let sql = format!(
                    "WITH j AS (INSERT INTO tally_jobs (id, user_id, kind, queue, input, priority, \
                     status, attempts, max_attempts, idempotency_key, request_hash, run_at, \
                     created_at, updated_at, reservation_id) \
                     SELECT id, user_id, kind, queue, input, priority, 'queued', 0, max_attempts, \
                     idempotency_key, request_hash, run_at, $1, $1, reservation_id FROM \
                     UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[], \
                     $8::int[], $9::text[], $10::text[], $11::bigint[], $12::text[]) AS v (id, \
                     user_id, kind, queue, input, priority, max_attempts, idempotency_key, \
                     request_hash, run_at, reservation_id) \
                     ON CONFLICT DO NOTHING RETURNING id), t AS ({}) SELECT id FROM j",
                    queue::pg_insert_tasks(13),
                );
                let col = |f: fn(&Job) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
                let opt = |f: fn(&Job) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
                let int = |f: fn(&Job) -> i32| rows.iter().map(f).collect::<Vec<i32>>();
                let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(now)
                    .bind(col(|j| &j.id))
                    .bind(col(|j| &j.user_id))
                    .bind(col(|j| &j.kind))
                    .bind(col(|j| &j.queue))
                    .bind(col(|j| &j.input))
                    .bind(int(|j| j.priority))
                    .bind(int(|j| j.max_attempts))
                    .bind(opt(|j| j.idempotency_key.as_deref()))
                    .bind(opt(|j| j.request_hash.as_deref()))
                    .bind(rows.iter().map(|j| j.run_at).collect::<Vec<i64>>())
                    .bind(opt(|j| j.reservation_id.as_deref()))
                    .bind(&t.job_ids)
                    .bind(&t.ids)
                    .bind(&t.queues)
                    .bind(&t.payloads)
                    .bind(&t.run_at_secs)
                    .bind(&t.priorities)
                    .fetch_all(&mut **conn)
                    .await?;
                task_ids.extend(t.job_ids.into_iter().zip(t.ids));
                ids
            }
            crate::db::Tx::Sqlite(conn) => {
                let mut qb = sqlx::QueryBuilder::new(
                    "INSERT INTO tally_jobs (id, user_id, kind, queue, input, priority, status, attempts, \
                     max_attempts, idempotency_key, request_hash, run_at, created_at, updated_at, reservation_id) ",
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
                        .push_bind(j.updated_at)
                        .push_bind(&j.reservation_id);
                });
                qb.push(" ON CONFLICT DO NOTHING RETURNING id");
                qb.build_query_scalar().fetch_all(&mut **conn).await?
            }
        };
        for (row, new) in rows.into_iter().zip(chunk) {
            if inserted.contains(&row.id) {
                fresh.push((out.len(), new.queue));
                out.push(Ok((row, true)));
                continue;
            }
            // The idempotency key or a chosen id (a follow-up's) collided: answer with the
            // first job, if it is the same request.
            let key = row.idempotency_key.clone().unwrap_or_default();
            let sql = format!(
                "SELECT {COLUMNS} FROM tally_jobs WHERE id = $3 \
                 UNION ALL SELECT {COLUMNS} FROM tally_jobs WHERE user_id = $1 AND idempotency_key = $2"
            );
            let first: Option<Job> = with_tx!(&mut *tx, conn => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(&row.user_id).bind(&key).bind(&row.id).fetch_optional(&mut *conn).await?
            });
            let first = first.ok_or_else(|| {
                DbError::Corrupt(format!(
                    "job insert for key {key:?} conflicted but no job holds it"
                ))
            })?;
            if first.request_hash == row.request_hash {
                out.push(Ok((first, false)));
            } else {
                out.push(Err(JobError::IdempotencyConflict(first.id)));
            }
        }
    }
    // The rows the new jobs stage, before the ledger locks accounts (the global lock order).
    let written = Rows::grouped(
        fresh
            .iter()
            .flat_map(|(i, _)| std::mem::take(&mut staged[*i])),
    );
    for rows in &written {
        rows.write(tx).await?;
    }
    // Each new job that costs credits holds them now; one its owner cannot cover is not kept.
    let mut holds = Vec::new();
    let mut ops = Vec::new();
    for (i, _) in &fresh {
        if let Ok((job, _)) = &out[*i]
            && let Some(rid) = &job.reservation_id
        {
            let price = jobs[*i].price;
            holds.push(*i);
            ops.push(Op::Reserve {
                // The reservation id derives from the job just inserted.
                first: true,
                id: rid.clone(),
                user_id: job.user_id.clone(),
                amount: price,
                expires_at: None,
                job_id: Some(job.id.clone()),
            });
        }
    }
    let answers = ledger::execute(tx, &ops, now).await?;
    // Refused jobs, with why (as the text of the error their submission gets).
    let mut refused: Vec<(String, JobError)> = Vec::new();
    for (i, answer) in holds.into_iter().zip(answers) {
        if let Err(e) = answer {
            let err = JobError::from(e);
            if let Ok((job, _)) = &out[i] {
                refused.push((job.id.clone(), err.same()));
            }
            out[i] = Err(err);
        }
    }
    if !refused.is_empty() {
        // A replay in the same batch of a job that was just refused is refused the same way.
        for answer in out.iter_mut() {
            if let Ok((job, false)) = answer
                && let Some((_, why)) = refused.iter().find(|(id, _)| *id == job.id)
            {
                *answer = Err(why.same());
            }
        }
        with_tx!(&mut *tx, conn => {
            let mut qb = sqlx::QueryBuilder::new("DELETE FROM tally_jobs WHERE id IN (");
            let mut list = qb.separated(", ");
            for (id, _) in &refused {
                list.push_bind(id);
            }
            qb.push(")");
            qb.build().execute(&mut *conn).await?;
        });
        let ids: Vec<&str> = refused.iter().map(|(id, _)| id.as_str()).collect();
        for rows in &written {
            rows.forget(tx, &ids).await?;
        }
        // On Postgres their queue tasks were written with them: they go too.
        let tasks: Vec<&str> = refused
            .iter()
            .filter_map(|(id, _)| task_ids.get(id).map(String::as_str))
            .collect();
        if let crate::db::Tx::Postgres(conn) = &mut *tx {
            queue::pg_drop(conn, &tasks).await?;
        }
    }
    // SQLite: the tasks of the jobs kept (Postgres wrote them with the jobs).
    if matches!(tx, crate::db::Tx::Sqlite(_)) {
        let pushes: Vec<Enqueue> = fresh
            .iter()
            .filter_map(|(i, queue)| match &out[*i] {
                Ok((job, true)) => Some(job.enqueue(queue)),
                _ => None,
            })
            .collect();
        queue::push(tx, &pushes).await?;
    }
    Ok(out)
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
    match job {
        Some(job) => {
            if job.status() == Status::Cancelled {
                release_holds(&mut tx, std::slice::from_ref(&job.id), now).await?;
            }
            tx.commit().await?;
            crate::events::publish([job.id.as_str()]);
            Ok(job)
        }
        None => {
            drop(tx);
            let job = get(db, id, caller).await?;
            Err(JobError::Conflict(format!(
                "job is already {}; only queued, failed or running jobs can be cancelled",
                job.status
            )))
        }
    }
}

/// Returns the credits held for jobs that ended without success.
async fn release_holds(
    tx: &mut crate::db::Tx,
    job_ids: &[String],
    now: i64,
) -> Result<(), DbError> {
    let ops: Vec<Op> = pending_holds(tx, job_ids)
        .await?
        .into_iter()
        .map(|id| Op::Release {
            id,
            expired: false,
            owner: None,
        })
        .collect();
    for answer in ledger::execute(tx, &ops, now).await? {
        if let Err(e) = answer {
            tracing::error!(error = %e, "a job ended but its credits could not be released");
        }
    }
    Ok(())
}

/// Every credit hold still pending for these jobs: the job's own, and any its steps made (an
/// agent task's) that a run which died mid-step left behind.
async fn pending_holds(tx: &mut crate::db::Tx, job_ids: &[String]) -> Result<Vec<String>, DbError> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = with_tx!(tx, conn => {
        let mut qb = sqlx::QueryBuilder::new(
            "SELECT id FROM ledger_reservations WHERE state = 'pending' AND job_id IN (",
        );
        let mut list = qb.separated(", ");
        for id in job_ids {
            list.push_bind(id);
        }
        qb.push(") ORDER BY id");
        qb.build_query_scalar().fetch_all(&mut *conn).await?
    });
    Ok(ids)
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
    let Some(mut job) = job else {
        drop(tx);
        let job = get(db, id, caller).await?;
        return Err(JobError::Conflict(format!(
            "job is {}; only dead jobs can be retried",
            job.status
        )));
    };
    // The job's credits were released when it died: the new run holds them again.
    if job.reservation_id.is_some() {
        let sql =
            "SELECT COUNT(*), COALESCE(MAX(amount), 0) FROM ledger_reservations WHERE job_id = $1";
        let (runs, price): (i64, i64) = with_tx!(&mut tx, conn => {
            sqlx::query_as(sql).bind(&job.id).fetch_one(&mut *conn).await?
        });
        let rid = format!("job:{}:run-{}", job.id, runs + 1);
        let op = Op::Reserve {
            first: false,
            id: rid.clone(),
            user_id: job.user_id.clone(),
            amount: price,
            expires_at: None,
            job_id: Some(job.id.clone()),
        };
        if price > 0 {
            if let Some(Err(e)) = ledger::execute(&mut tx, &[op], now).await?.pop() {
                return Err(e.into());
            }
            with_tx!(&mut tx, conn => {
                sqlx::query("UPDATE tally_jobs SET reservation_id = $2 WHERE id = $1")
                    .bind(&job.id).bind(&rid).execute(&mut *conn).await?;
            });
            job.reservation_id = Some(rid);
        }
    }
    queue::push(
        &mut tx,
        &[enqueue_of(&job.id, &job.kind, job.priority, now)?],
    )
    .await?;
    tx.commit().await?;
    crate::events::publish([job.id.as_str()]);
    Ok(job)
}

/// The queue task for a job's next attempt (its queue follows from its kind).
fn enqueue_of(id: &str, kind: &str, priority: i32, run_at_ms: i64) -> Result<Enqueue, DbError> {
    let spec = crate::kinds::lookup(kind)
        .ok_or_else(|| DbError::Corrupt(format!("job {id} has unknown kind {kind:?}")))?;
    Ok(Enqueue {
        job_id: id.to_owned(),
        kind: kind.to_owned(),
        queue: spec.queue,
        priority,
        run_at_ms,
    })
}

// ---- the worker's side ----

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

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded(Value),
    /// Succeeded and used this many credits (settled up to what the job reserved).
    Charged(Value, i64),
    /// May be retried if attempts are left.
    Failed(String),
    /// Never worth retrying (the input can never work).
    Fatal(String),
    Cancelled,
}

/// What an attempt's outcome does to its job.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: String,
    pub status: Status,
    pub result: Option<String>,
    pub error: Option<String>,
    /// For `failed`: when the next attempt may start.
    pub retry_at: Option<i64>,
    /// For `succeeded`: the credits the attempt used, when they differ from the reservation.
    pub charge: Option<i64>,
    /// What the job's success also writes (a model's reply, follow-up jobs, ledger
    /// operations): applied in the transaction that stores the outcome and settles the job's
    /// credits, and only if the job is then `succeeded`: a reply exists exactly when it was
    /// paid for.
    pub on_success: Effects,
    /// The same, applied only if the job is then `dead` (a saga step's compensation).
    pub on_dead: Effects,
}

/// Decides the job's next state: a failure with attempts left becomes `failed` with the time
/// of its next attempt (`retry_delay` gets the number of failed attempts so far).
pub fn plan(
    claimed: &Claimed,
    outcome: Outcome,
    retry_delay: impl FnOnce(u32) -> std::time::Duration,
) -> Finish {
    let mut charge = None;
    let (status, result, error, retry_at) = match outcome {
        Outcome::Succeeded(v) => (Status::Succeeded, Some(v.to_string()), None, None),
        Outcome::Charged(v, credits) => {
            charge = Some(credits.max(0));
            (Status::Succeeded, Some(v.to_string()), None, None)
        }
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
                Some(now_ms() + delay.as_millis() as i64),
            )
        }
    };
    Finish {
        id: claimed.id.clone(),
        status,
        result,
        error,
        retry_at,
        charge,
        on_success: Effects::default(),
        on_dead: Effects::default(),
    }
}

/// One handled queue task: its id, and the outcome of the attempt it ran, if it ran one.
#[derive(Debug, Clone)]
pub struct Completion {
    pub task_id: String,
    pub finish: Option<Finish>,
}

/// An outcome the statement applied: the job as it now is, and on Postgres its reservation,
/// locked by the same statement when the job succeeded.
#[derive(sqlx::FromRow)]
struct Applied {
    id: String,
    kind: String,
    priority: i32,
    run_at: i64,
    status: String,
    reservation_id: Option<String>,
    #[sqlx(default)]
    r_user_id: Option<String>,
    #[sqlx(default)]
    r_amount: Option<i64>,
    #[sqlx(default)]
    r_settled: Option<i64>,
    #[sqlx(default)]
    r_state: Option<String>,
    #[sqlx(default)]
    r_job_id: Option<String>,
    #[sqlx(default)]
    r_expires_at: Option<i64>,
    #[sqlx(default)]
    r_created_at: Option<i64>,
    #[sqlx(default)]
    r_closed_at: Option<i64>,
}

impl Applied {
    fn locked_reservation(&self) -> Option<ledger::Reservation> {
        Some(ledger::Reservation {
            id: self.reservation_id.clone()?,
            user_id: self.r_user_id.clone()?,
            amount: self.r_amount?,
            settled: self.r_settled,
            state: self.r_state.clone()?,
            job_id: self.r_job_id.clone(),
            expires_at: self.r_expires_at,
            created_at: self.r_created_at?,
            closed_at: self.r_closed_at,
        })
    }
}

/// Records many attempts' outcomes in one statement and one transaction, together with the
/// tasks of the retries they schedule and the completion of the tasks that ran them. A job this
/// worker no longer holds (it lost its lease and another worker took over) is left alone: its
/// answer is `Running`. A completion without an attempt answers `None`.
pub async fn finish_many(
    db: &Db,
    worker: &str,
    holders: &[String],
    mut items: Vec<Completion>,
    settle_pause: std::time::Duration,
) -> Result<Vec<Option<Status>>, DbError> {
    let now = now_ms();
    // Each outcome's effects, by job id, applied below if the outcome is.
    let mut effects: std::collections::HashMap<String, (Effects, Effects)> = items
        .iter_mut()
        .filter_map(|c| c.finish.as_mut())
        .map(|f| {
            let on = (
                std::mem::take(&mut f.on_success),
                std::mem::take(&mut f.on_dead),
            );
            (f.id.clone(), on)
        })
        .collect();
    let finishes: Vec<&Finish> = items.iter().filter_map(|c| c.finish.as_ref()).collect();
    let mut tx = db.begin().await?;
    // A failure of a job whose cancel was asked for ends it: no retry. `v` holds each outcome;
    // `now` and `worker` are the statement's parameters (placeholders differ per dialect).
    let set = |now: &str, worker: &str| {
        format!(
            "UPDATE tally_jobs SET \
             status = CASE WHEN tally_jobs.cancel_requested AND v.vstatus = 'failed' THEN 'cancelled' ELSE v.vstatus END, \
             finished_at = CASE WHEN tally_jobs.cancel_requested AND v.vstatus = 'failed' THEN {now} ELSE v.vfinished END, \
             result = v.vresult, error = v.verror, run_at = COALESCE(v.vrun_at, tally_jobs.run_at), updated_at = {now} \
             FROM v WHERE tally_jobs.id = v.vid AND tally_jobs.status = 'running' AND tally_jobs.worker = {worker} \
             RETURNING tally_jobs.id, kind, priority, tally_jobs.run_at, status, reservation_id"
        )
    };
    let finished = |f: &Finish| {
        if f.status.is_terminal() {
            Some(now)
        } else {
            None
        }
    };
    let updated: Vec<Applied> = match &mut tx {
        crate::db::Tx::Postgres(tx) => {
            let task_of: std::collections::HashMap<&str, &str> = items
                .iter()
                .filter_map(|c| {
                    c.finish
                        .as_ref()
                        .map(|f| (f.id.as_str(), c.task_id.as_str()))
                })
                .collect();
            let bare: Vec<&str> = items
                .iter()
                .filter(|c| c.finish.is_none())
                .map(|c| c.task_id.as_str())
                .collect();
            // One prepared statement whatever the batch size: the outcomes travel as arrays.
            // It also completes the tasks (`d`) and locks the reservations of the jobs that
            // succeeded for the settlement that follows (`r`).
            // Rows of other tables are picked by `= ANY(ARRAY(...))`, read once: an
            // `IN (SELECT ...)` lets a generic plan scan the table and probe per row.
            let sql = format!(
                "WITH v (vid, vstatus, vresult, verror, vfinished, vrun_at, vtask) AS (SELECT * FROM \
                 UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], \
                 $9::text[])), u AS ({}, v.vtask), \
                 d AS ({}), \
                 r AS (SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE id = ANY(ARRAY(\
                 SELECT reservation_id FROM u WHERE status = 'succeeded')) ORDER BY id FOR UPDATE) \
                 SELECT u.id, u.kind, u.priority, u.run_at, u.status, u.reservation_id, \
                 r.user_id AS r_user_id, r.amount AS r_amount, r.settled AS r_settled, \
                 r.state AS r_state, r.job_id AS r_job_id, r.expires_at AS r_expires_at, \
                 r.created_at AS r_created_at, r.closed_at AS r_closed_at \
                 FROM u LEFT JOIN r ON r.id = u.reservation_id",
                set("$1", "$2"),
                queue::pg_complete_tasks(
                    "$10",
                    "SELECT vtask FROM u UNION ALL SELECT * FROM UNNEST($11::text[])"
                ),
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(now)
                .bind(worker)
                .bind(finishes.iter().map(|f| f.id.as_str()).collect::<Vec<_>>())
                .bind(
                    finishes
                        .iter()
                        .map(|f| f.status.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    finishes
                        .iter()
                        .map(|f| f.result.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    finishes
                        .iter()
                        .map(|f| f.error.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(finishes.iter().map(|f| finished(f)).collect::<Vec<_>>())
                .bind(finishes.iter().map(|f| f.retry_at).collect::<Vec<_>>())
                .bind(
                    finishes
                        .iter()
                        .map(|f| task_of.get(f.id.as_str()).copied().unwrap_or_default())
                        .collect::<Vec<_>>(),
                )
                .bind(holders)
                .bind(&bare)
                .fetch_all(&mut **tx)
                .await?
        }
        _ if finishes.is_empty() => Vec::new(),
        crate::db::Tx::Sqlite(tx) => {
            let mut qb = sqlx::QueryBuilder::new(
                "WITH v (vid, vstatus, vresult, verror, vfinished, vrun_at) AS (",
            );
            qb.push_values(&finishes, |mut b, f| {
                b.push_bind(&f.id)
                    .push_bind(f.status.as_str())
                    .push_bind(&f.result)
                    .push_bind(&f.error)
                    .push_bind(finished(f))
                    .push_bind(f.retry_at);
            });
            qb.push(") ");
            // Each marker in the clause becomes a bound parameter.
            let clause = set("\u{1}", "\u{2}");
            let mut rest = clause.as_str();
            while let Some(pos) = rest.find(['\u{1}', '\u{2}']) {
                qb.push(&rest[..pos]);
                if rest[pos..].starts_with('\u{2}') {
                    qb.push_bind(worker);
                } else {
                    qb.push_bind(now);
                }
                rest = &rest[pos + 1..];
            }
            qb.push(rest);
            qb.build_query_as().fetch_all(&mut **tx).await?
        }
    };
    let mut pushes = Vec::new();
    let mut applied = std::collections::HashMap::new();
    let mut money = Vec::new();
    // The effects of the outcomes applied: rows, follow-up jobs (with their derived ids) and
    // ledger operations.
    let mut rows = Vec::new();
    let mut follow_ups = Vec::new();
    let mut effect_ops = Vec::new();
    let mut ended = Vec::new();
    let charges: std::collections::HashMap<&str, Option<i64>> =
        finishes.iter().map(|f| (f.id.as_str(), f.charge)).collect();
    // Reservations the statement locked (Postgres): the ledger does not read them again.
    let mut locked = Vec::new();
    for row in updated {
        if let Some(r) = row.locked_reservation() {
            locked.push(r);
        }
        let Applied {
            id,
            kind,
            priority,
            run_at,
            status,
            reservation_id: reservation,
            ..
        } = row;
        let status = Status::parse(&status)
            .ok_or_else(|| DbError::Corrupt(format!("job {id} has status {status:?}")))?;
        if status == Status::Failed {
            pushes.push(enqueue_of(&id, &kind, priority, run_at)?);
        }
        // The job's credits move in the same transaction as its final state: the settlement's
        // ids derive from the job, so a second delivery or a rerun after a crash moves nothing.
        if let Some(rid) = reservation
            && status == Status::Succeeded
        {
            money.push(Op::Settle {
                id: rid,
                amount: charges.get(id.as_str()).copied().flatten(),
                owner: None,
                clamp: true,
            });
        }
        if matches!(status, Status::Dead | Status::Cancelled) {
            ended.push(id.clone());
        }
        let chosen = match (status, effects.remove(&id)) {
            (Status::Succeeded, Some((on_success, _))) => Some(on_success),
            (Status::Dead, Some((_, on_dead))) => Some(on_dead),
            _ => None,
        };
        if let Some(e) = chosen {
            rows.extend(e.rows);
            effect_ops.extend(e.ledger);
            follow_ups.extend(e.jobs.into_iter().map(|f| {
                let fid = derived_id(&id, &f.name);
                NewJob {
                    request_hash: fid.clone(),
                    id: Some(fid),
                    price: 0,
                    ..f.job
                }
            }));
        }
        applied.insert(id, status);
    }

    // A job that ended without success gives back every hold it still has.
    for hold in pending_holds(&mut tx, &ended).await? {
        money.push(Op::Release {
            id: hold,
            expired: false,
            owner: None,
        });
    }
    // SQLite: what the Postgres statement also did: a task is done when its attempt's outcome
    // was stored (or it ran no attempt).
    if let crate::db::Tx::Sqlite(conn) = &mut tx {
        let task_ids: Vec<String> = items
            .iter()
            .filter(|c| {
                c.finish
                    .as_ref()
                    .is_none_or(|f| applied.contains_key(&f.id))
            })
            .map(|c| c.task_id.clone())
            .collect();
        queue::sqlite_complete(conn, &task_ids, holders).await?;
    }
    // The outcomes' rows, then their follow-up jobs, before the ledger locks accounts.
    for group in Rows::grouped(rows) {
        group.write(&mut tx).await?;
    }
    let mut changed: Vec<String> = applied.keys().cloned().collect();
    if !follow_ups.is_empty() {
        for answer in submit_in(&mut tx, follow_ups).await? {
            if let Ok((job, true)) = &answer {
                changed.push(job.id.clone());
            }
            if let Err(e) = answer {
                // Only an idempotency conflict can refuse a free job.
                tracing::error!(error = %e, "a follow-up job was not enqueued");
            }
        }
    }
    let settlements = money.len();
    money.extend(effect_ops);
    let answers = ledger::execute_locked(&mut tx, &money, now, locked).await?;
    for (i, answer) in answers.into_iter().enumerate() {
        if let Err(e) = answer {
            if i < settlements {
                tracing::error!(error = %e, "a job ended but its credits could not be settled or released");
            } else {
                tracing::error!(error = %e, "a ledger operation an outcome staged was refused");
            }
        }
    }
    queue::push(&mut tx, &pushes).await?;
    if !money.is_empty() && !settle_pause.is_zero() {
        tracing::warn!(
            jobs = money.len(),
            "settlement written, pausing {settle_pause:?} before commit (worker.settle_pause_ms)"
        );
        tokio::time::sleep(settle_pause).await;
    }
    tx.commit().await?;
    crate::events::publish(changed);
    Ok(items
        .iter()
        .map(|c| {
            c.finish
                .as_ref()
                .map(|f| applied.get(&f.id).copied().unwrap_or(Status::Running))
        })
        .collect())
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

/// Counts jobs by status (for the benchmark and health checks).
pub async fn count_by_status(db: &Db, status: Status) -> Result<i64, DbError> {
    let sql = "SELECT COUNT(*) FROM tally_jobs WHERE status = $1";
    let n: i64 = with_pool!(db, pool => sqlx::query_scalar(sql).bind(status.as_str()).fetch_one(pool).await?);
    Ok(n)
}

/// Whether the API shows what a job cost: one that holds credits, or an agent task (its steps
/// hold and settle their own).
fn shows_cost(kind: &str, reservation_id: Option<&str>) -> bool {
    reservation_id.is_some() || kind == crate::agents::KIND.name
}

/// What the ledger's audit needs of these jobs (those that exist): whether the API shows their
/// cost, and the reservation their outcome settles.
pub(crate) async fn ledger_records(
    tx: &mut crate::db::Tx,
    ids: &[&str],
) -> Result<Vec<(String, crate::ledger::reconcile::JobRecord)>, DbError> {
    let rows: Vec<(String, String, Option<String>)> = match tx {
        crate::db::Tx::Postgres(tx) => {
            sqlx::query_as(
                "SELECT id, kind, reservation_id FROM UNNEST($1::text[]) AS v (vid) \
                 JOIN tally_jobs ON id = vid",
            )
            .bind(ids)
            .fetch_all(&mut **tx)
            .await?
        }
        crate::db::Tx::Sqlite(tx) => {
            let head = "SELECT id, kind, reservation_id FROM tally_jobs WHERE id IN (";
            crate::db::sqlite_select_in(tx, head, ids).await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|(id, kind, reservation_id)| {
            let shows_cost = shows_cost(&kind, reservation_id.as_deref());
            let record = crate::ledger::reconcile::JobRecord {
                shows_cost,
                reservation_id,
            };
            (id, record)
        })
        .collect())
}
