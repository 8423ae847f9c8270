//! A queue's worker that starts again after its backend failed. apalis ends a worker whose
//! fetch, heartbeat or registration failed (the database went away); the [`Monitor`]'s
//! restart policy ([`should_restart`]) builds it again at once, and a new worker registers and
//! fetches as soon as it is polled. [`AfterPause`] makes the new worker wait first, longer
//! after each failure in a row ([`tally_workflows::outage::backoff`]), so a worker that keeps
//! failing while the database is down does not spin.
//!
//! [`Monitor`]: apalis::prelude::Monitor

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use apalis::prelude::{Backend, WorkerContext, WorkerError};
use apalis_core::backend::{BackendConfig, WireFormatBackend};
use tally_workflows::outage;
use tokio::time::Sleep;

/// The monitor's restart policy: a worker that failed starts again unless the process is
/// stopping. The failure is logged once per outage.
pub fn should_restart(worker: &WorkerContext, error: &WorkerError) -> bool {
    if worker.is_shutting_down() {
        return false;
    }
    outage::lost(&format!("worker {}", worker.name()), error);
    true
}

/// A queue's failures in a row: how long its next worker waits before it starts.
#[derive(Clone, Default)]
pub struct Failures(Arc<AtomicUsize>);

/// A backend whose worker waits before it first touches the database, when it replaces a
/// worker that failed.
pub struct AfterPause<B> {
    backend: B,
    pause: Option<Pin<Box<Sleep>>>,
    /// Reset once the backend is ready again (registered: the database answered).
    failures: Option<Failures>,
}

impl<B> AfterPause<B> {
    /// `restarts` is the number of times the monitor restarted this queue's worker: 0 for
    /// the first worker, which starts at once.
    pub fn new(backend: B, restarts: usize, failures: &Failures) -> Self {
        if restarts == 0 {
            return AfterPause {
                backend,
                pause: None,
                failures: None,
            };
        }
        let n = failures.0.fetch_add(1, Ordering::AcqRel) + 1;
        let wait = outage::wait_after(n);
        tracing::debug!(?wait, failures = n, "queue worker restarts after a pause");
        AfterPause {
            backend,
            pause: Some(Box::pin(tokio::time::sleep(wait))),
            failures: Some(failures.clone()),
        }
    }
}

impl<B: Backend> Backend for AfterPause<B> {
    type Task = B::Task;
    type Error = B::Error;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let ready = self.backend.poll_ready(cx, worker);
        if matches!(ready, Poll::Ready(Ok(())))
            && let Some(failures) = self.failures.take()
        {
            failures.0.store(0, Ordering::Release);
            outage::back();
            tracing::debug!(worker = worker.name(), "queue worker is back");
        }
        ready
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        self.backend.poll_next(cx, worker)
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        self.backend.poll_close(cx, worker)
    }
}

apalis_core::delegate_config!(AfterPause<B>, backend);
apalis_core::delegate_codec!(AfterPause<B>, backend);
