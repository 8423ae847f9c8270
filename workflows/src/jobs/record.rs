//! The job record: its states, its columns, how the API shows it, and reading it back.

use serde::Serialize;
use serde_json::{Value, json};

use super::JobError;
use crate::{
    Db, DbError,
    db::Tx,
    rfc3339,
    users::{Role, User},
    with_pool,
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

/// Lists `user_id`'s jobs, or every user's with `None` (an admin's list).
pub async fn list(
    db: &Db,
    user_id: Option<&str>,
    f: &ListFilter,
) -> Result<(Vec<Job>, Option<String>), JobError> {
    // Two statements rather than `($1 IS NULL OR user_id = $1)`, so a user's list keeps its
    // plan on the user's index.
    let owner = if user_id.is_some() {
        "user_id = $1"
    } else {
        "$1 IS NULL"
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM tally_jobs WHERE {owner} \
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

/// Counts jobs by status (for the benchmark and health checks).
pub async fn count_by_status(db: &Db, status: Status) -> Result<i64, DbError> {
    let sql = "SELECT COUNT(*) FROM tally_jobs WHERE status = $1";
    let n: i64 = with_pool!(db, pool => sqlx::query_scalar(sql).bind(status.as_str()).fetch_one(pool).await?);
    Ok(n)
}

/// Whether the API shows what a job cost: one that holds credits, or one of a kind priced by
/// its usage (an agent task's steps hold and settle their own).
fn shows_cost(kind: &str, reservation_id: Option<&str>) -> bool {
    reservation_id.is_some()
        || crate::kinds::lookup(kind).is_some_and(|k| k.price == crate::kinds::PriceRule::Usage)
}

/// What the ledger's audit needs of these jobs (those that exist): whether the API shows their
/// cost, and the reservation their outcome settles.
pub(crate) async fn ledger_records(
    tx: &mut Tx,
    ids: &[&str],
) -> Result<Vec<(String, crate::ledger::reconcile::JobRecord)>, DbError> {
    let rows: Vec<(String, String, Option<String>)> = match tx {
        Tx::Postgres(tx) => {
            sqlx::query_as(
                "SELECT id, kind, reservation_id FROM UNNEST($1::text[]) AS v (vid) \
                 JOIN tally_jobs ON id = vid",
            )
            .bind(ids)
            .fetch_all(&mut **tx)
            .await?
        }
        Tx::Sqlite(tx) => {
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
