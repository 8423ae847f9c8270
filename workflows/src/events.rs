//! Live events: which job records changed, pushed to whoever follows them (the API's event
//! streams) as soon as the change commits.
//!
//! - **In one process** (SQLite, `tally dev`, and Postgres when the writer is this process): the
//!   engine calls [`publish`] with the changed jobs' ids after each commit that changed them,
//!   never before. Publishing costs nothing when nobody listens (a worker-only process).
//! - **Across processes on Postgres**: statement-level triggers on `tally_jobs` (migration
//!   `job_events`) `pg_notify` the changed ids on channel [`CHANNEL`] as comma-separated lists
//!   of at most [`PAYLOAD_BYTES`] bytes each (a batch of 2,048 outcomes sends ten or so);
//!   Postgres delivers them when the writing transaction commits. An API process holds one
//!   listener ([`listen`]) that republishes them here, and reconnects after a restart.
//! - **Anything missed** (SQLite across processes, a lagging follower, notifications lost while
//!   the listener was reconnecting) is caught by the followers' own slow poll, which is only the
//!   fallback: see `api.events_poll_ms`. After a reconnect the listener publishes
//!   [`Change::Unknown`] so followers look again at once.
//!
//! A [`Change`] names job ids only: a follower reads the job itself (as its caller may see it),
//! so nothing here decides who may see what.

use std::sync::{Arc, LazyLock};

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    Db, DbError,
    jobs::{COLUMNS, Job},
    outage, with_pool,
};

/// The Postgres notification channel the `tally_jobs` triggers notify.
pub const CHANNEL: &str = "tally_jobs";
/// The most bytes of ids one notification carries (Postgres refuses payloads of 8,000 bytes).
pub const PAYLOAD_BYTES: usize = 7900;
/// Changes kept for a follower that has not read them yet; one further behind is told it
/// lagged and looks again.
pub const CAPACITY: usize = 1024;

/// What changed.
#[derive(Debug, Clone)]
pub enum Change {
    /// These jobs' records changed (a state, progress, or a new job) and the change committed.
    Jobs(Arc<[String]>),
    /// Anything may have changed (notifications may have been lost): look again.
    Unknown,
}

impl Change {
    /// Whether a follower of job `id` must look at it again.
    pub fn touches(&self, id: &str) -> bool {
        match self {
            Change::Jobs(ids) => ids.iter().any(|j| j == id),
            Change::Unknown => true,
        }
    }
}

/// The process's one broadcast of changes.
static HUB: LazyLock<broadcast::Sender<Change>> = LazyLock::new(|| broadcast::channel(CAPACITY).0);

/// Follows every change committed from now on (subscribe before reading the state you follow,
/// so that no change falls between the read and the subscription).
pub fn subscribe() -> broadcast::Receiver<Change> {
    HUB.subscribe()
}

/// Tells this process' followers that the jobs `ids` changed. Call it after the commit.
pub fn publish<I, S>(ids: I)
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    if HUB.receiver_count() == 0 {
        return;
    }
    let ids: Arc<[String]> = ids.into_iter().map(Into::into).collect();
    if !ids.is_empty() {
        let _ = HUB.send(Change::Jobs(ids));
    }
}

/// Tells every follower to look again (something may have changed unseen).
pub fn publish_unknown() {
    let _ = HUB.send(Change::Unknown);
}

