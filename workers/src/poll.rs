//! When an idle queue worker looks for jobs again: every interval, and at once when new jobs
//! may be there. On Postgres it listens on [`tally_workflows::jobs::WAKE_CHANNEL`] for its
//! queue's name (sent by the statement that inserts jobs, and by hand-backs and rescues), and
//! on SQLite it watches for commits ([`SqliteCommits`]), so an idle worker starts a new job as
//! soon as it is committed rather than at its next poll.
//!
//! [`Every`] polls each new timer at once, so an idle worker always looks again one interval
//! later (apalis 1.0's own `IntervalStrategy` armed its next timer without polling it, and a
//! worker whose fetch came back empty could sleep until its next heartbeat).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::time::{Instant, Sleep};

/// Something that signals new jobs (Postgres' `LISTEN` on the queue's wake-ups).
pub type WakeStream = Pin<Box<dyn Stream<Item = ()> + Send + Sync>>;

/// Wakes the worker every `interval`, and at once whenever `wake` yields.
pub struct Every {
    interval: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    wake: Option<WakeStream>,
}

impl Every {
    pub fn new(interval: Duration) -> Self {
        Every {
            interval,
            timer: None,
            wake: None,
        }
    }

    /// Also wakes the worker whenever `wake` yields; when it ends (its connection was lost),
    /// the interval alone is left.
    pub fn with_wake(mut self, wake: WakeStream) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Ready when the worker should look for jobs: its interval passed since it last looked,
    /// or a signal came. Registers `cx`'s waker on both otherwise.
    pub fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Every signal waiting is taken: one fetch answers them all.
        let mut woken = false;
        while let Some(wake) = self.wake.as_mut() {
            match wake.as_mut().poll_next(cx) {
                Poll::Ready(Some(())) => woken = true,
                Poll::Ready(None) => {
                    tracing::warn!(
                        "the worker's wake-ups stopped; it polls every {:?} instead",
                        self.interval
                    );
                    self.wake = None;
                }
                Poll::Pending => break,
            }
        }
        let interval = self.interval;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
        if timer.as_mut().poll(cx).is_ready() {
            timer.as_mut().reset(Instant::now() + interval);
            // Registers this task's waker on the new timer: the wake-up apalis' own strategy
            // loses.
            let _ = timer.as_mut().poll(cx);
            woken = true;
        }
        if woken {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// SQLite's stand-in for Postgres' notifications: a connection of its own reads
/// `PRAGMA data_version` (a counter in SQLite's shared memory), and each time another
/// connection, in this process or another, has committed, it wakes every worker that
/// subscribed. While the database is busy it looks every [`WATCH_EVERY`], so a worker finds a
/// new task within about a millisecond of its commit whatever its poll interval; after a quiet
/// second it looks less and less often, down to every [`WATCH_IDLE`], so an idle worker costs
/// next to nothing. It runs while the pool is alive.
#[derive(Clone)]
pub struct SqliteCommits {
    subscribers: std::sync::Arc<std::sync::Mutex<Vec<futures::channel::mpsc::Sender<()>>>>,
}

/// How often [`SqliteCommits`] looks at the database's commit counter while commits come.
pub const WATCH_EVERY: Duration = Duration::from_millis(1);
/// How often it looks when the database has been quiet for a while.
pub const WATCH_IDLE: Duration = Duration::from_millis(25);
/// How long without a commit before it starts looking less often.
const QUIET: Duration = Duration::from_secs(1);

impl SqliteCommits {
    /// Starts watching the database `options` opens. If the watch loses its connection, it
    /// opens another, waiting longer after each failure in a row
    /// ([`tally_workflows::outage::backoff`]); meanwhile the workers poll at their interval.
    pub fn watch(options: sqlx::sqlite::SqliteConnectOptions) -> Self {
        let commits = SqliteCommits {
            subscribers: Default::default(),
        };
        let subscribers = std::sync::Arc::downgrade(&commits.subscribers);
        tokio::spawn(async move {
            use sqlx::Connection;
            use tally_workflows::outage;
            // Failures in a row to open or read the database.
            let mut failures = 0usize;
            // The pool's last handle is gone when no subscriber list is left: nothing to wake.
            while subscribers.strong_count() > 0 {
                let mut conn = match sqlx::SqliteConnection::connect_with(&options).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        failures += 1;
                        outage::lost("the SQLite commit watch", &e);
                        tokio::time::sleep(outage::wait_after(failures)).await;
                        continue;
                    }
                };
                let mut every = WATCH_EVERY;
                let mut changed = Instant::now();
                let mut last = None;
                loop {
                    tokio::time::sleep(every).await;
                    let Some(subscribers) = subscribers.upgrade() else {
                        return;
                    };
                    let version: i64 = match sqlx::query_scalar("PRAGMA data_version")
                        .fetch_one(&mut conn)
                        .await
                    {
                        Ok(v) => {
                            if failures > 0 {
                                failures = 0;
                                outage::back();
                            }
                            v
                        }
                        Err(e) => {
                            failures += 1;
                            outage::lost("the SQLite commit watch", &e);
                            tokio::time::sleep(outage::wait_after(failures)).await;
                            break;
                        }
                    };
                    if last.is_some_and(|l| l != version) {
                        let mut subscribers = subscribers.lock().unwrap_or_else(|e| e.into_inner());
                        // A full channel already holds a wake-up; a closed one lost its worker.
                        subscribers.retain_mut(|s| match s.try_send(()) {
                            Ok(()) => true,
                            Err(e) => e.is_full(),
                        });
                        every = WATCH_EVERY;
                        changed = Instant::now();
                    } else if changed.elapsed() > QUIET {
                        every = (every * 2).min(WATCH_IDLE);
                    }
                    last = Some(version);
                }
            }
        });
        commits
    }

