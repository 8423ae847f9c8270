//! Paused queues in this process. An admin's pause is a row in the database
//! (`tally_workflows::queues`); [`QueuePauses`] reads the set every [`REFRESH`] and pauses or
//! resumes this process's apalis worker for each queue accordingly. A paused apalis worker is
//! not ready for tasks, so it never polls its queue (no fetches at all while paused); the
//! attempts it already runs finish, and tasks it fetched just before the pause wait, locked
//! by it, until the resume. A resume wakes the worker at once, so a queue runs again within
//! about [`REFRESH`] of the admin's resume.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::{Event, WorkerContext};
use tally_workflows::{Db, DbError, queues};
use tokio_util::sync::CancellationToken;

/// How often each process reads the paused queues.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The paused queues as this process last read them, and its apalis workers by queue.
#[derive(Clone)]
pub struct QueuePauses {
    inner: Arc<Inner>,
}

struct Inner {
    /// The queue each of this process's apalis workers serves, by worker id.
    queue_of: HashMap<String, String>,
    paused: Mutex<BTreeSet<String>>,
    workers: Mutex<Vec<(String, WorkerContext)>>,
}

impl QueuePauses {
    /// Reads the paused queues now, so that a worker starting on a paused queue never fetches.
    /// `workers` pairs each apalis worker id with its queue.
    pub async fn load(
        db: &Db,
        workers: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, DbError> {
        let paused = queues::paused(db).await?;
        Ok(QueuePauses {
            inner: Arc::new(Inner {
                queue_of: workers.into_iter().collect(),
                paused: Mutex::new(paused),
                workers: Mutex::default(),
            }),
        })
    }

    /// For the monitor's events: a worker that starts is paused at once if its queue is.
    pub fn on_event(&self, ctx: &WorkerContext, event: &Event) {
        if !matches!(event, Event::Start) {
            return;
        }
        let Some(queue) = self.inner.queue_of.get(ctx.name()) else {
            return;
        };
        let paused = lock(&self.inner.paused).contains(queue);
        apply(queue, ctx, paused);
        lock(&self.inner.workers).push((queue.clone(), ctx.clone()));
    }

    /// Reads the paused queues every [`REFRESH`] until `stop`, and applies what changed. A
    /// failed read keeps the last state (logged once until a read succeeds again).
    pub fn watch(&self, db: Db, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(REFRESH) => {}
                }
                match queues::paused(&db).await {
                    Ok(paused) => {
                        failing = false;
                        this.set(paused);
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot read the paused queues; keeping the last state");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    fn set(&self, paused: BTreeSet<String>) {
        *lock(&self.inner.paused) = paused.clone();
        for (queue, ctx) in lock(&self.inner.workers).iter() {
            apply(queue, ctx, paused.contains(queue));
        }
    }
}

/// Pauses or resumes one apalis worker. A worker that is stopping stays as it is.
fn apply(queue: &str, ctx: &WorkerContext, paused: bool) {
    if paused && ctx.is_running() && !ctx.is_paused() {
        if ctx.pause().is_ok() {
            tracing::info!(
                queue,
                "queue paused: this process fetches none of its tasks"
            );
        }
    } else if !paused && ctx.is_paused() && ctx.resume().is_ok() {
        tracing::info!(queue, "queue resumed");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
