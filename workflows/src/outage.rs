//! Riding out a database outage. Every loop of a process that talks to the database (the queue
//! workers and their wake-ups, the ledger's maintenance, the batchers behind the API, an
//! attempt recording its outcome) keeps going while the database is away: it waits with
//! [`backoff`] and tries again, and never ends because of it.
//!
//! The outage is logged once per process: a warning by whichever part meets it first
//! ([`lost`]) and a note when it is over by the first that gets through again ([`back`]).
//! Retries in between log at debug level only.

use std::{
    future::Future,
    sync::atomic::{AtomicBool, AtomicI64, Ordering},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::DbError;

/// The first wait after a failure.
pub const FIRST_WAIT: Duration = Duration::from_millis(50);
/// The longest wait between two tries (before jitter, which adds up to as much again): a
/// loop notices the database is back at most about this long after it is.
pub const LONGEST_WAIT: Duration = Duration::from_secs(1);

/// Whether this process currently believes the database unreachable.
static DOWN: AtomicBool = AtomicBool::new(false);
/// When the current outage was first met (ms since the epoch).
static SINCE_MS: AtomicI64 = AtomicI64::new(0);
/// When the last outage ended (ms since the epoch).
static BACK_MS: AtomicI64 = AtomicI64::new(0);

/// How long after the end of an outage a failure is taken for a late report of it: a
/// statement that began while the server was down may still time out waiting for a
/// connection (up to `db::PG_ACQUIRE_TIMEOUT`) just after it is back.
const LATE_REPORTS: Duration = Duration::from_secs(4);

/// The waits between tries: exponential from [`FIRST_WAIT`] to [`LONGEST_WAIT`], with jitter,
/// for as long as it takes.
pub fn backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_WAIT)
        .with_max_delay(LONGEST_WAIT)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The wait before the next try after `failures` failures in a row (1 = after the first).
pub fn wait_after(failures: usize) -> Duration {
    backoff()
        .nth(failures.saturating_sub(1))
        .unwrap_or(LONGEST_WAIT)
}

/// `what` (a part of the process) could not reach the database. Warns if that starts an
/// outage; during one, only a debug line.
pub fn lost(what: &str, error: &dyn std::fmt::Display) {
    let since_back = crate::now_ms() - BACK_MS.load(Ordering::Acquire);
    if since_back < LATE_REPORTS.as_millis() as i64 {
        tracing::debug!(%error, what, "a late failure from the outage that just ended");
        return;
    }
    if DOWN.swap(true, Ordering::AcqRel) {
        tracing::debug!(%error, what, "the database is still unreachable");
    } else {
        SINCE_MS.store(crate::now_ms(), Ordering::Release);
        tracing::warn!(%error, "the database is unreachable ({what}); retrying until it is back");
    }
}

/// A part of the process reached the database: ends the outage, if there was one, with a note
/// of how long it lasted. Cheap when there was none.
pub fn back() {
    if DOWN.load(Ordering::Acquire) && DOWN.swap(false, Ordering::AcqRel) {
        let now = crate::now_ms();
        BACK_MS.store(now, Ordering::Release);
        let down_ms = now - SINCE_MS.load(Ordering::Acquire);
        tracing::info!(down_ms, "the database is reachable again");
    }
}

/// Whether the process is in an outage (some part failed to reach the database and none got
/// through since).
pub fn is_down() -> bool {
    DOWN.load(Ordering::Acquire)
}

/// Runs `op` until it succeeds or fails for a reason other than the database being
/// unreachable, waiting with [`backoff`] between tries. When `stop` is cancelled it stops
/// waiting and returns the last error.
pub async fn retry<T, F, Fut>(what: &str, stop: &CancellationToken, mut op: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut waits = backoff();
    loop {
        match op().await {
            Ok(v) => {
                back();
                return Ok(v);
            }
            Err(e) if e.is_unavailable() && !stop.is_cancelled() => {
                lost(what, &e);
                let wait = waits.next().unwrap_or(LONGEST_WAIT);
                tokio::select! {
                    () = stop.cancelled() => return Err(e),
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn waits_grow_and_stay_bounded() {
        for n in 1..20 {
            let w = wait_after(n);
            assert!(w >= FIRST_WAIT, "{n}: {w:?}");
            assert!(w <= LONGEST_WAIT * 2, "{n}: {w:?}");
        }
        assert!(wait_after(10) >= LONGEST_WAIT);
    }

    #[tokio::test]
    async fn retries_only_while_unavailable() {
        let tries = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let got = retry("test", &stop, || {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(DbError::Sqlx(sqlx::Error::PoolTimedOut))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got.expect("succeeds once the database is back"), 3);
        let tries = AtomicUsize::new(0);
        let other = retry("test", &stop, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(DbError::Corrupt("bad row".into())) }
        })
        .await;
        assert!(other.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1, "no retry for other errors");
        stop.cancel();
        let stopped = retry("test", &stop, || async {
            Err::<(), _>(DbError::Sqlx(sqlx::Error::PoolTimedOut))
        })
        .await;
        assert!(stopped.is_err(), "a stopped retry gives up");
    }
}
