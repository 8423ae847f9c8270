//! Job records and their states.
//!
//! ```text
//! queued ──claim──▶ running ──ok──▶ succeeded
//!    ▲                 │  ├──error, attempts left──▶ failed ──(run_at passes)──▶ running
//!    │                 │  └──error, no attempts left──▶ dead ──retry──▶ queued
//!    └──lease lost / handed back      cancel: queued|failed ▶ cancelled; running ▶ stops at next check
//! ```
//!
//! Every change of state that causes more work (submit, a retry, a requeue) writes the job and
//! pushes its queue task in one transaction.
//!
//! The parts, by what they are: [`record`] (the stored job and reading it), [`submission`]
//! (new jobs, transactional enqueue), [`control`] (cancel, retry), [`claim`] (a worker taking
//! attempts) and [`outcome`] (storing how attempts ended, with their effects).

mod claim;
mod control;
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
