//! Cron schedules in a worker process: a loop that sleeps until the next tick of each schedule
//! whose queue this process serves, and enqueues that tick's job. Every process that serves
//! the queue runs the loop; the tick's unique row (`tally_workflows::cron`) lets one of them
//! make the job and the others nothing.
//!
//! At start, a tick missed while no process ran (the latest due, if later than the last
//! stored) is enqueued once. While the database is away the loop retries with backoff
//! (logged once per outage, see `tally_workflows::outage`); each try takes the latest tick
//! due by then, so ticks missed during an outage also run once.

use chrono::{DateTime, Utc};
use tally_workflows::{
    Db, DbError,
    cron::{self, Schedule},
    outage,
};
use tokio_util::sync::CancellationToken;

/// Runs `schedules` until `stop` is cancelled. Their jobs get `max_attempts` attempts.
pub async fn run(db: Db, schedules: Vec<Schedule>, max_attempts: u32, stop: CancellationToken) {
    if schedules.is_empty() {
        return;
    }
    let names: Vec<&str> = schedules.iter().map(|s| s.name.as_str()).collect();
    tracing::info!(schedules = ?names, "cron started");
    // A missed tick runs once.
    let last = match outage::retry("reading cron ticks", &stop, || {
        cron::last_ticks(&db, &schedules)
    })
    .await
    {
        Ok(last) => last,
        Err(e) => {
            if !stop.is_cancelled() {
                tracing::error!(error = %e, "cron cannot read its stored ticks; this process runs no schedule");
            }
            return;
        }
    };
    // The ticks after `start` are the loop's: none falls between the catch-up and the loop.
    let start = Utc::now();
    for s in &schedules {
        let stored = last.get(&s.name).map(|t| t.at_ms);
        if let Some(tick) = cron::missed(s, stored, start) {
            tracing::info!(schedule = %s.name, %tick, "enqueueing the latest tick missed while no process ran");
            if enqueue(&db, s, tick, max_attempts, &stop).await.is_err() {
                return;
            }
        }
    }
    let mut next: Vec<Option<DateTime<Utc>>> =
        schedules.iter().map(|s| s.next_after(start)).collect();
    loop {
        let Some((i, at)) = next
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, t)))
            .min_by_key(|(_, t)| *t)
        else {
            // No schedule has a tick left.
            stop.cancelled().await;
            return;
        };
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let s = &schedules[i];
        let Ok(tick) = enqueue(&db, s, at, max_attempts, &stop).await else {
            return;
        };
        // The tick after the one just handled: one that fell while it was enqueued (a slow
        // database, an outage) is due at once, and runs once however many fell.
        next[i] = s.next_after(tick);
    }
}

/// Enqueues the tick `at` of `s` (or, after an outage, the latest tick due by the time the
/// database answers), and answer that tick. Errors only when stopped; a tick refused for
/// another reason is logged and skipped.
async fn enqueue(
    db: &Db,
    s: &Schedule,
    at: DateTime<Utc>,
    max_attempts: u32,
    stop: &CancellationToken,
) -> Result<DateTime<Utc>, DbError> {
    let result = outage::retry("enqueueing a cron tick", stop, || {
        let tick = s
            .latest_at_or_before(Utc::now())
            .map_or(at, |due| due.max(at));
        async move {
            cron::enqueue_tick(db, s, tick, max_attempts)
                .await
                .map(|job| (tick, job))
        }
    })
    .await;
    match result {
        Ok((tick, Some(job_id))) => {
            tracing::debug!(schedule = %s.name, %tick, %job_id, "cron tick enqueued");
            Ok(tick)
        }
        Ok((tick, None)) => {
            tracing::debug!(schedule = %s.name, %tick, "cron tick already claimed");
            Ok(tick)
        }
        Err(e) if stop.is_cancelled() => Err(e),
        Err(e) => {
            // Not the database being away (that is retried above): the tick is skipped,
            // and the next one tried as usual.
            tracing::error!(schedule = %s.name, error = %e, "cron tick not enqueued; skipped");
            Ok(at.max(Utc::now()))
        }
    }
}
