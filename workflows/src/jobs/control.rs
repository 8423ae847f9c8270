//! What callers do to a job after submitting it: cancel it, retry it when it is dead.

use super::{COLUMNS, Job, JobError, Status, get};
use crate::{
    Db, DbError,
    db::Tx,
    ledger::{self, Op},
    now_ms,
    users::{Role, User},
    with_tx,
};

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
    let job = update_as_caller(&mut tx, sql, id, caller, now).await?;
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
pub(super) async fn release_holds(
    tx: &mut Tx,
    job_ids: &[String],
    now: i64,
) -> Result<(), DbError> {
    let ops: Vec<Op> = ledger::pending_of_jobs(tx, job_ids)
        .await?
        .into_iter()
        .map(Op::release)
        .collect();
    for answer in ledger::execute(tx, &ops, now).await? {
        if let Err(e) = answer {
            tracing::error!(error = %e, "a job ended but its credits could not be released");
        }
    }
    Ok(())
}

/// Runs `sql`, an update of job `id` (`$1`) if `caller` (`$2`, admin: `$3`) may change it, at
/// `now` (`$4`), returning the job as it now is.
async fn update_as_caller(
    tx: &mut Tx,
    sql: String,
    id: &str,
    caller: &User,
    now: i64,
) -> Result<Option<Job>, DbError> {
    let job: Option<Job> = with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(&caller.id)
            .bind(caller.role == Role::Admin)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?
    });
    Ok(job)
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
    let job = update_as_caller(&mut tx, sql, id, caller, now).await?;
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
        let (runs, price) = ledger::holds_of_job(&mut tx, &job.id).await?;
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
    // Queued again: its row is its queue entry; idle workers of its queue wake on commit.
    super::wake_in(&mut tx, &[job.queue.as_str()]).await?;
    tx.commit().await?;
    crate::events::publish([job.id.as_str()]);
    Ok(job)
}
