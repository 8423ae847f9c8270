//! Job records and their states.
//!
//! ```text
//! queued ──claim──▶ running ──ok──▶ succeeded
//!    ▲                 │  ├──error, attempts left──▶ failed ──(run_at passes)──▶ running
//!    │                 │  └──error, no attempts left──▶ dead ──retry──▶ queued
//!    └──lease lost / handed back      cancel: queued|failed ▶ cancelled; running ▶ stops at next check
//! ```
//!
//! A job's row is its queue entry: `queued` and `failed` jobs whose `run_at` has come are what
//! workers claim, so every change of state that causes more work (submit, a retry, a requeue)
//! is one write of the job, in the transaction that causes it.
//!
//! The parts, by what they are: [`record`] (the stored job and reading it), [`submission`]
//! (new jobs, transactional enqueue), [`control`] (cancel, retry), [`claim`] (a worker taking
//! attempts, and giving them back), [`lease`] (heartbeats, and rescuing the jobs of a worker
//! that stopped beating) and [`outcome`] (storing how attempts ended, with their effects).

mod claim;
mod control;
pub mod lease;
mod outcome;
mod record;
mod submission;

pub use claim::*;
pub use control::*;
pub use outcome::*;
pub use record::*;
pub use submission::*;

use crate::{DbError, ledger::LedgerError};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job not found")]
    NotFound,
    #[error("the Idempotency-Key was already used for a different request (job {0})")]
    IdempotencyConflict(String),
    #[error("{0}")]
    Conflict(String),
    #[error("insufficient credits: the job costs {needed} and {available} are available")]
    InsufficientCredits { needed: i64, available: i64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl JobError {
    /// The same refusal again, for a second caller (a database error is not copied: it
    /// would not say anything true about the other request).
    fn same(&self) -> JobError {
        match self {
            JobError::InsufficientCredits { needed, available } => JobError::InsufficientCredits {
                needed: *needed,
                available: *available,
            },
            other => JobError::Conflict(other.to_string()),
        }
    }
}

impl From<LedgerError> for JobError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InsufficientCredits {
                balance, needed, ..
            } => JobError::InsufficientCredits {
                needed,
                available: balance,
            },
            LedgerError::Db(e) => JobError::Db(e),
            other => JobError::Conflict(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Db(DbError::Sqlx(e))
    }
}
