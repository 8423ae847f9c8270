//! Outcomes: how an attempt ended, and storing many at once with the effects they stage, the
//! credits they settle and the retries they schedule, in one transaction.

use serde_json::Value;

use super::{Claimed, NewJob, Status, derived_id, submit_in};
use crate::{
    Db, DbError,
    db::Tx,
    effects::{Effects, Rows},
    ledger::{self, Op},
    now_ms,
};

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
    /// The attempt this outcome is of (the job's `attempts` when it was claimed): an outcome
    /// applies only to the attempt that made it, never to a later claim of the same job by the
    /// same process (after a rescue took the job from it and it claimed the job again).
    pub attempt: i32,
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
        attempt: claimed.attempts,
        status,
        result,
        error,
        retry_at,
        charge,
        on_success: Effects::default(),
        on_dead: Effects::default(),
    }
}

/// An outcome the statement applied: the job as it now is, and on Postgres its reservation,
/// locked by the same statement when the job succeeded.
#[derive(sqlx::FromRow)]
struct Applied {
    id: String,
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

/// Records many attempts' outcomes in one statement and one transaction. A retry needs no
/// more: a `failed` job is its own queue entry, due at its `run_at`. A job this worker no
/// longer holds in the outcome's attempt (it lost its lease and another worker, or a later
/// claim of its own, took over; or the outcome was already stored) is left alone: its answer
/// is `Running`.
pub async fn finish_many(
    db: &Db,
    worker: &str,
    mut finishes: Vec<Finish>,
    settle_pause: std::time::Duration,
) -> Result<Vec<Status>, DbError> {
    let now = now_ms();
    // Each outcome's effects, by job id, applied below if the outcome is.
    let mut effects: std::collections::HashMap<String, (Effects, Effects)> = finishes
        .iter_mut()
        .map(|f| {
            let on = (
                std::mem::take(&mut f.on_success),
                std::mem::take(&mut f.on_dead),
            );
            (f.id.clone(), on)
        })
        .collect();
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
             AND tally_jobs.attempts = v.vattempt \
             RETURNING tally_jobs.id, status, reservation_id"
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
        _ if finishes.is_empty() => Vec::new(),
        Tx::Postgres(tx) => {
            // One prepared statement whatever the batch size: the outcomes travel as arrays.
            // It also locks the reservations of the jobs that succeeded for the settlement
            // that follows (`r`).
            // Rows of other tables are picked by `= ANY(ARRAY(...))`, read once: an
            // `IN (SELECT ...)` lets a generic plan scan the table and probe per row.
            let sql = format!(
                "WITH v (vid, vstatus, vresult, verror, vfinished, vrun_at, vattempt) AS (SELECT * FROM \
                 UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], \
                 $9::int[])), \
                 u AS ({}), \
                 r AS ({}) \
                 SELECT u.id, u.status, u.reservation_id, \
                 r.user_id AS r_user_id, r.amount AS r_amount, r.settled AS r_settled, \
                 r.state AS r_state, r.job_id AS r_job_id, r.expires_at AS r_expires_at, \
                 r.created_at AS r_created_at, r.closed_at AS r_closed_at \
                 FROM u LEFT JOIN r ON r.id = u.reservation_id",
                set("$1", "$2"),
                ledger::pg_lock_reservations(
                    "SELECT reservation_id FROM u WHERE status = 'succeeded'"
                ),
            );
            // Planned for each batch (a batch is up to hundreds of outcomes): the generic plan
            // of a connection made while the table was new took the worker's running jobs
            // from their index as one row and joined each with every outcome of the batch
            // (2,048 × 512 comparisons, a second per batch, in `tally bench --ai`).
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .persistent(false)
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
                .bind(finishes.iter().map(&finished).collect::<Vec<_>>())
                .bind(finishes.iter().map(|f| f.retry_at).collect::<Vec<_>>())
                .bind(finishes.iter().map(|f| f.attempt).collect::<Vec<_>>())
                .fetch_all(&mut **tx)
                .await?
        }
        Tx::Sqlite(tx) => {
            let mut qb = sqlx::QueryBuilder::new(
                "WITH v (vid, vstatus, vresult, verror, vfinished, vrun_at, vattempt) AS (",
            );
            qb.push_values(&finishes, |mut b, f| {
                b.push_bind(&f.id)
                    .push_bind(f.status.as_str())
                    .push_bind(&f.result)
                    .push_bind(&f.error)
                    .push_bind(finished(f))
                    .push_bind(f.retry_at)
                    .push_bind(f.attempt);
            });
            qb.push(") ");
            crate::db::push_numbered(&mut qb, &set("$1", "$2"), |qb, n| {
                if n == 2 {
                    qb.push_bind(worker);
                } else {
                    qb.push_bind(now);
                }
            });
            qb.build_query_as().fetch_all(&mut **tx).await?
        }
    };
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
            status,
            reservation_id: reservation,
            ..
        } = row;
        let status = Status::parse(&status)
            .ok_or_else(|| DbError::Corrupt(format!("job {id} has status {status:?}")))?;
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
    let holds = ledger::pending_of_jobs(&mut tx, &ended).await?;
    money.extend(holds.into_iter().map(Op::release));
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
    if !money.is_empty() && !settle_pause.is_zero() {
        tracing::warn!(
            jobs = money.len(),
            "settlement written, pausing {settle_pause:?} before commit (worker.settle_pause_ms)"
        );
        tokio::time::sleep(settle_pause).await;
    }
    tx.commit().await?;
    crate::events::publish(changed);
    Ok(finishes
        .iter()
        .map(|f| applied.get(&f.id).copied().unwrap_or(Status::Running))
        .collect())
}