    /// A stream that yields after each commit by another connection.
    pub fn subscribe(&self) -> WakeStream {
        let (tx, rx) = futures::channel::mpsc::channel(0);
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        Box::pin(rx)
    }
}

/// Postgres' wake-ups for the workers of `queue`: a notification on
/// [`tally_workflows::jobs::WAKE_CHANNEL`] whose payload is the queue's name, heard here on a
/// listening connection of `pool`'s. When that connection is lost (the server restarted), the listener
/// listens again on a new one, waiting longer after each failure in a row
/// ([`tally_workflows::outage::backoff`]); meanwhile the workers poll at their interval. It
/// never stops on its own: it ends when the returned stream is dropped (its worker stopped).
pub fn pg_queue_wakes(pool: sqlx::PgPool, queue: String) -> WakeStream {
    const CHANNEL: &str = tally_workflows::jobs::WAKE_CHANNEL;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        use tally_workflows::outage;
        // A full channel already holds a wake-up.
        let wake = |tx: &tokio::sync::mpsc::Sender<()>| {
            let _ = tx.try_send(());
        };
        let mut listener = None;
        let mut failures = 0usize;
        loop {
            let heard = async {
                let l = match &mut listener {
                    Some(l) => l,
                    None => {
                        let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                        l.listen(CHANNEL).await?;
                        listener.insert(l)
                    }
                };
                l.try_recv().await
            };
            let heard = tokio::select! {
                () = tx.closed() => return,
                heard = heard => heard,
            };
            match heard {
                Ok(Some(n)) => {
                    failures = 0;
                    if n.payload() == queue {
                        wake(&tx);
                    }
                }
                // The connection was lost and a new one listens: notifications sent in
                // between are gone, so the workers look once.
                Ok(None) => wake(&tx),
                Err(e) => {
                    failures += 1;
                    outage::lost("the listener for new jobs", &e);
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(outage::wait_after(failures)) => {}
                    }
                    // The workers look once: notifications may have been missed.
                    wake(&tx);
                }
            }
        }
    });
    Box::pin(Wakes(rx))
}

/// The receiving end of [`pg_queue_wakes`].
struct Wakes(tokio::sync::mpsc::Receiver<()>);

impl Stream for Wakes {
    type Item = ();

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a queue worker does: on a tick it fetches, finds nothing and returns `Pending`
    /// without polling the timer again. The next tick must still wake the task.
    #[tokio::test]
    async fn after_a_tick_the_next_one_wakes_the_task_by_itself() {
        let mut every = Every::new(Duration::from_millis(10));
        let mut ticks = 0;
        let started = std::time::Instant::now();
        let woke = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| match every.poll_wake(cx) {
                Poll::Ready(()) => {
                    ticks += 1;
                    if ticks == 3 {
                        Poll::Ready(())
                    } else {
                        // An empty fetch: back to sleep with no other wake-up arranged.
                        Poll::Pending
                    }
                }
                Poll::Pending => Poll::Pending,
            }),
        )
        .await;
        assert!(woke.is_ok(), "a tick was lost after {ticks} ticks");
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    /// A commit by another connection wakes every subscriber; without one, nothing does.
    #[tokio::test]
    async fn sqlite_commits_wake_subscribers() {
        use futures::StreamExt;
        use sqlx::Connection;
        let dir = std::env::temp_dir().join(format!("tally-poll-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("dir");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("watch.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let mut writer = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("connect");
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&mut writer)
            .await
            .expect("create");
        let commits = SqliteCommits::watch(options);
        let (mut a, mut b) = (commits.subscribe(), commits.subscribe());
        // The watch's first look only learns the counter.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let quiet = tokio::time::timeout(Duration::from_millis(100), a.next()).await;
        assert!(quiet.is_err(), "woken without a commit");
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut writer)
            .await
            .expect("insert");
        for s in [&mut a, &mut b] {
            let woke = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
            assert_eq!(
                woke.ok().flatten(),
                Some(()),
                "a commit did not wake a subscriber"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A signal wakes the worker long before its interval is up.
    #[tokio::test]
    async fn a_signal_wakes_the_worker_before_the_interval() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
        let mut every = Every::new(Duration::from_secs(3600)).with_wake(Box::pin(rx));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.unbounded_send(());
        });
        let woke = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| every.poll_wake(cx)),
        )
        .await;
        assert!(woke.is_ok(), "the signal did not wake the worker");
    }
}
