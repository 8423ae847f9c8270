//! What a running job sees.

use std::time::{Duration, Instant};

use serde_json::Value;
use tally_workflows::{Db, DbError, effects::Effects, jobs};
use tokio_util::sync::CancellationToken;

/// Why a kind stopped without a result.
#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    /// Worth another attempt.
    #[error("{0}")]
    Retryable(String),
    /// Will never work; the job goes straight to `dead`.
    #[error("{0}")]
    Fatal(String),
    /// The job was cancelled while it ran.
    #[error("cancelled")]
    Cancelled,
    /// The worker is shutting down and ran out of time: the attempt stops and records nothing;
    /// the job is handed back.
    #[error("interrupted by shutdown")]
    Interrupted,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The running attempt: who runs it, which attempt it is, and the database it reports to.
pub struct JobContext {
    db: Db,
    job_id: String,
    /// The job's owner (follow-up jobs are theirs too).
    user_id: String,
    worker: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    last_check: Option<Instant>,
    /// Cancelled when this process's shutdown grace period is over.
    interrupt: CancellationToken,
    /// Unique to this run of the job (attempt numbers start again when a dead job is retried).
    run_id: String,
    /// What the attempt's outcome also writes if the job then succeeds.
    on_success: Effects,
    /// What it also writes if the job then ends dead.
    on_dead: Effects,
}

/// How often a job may look at the database for a cancel request.
const CANCEL_CHECK_EVERY: Duration = Duration::from_millis(100);

impl JobContext {
    pub fn new(
        db: Db,
        job_id: String,
        user_id: String,
        worker: String,
        attempt: u32,
        interrupt: CancellationToken,
    ) -> Self {
        JobContext {
            db,
            job_id,
            user_id,
            worker,
            attempt,
            last_check: None,
            interrupt,
            run_id: uuid::Uuid::now_v7().simple().to_string(),
            on_success: Effects::default(),
            on_dead: Effects::default(),
        }
    }

    /// An id unique to this run of the job.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The database this attempt writes to.
    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// What the job's success must also write (rows, follow-up jobs, ledger operations): the
    /// engine applies it in the transaction that stores the success and settles the job's
    /// credits, and only then.
    pub fn on_success(&mut self) -> &mut Effects {
        &mut self.on_success
    }

    /// The same for the job's death (a failure with no attempts left, or a fatal one).
    pub fn on_dead(&mut self) -> &mut Effects {
        &mut self.on_dead
    }

    /// What [`Self::on_success`] and [`Self::on_dead`] collected.
    pub fn take_effects(&mut self) -> (Effects, Effects) {
        (
            std::mem::take(&mut self.on_success),
            std::mem::take(&mut self.on_dead),
        )
    }

    /// Stores progress and stops the job if it was cancelled.
    pub async fn progress(&mut self, progress: Value) -> Result<(), JobFailure> {
        if self.interrupt.is_cancelled() {
            return Err(JobFailure::Interrupted);
        }
        let cancel =
            match jobs::report_progress(&self.db, &self.job_id, &self.worker, &progress).await {
                Ok(cancel) => cancel,
                // Progress is only shown: with the database away the job goes on, and a cancel is
                // seen at a later report.
                Err(e) if e.is_unavailable() => {
                    tally_workflows::outage::lost("a job's progress report", &e);
                    false
                }
                Err(e) => return Err(e.into()),
            };
        self.last_check = Some(Instant::now());
        if cancel {
            Err(JobFailure::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A cancel point: returns `Cancelled` if the job was asked to stop. Cheap to call often; it
    /// reads the database at most every 100 ms.
    pub async fn checkpoint(&mut self) -> Result<(), JobFailure> {
        if self.interrupt.is_cancelled() {
            return Err(JobFailure::Interrupted);
        }
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < CANCEL_CHECK_EVERY)
        {
            return Ok(());
        }
        self.last_check = Some(Instant::now());
        match jobs::cancel_requested(&self.db, &self.job_id, &self.worker).await {
            Ok(true) => Err(JobFailure::Cancelled),
            Ok(false) => Ok(()),
            // As for progress: the job goes on while the database is away.
            Err(e) if e.is_unavailable() => {
                tally_workflows::outage::lost("a job's cancel check", &e);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
