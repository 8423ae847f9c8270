//! The interval at which an idle worker looks for new tasks.
//!
//! apalis 1.0's `IntervalStrategy` loses its wake-up: when its timer has fired, it arms the next
//! one without polling it, so no waker is registered. If the fetch that follows comes back
//! empty, nothing wakes the worker until its next heartbeat (`worker.lease_secs / 3`, 10 s by
//! default): a queue that goes idle and gets one new task could leave it waiting that long.
//! [`Every`] polls each new timer at once, so an idle worker always looks again one interval
//! later. On Postgres it also listens for apalis' notification of each new task, so an idle
//! worker starts a new task as soon as it is committed rather than at its next poll.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{PollSnapshot, PollStrategy};
use futures::Stream;
use tokio::time::{Instant, Sleep};

/// Something that signals new tasks (Postgres' `LISTEN` on apalis' insert notifications).
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
}

impl PollStrategy for Every {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        // Every signal waiting is taken: one fetch answers them all.
        let mut woken = false;
        while let Some(wake) = self.wake.as_mut() {
            match wake.as_mut().poll_next(cx) {
                Poll::Ready(Some(())) => woken = true,
                Poll::Ready(None) => {
                    tracing::warn!(
                        "the worker's task notifications stopped; it polls every {:?} instead",
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
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What apalis does: on a tick it fetches, finds nothing and returns `Pending` without
    /// polling the strategy again. The next tick must still wake the task.
    #[tokio::test]
    async fn after_a_tick_the_next_one_wakes_the_task_by_itself() {
        let mut every = Every::new(Duration::from_millis(10));
        let snapshot = PollSnapshot::default();
        let mut ticks = 0;
        let started = std::time::Instant::now();
        let woke = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| match every.poll_drive(cx, &snapshot) {
                Poll::Ready(_) => {
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

    /// A signal wakes the worker long before its interval is up.
    #[tokio::test]
    async fn a_signal_wakes_the_worker_before_the_interval() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
        let mut every = Every::new(Duration::from_secs(3600)).with_wake(Box::pin(rx));
        let snapshot = PollSnapshot::default();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.unbounded_send(());
        });
        let woke = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| every.poll_drive(cx, &snapshot).map(|_| ())),
        )
        .await;
        assert!(woke.is_ok(), "the signal did not wake the worker");
    }
}
