//! A queue's apalis backend over Tally's job rows. apalis runs the worker (its concurrency,
//! panics caught, pause and shutdown, the monitor); [`JobQueue`] gives it jobs. Each fetch is
//! the claim itself ([`jobs::claim_next`]: the next runnable jobs of the queue, marked running
//! on this process in one statement), so a job is one row from submission to outcome: no
//! queue table beside it to insert into, lock, and delete from.
//!
//! While a fetch finds full batches it fetches again as soon as apalis asks for more (only as
//! fast as attempts free its slots); after a short one it waits for a wake-up ([`Every`]). A
//! fetch that fails (the database went away) is logged once per outage and tried again after
//! a pause that grows while it keeps failing; the worker never ends because of it.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use apalis::prelude::{Task, WorkerContext};
use apalis_core::{
    backend::{Backend, BackendConfig, finalize::Ephemeral},
    layers::Identity,
    task::task_id::RandomId,
};
use tally_workflows::{
    Db, DbError,
    jobs::{self, Claimed},
    limits::Limits,
    outage,
};
use tokio::time::Sleep;

use crate::poll::Every;

/// A fetch runs as a task of its own: apalis stops polling a paused or busy worker's backend,
/// and a fetch it left half done would hold its connection (SQLite's only one) until then.
type Fetch = tokio::task::JoinHandle<Result<Vec<Claimed>, DbError>>;

/// The jobs of one queue, claimed for this process.
pub struct JobQueue {
    db: Db,
    queue: String,
    /// This process's name: the `worker` of the jobs it claims.
    worker: String,
    batch: usize,
    limits: Arc<Limits>,
    wake: Every,
    /// Claimed and not yet handed to apalis.
    claimed: VecDeque<Claimed>,
    fetch: Option<Fetch>,
    /// The last fetch found fewer jobs than it asked for: wait for a wake-up before the next.
    idle: bool,
    failures: usize,
    pause: Option<Pin<Box<Sleep>>>,
}

impl JobQueue {
    /// `db` is where claims are written (on Postgres, the bookkeeping pool); each fetch claims
    /// at most `batch` jobs.
    pub fn new(
        db: Db,
        queue: &str,
        worker: &str,
        batch: usize,
        limits: Arc<Limits>,
        wake: Every,
    ) -> Self {
        JobQueue {
            db,
            queue: queue.to_owned(),
            worker: worker.to_owned(),
            batch: batch.max(1),
            limits,
            wake,
            claimed: VecDeque::new(),
            fetch: None,
            idle: false,
            failures: 0,
            pause: None,
        }
    }

    fn start_fetch(&mut self) {
        let (db, worker, queue, limits, n) = (
            self.db.clone(),
            self.worker.clone(),
            self.queue.clone(),
            self.limits.clone(),
            self.batch,
        );
        self.fetch = Some(tokio::spawn(async move {
            jobs::claim_next(&db, &worker, &queue, n, &limits).await
        }));
    }
}

impl Backend for JobQueue {
    type Task = Task<Claimed>;
    type Error = DbError;

    fn poll_ready(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), DbError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Task<Claimed>, DbError>>> {
        loop {
            if let Some(job) = self.claimed.pop_front() {
                return Poll::Ready(Some(Ok(Task::new(job))));
            }
            if let Some(fetch) = self.fetch.as_mut() {
                let fetched = ready!(Pin::new(fetch).poll(cx))
                    .unwrap_or_else(|e| Err(DbError::Batch(format!("a fetch task failed: {e}"))));
                self.fetch = None;
                match fetched {
                    Ok(jobs) => {
                        if self.failures > 0 {
                            self.failures = 0;
                            outage::back();
                        }
                        self.idle = jobs.len() < self.batch;
                        self.claimed.extend(jobs);
                    }
                    Err(e) => {
                        self.failures += 1;
                        if e.is_unavailable() {
                            outage::lost(&format!("the {} queue's fetch", self.queue), &e);
                        } else {
                            tracing::error!(queue = %self.queue, error = %e, "a fetch of jobs failed");
                        }
                        self.pause = Some(Box::pin(tokio::time::sleep(outage::wait_after(
                            self.failures,
                        ))));
                    }
                }
                continue;
            }
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            } else if self.idle {
                ready!(self.wake.poll_wake(cx));
                self.idle = false;
            }
            self.start_fetch();
        }
    }

    fn poll_close(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), DbError>> {
        // Jobs claimed and never started stay `running` under this process: the pool hands
        // them back when it stops.
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for JobQueue {
    type Args = Claimed;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = Identity;

    fn config(&self) -> &() {
        &()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Identity {
        Identity::new()
    }
}