/// The ids in one notification's payload (comma-separated).
pub fn parse_payload(payload: &str) -> Vec<String> {
    payload
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

/// On Postgres, starts the process's listener for the triggers' notifications, republishing
/// them to this process' followers until `stop` is cancelled. It has a connection of its own
/// (not one of `db`'s), rides out a database restart (reconnects with backoff, then publishes
/// [`Change::Unknown`]). On SQLite there is nothing to listen to: `None`.
pub fn listen(db: &Db, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let Db::Postgres(pool) = db else {
        return None;
    };
    let own = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(crate::db::PG_ACQUIRE_TIMEOUT)
        .connect_lazy_with((*pool.connect_options()).clone());
    Some(tokio::spawn(async move {
        run_listener(own, stop).await;
    }))
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

async fn run_listener(pool: PgPool, stop: CancellationToken) {
    let mut failures = 0usize;
    let mut first = true;
    while !stop.is_cancelled() {
        let mut listener = match connect(&pool).await {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                let e = DbError::Sqlx(e);
                if e.is_unavailable() {
                    outage::lost("the event listener", &e);
                } else {
                    tracing::warn!(error = %e, "the event listener cannot listen; retrying");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(outage::wait_after(failures)) => {}
                }
                continue;
            }
        };
        failures = 0;
        if !first {
            tracing::debug!("the event listener reconnected");
            // Whatever committed while it was away was not heard: followers look again.
            publish_unknown();
        }
        first = false;
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = listener.try_recv() => next,
            };
            match next {
                Ok(Some(n)) => {
                    let mut ids = parse_payload(n.payload());
                    // Whatever else already arrived goes out in the same change.
                    while let Some(n) = listener.next_buffered() {
                        ids.extend(parse_payload(n.payload()));
                    }
                    publish(ids);
                }
                // The connection was lost and made again: notifications may have been missed.
                Ok(None) => publish_unknown(),
                Err(e) => {
                    tracing::debug!(error = %e, "the event listener lost its connection");
                    break;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(outage::FIRST_WAIT) => {}
        }
    }
}

/// Of the jobs `ids`, those owned by `user_id` (for a stream of a user's own jobs).
pub async fn jobs_of(db: &Db, user_id: &str, ids: &[String]) -> Result<Vec<Job>, DbError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let jobs: Vec<Job> = match db {
        Db::Postgres(pool) => {
            let sql = format!(
                "SELECT {COLUMNS} FROM UNNEST($1::text[]) AS v (vid) JOIN tally_jobs ON id = vid \
                 WHERE user_id = $2"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(ids)
                .bind(user_id)
                .fetch_all(pool)
                .await?
        }
        Db::Sqlite(pool) => {
            let mut out = Vec::new();
            for chunk in ids.chunks(500) {
                let mut qb = sqlx::QueryBuilder::new(format!(
                    "SELECT {COLUMNS} FROM tally_jobs WHERE user_id = "
                ));
                qb.push_bind(user_id).push(" AND id IN (");
                let mut list = qb.separated(", ");
                for id in chunk {
                    list.push_bind(id);
                }
                qb.push(")");
                out.extend(qb.build_query_as::<Job>().fetch_all(pool).await?);
            }
            out
        }
    };
    Ok(jobs)
}

/// `user_id`'s jobs changed at or after `since_ms` (their `updated_at`), the newest `limit` of
/// them: the fallback poll of a stream of a user's jobs. It reads the user's jobs through their
/// index by user (there is none on `updated_at`: it would cost every write of a job).
pub async fn changed_since(
    db: &Db,
    user_id: &str,
    since_ms: i64,
    limit: i64,
) -> Result<Vec<Job>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM tally_jobs WHERE user_id = $1 AND updated_at >= $2 \
         ORDER BY updated_at DESC LIMIT $3"
    );
    let jobs: Vec<Job> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(since_ms)
            .bind(limit)
            .fetch_all(pool)
            .await?
    });
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_split_on_commas() {
        assert_eq!(parse_payload("a,b, c,,"), vec!["a", "b", "c"]);
        assert!(parse_payload("").is_empty());
    }

    #[tokio::test]
    async fn published_after_subscribing_is_seen() {
        let mut rx = subscribe();
        publish(["job-1", "job-2"]);
        let seen = loop {
            // Other tests in this binary may publish too.
            match rx.recv().await {
                Ok(c) if c.touches("job-2") => break c,
                _ => {}
            }
        };
        assert!(seen.touches("job-1"));
        assert!(!Change::Jobs(Arc::from(vec!["x".to_owned()])).touches("job-1"));
        assert!(Change::Unknown.touches("anything"));
    }
}
