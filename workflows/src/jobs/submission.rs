//! Submission: new job records (each also its queue entry) in one transaction, with the rows
//! their capability stages, and the credits they hold.

use serde_json::Value;

use super::{COLUMNS, Job, JobError, Status};
use crate::{
    Db, DbError,
    db::Tx,
    effects::Rows,
    ledger::{self, Op},
    now_ms, with_tx,
};

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

/// Submits jobs in one transaction (each job's row is also its queue entry). With an
/// idempotency key, a replay of the same request answers with the first job (`false`: nothing
/// new was created). One insert statement per batch on Postgres, per 500 jobs on SQLite.
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
    tx: &mut Tx,
    mut jobs: Vec<NewJob>,
) -> Result<Vec<Result<(Job, bool), JobError>>, DbError> {
    let now = now_ms();
    // The rows each job stages, written only for the jobs inserted.
    let mut staged: Vec<Vec<Rows>> = jobs
        .iter_mut()
        .map(|j| std::mem::take(&mut j.rows))
        .collect();
    let mut out = Vec::with_capacity(jobs.len());
    let mut fresh: Vec<usize> = Vec::new();
    // Postgres binds each column as one array, so a statement takes any batch the callers
    // make; SQLite binds 15 parameters per job, and allows 32,766 in a statement.
    let per_statement = match tx {
        Tx::Postgres(_) => 10_000,
        Tx::Sqlite(_) => 500,
    };
    for chunk in jobs.chunks(per_statement) {
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
            // One statement writes the jobs: each row is also its queue entry, and the
            // statement's trigger wakes the idle workers of their queues. A replayed
            // idempotency key inserts nothing.
            Tx::Postgres(conn) => {
                let sql = "INSERT INTO tally_jobs (id, user_id, kind, queue, input, priority, \
                     status, attempts, max_attempts, idempotency_key, request_hash, run_at, \
                     created_at, updated_at, reservation_id) \
                     SELECT id, user_id, kind, queue, input, priority, 'queued', 0, max_attempts, \
                     idempotency_key, request_hash, run_at, $1, $1, reservation_id FROM \
                     UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[], \
                     $8::int[], $9::text[], $10::text[], $11::bigint[], $12::text[]) AS v (id, \
                     user_id, kind, queue, input, priority, max_attempts, idempotency_key, \
                     request_hash, run_at, reservation_id) \
                     ON CONFLICT DO NOTHING RETURNING id";
                let col = |f: fn(&Job) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
                let opt = |f: fn(&Job) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
                let int = |f: fn(&Job) -> i32| rows.iter().map(f).collect::<Vec<i32>>();
                sqlx::query_scalar(sql)
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
                    .fetch_all(&mut **conn)
                    .await?
            }
            Tx::Sqlite(conn) => {
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
        for row in rows {
            if inserted.contains(&row.id) {
                fresh.push(out.len());
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
    let written = Rows::grouped(fresh.iter().flat_map(|i| std::mem::take(&mut staged[*i])));
    for rows in &written {
        rows.write(tx).await?;
    }
    // Each new job that costs credits holds them now; one its owner cannot cover is not kept.
    let mut holds = Vec::new();
    let mut ops = Vec::new();
    for i in &fresh {
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
    }
    Ok(out)
}
