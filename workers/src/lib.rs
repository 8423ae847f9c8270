//! Tally's worker pools.
//!
//! # Layout
//! - [`pool`]: one apalis worker per queue in this process, under one monitor and one shutdown
//!   signal; on shutdown, hands back what it still holds.
//! - [`context`]: what a running job sees: its id, progress reporting and the cancel check.
//! - [`cron`]: the cron schedules of the queues this process serves: one job per tick across
//!   processes.
//! - [`kinds`]: one file per job kind.
//! - [`pause`]: queues an admin paused: this process's worker for each fetches nothing.
//! - [`poll`]: when an idle worker looks for jobs again: its interval, or a wake-up.
//! - [`queue`]: a queue's apalis backend: its fetch claims the queue's next job rows.
//! - [`restart`]: a queue's worker that failed starts again.

pub mod ai;
pub mod context;
pub mod cron;
pub mod kinds;
pub mod pause;
pub mod poll;
pub mod pool;
pub mod queue;
pub mod restart;

pub use pool::{WorkerPool, worker_name};
