//! `fail {"times"}`: fails that many attempts, then succeeds. Exercises retries and `dead`.

use serde_json::json;
use tally_workflows::kinds::{FAIL, FailInput, Kind};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::Services,
    context::{JobContext, JobFailure},
};

pub struct Fail;

impl Runner for Fail {
    type Input = FailInput;

    fn kind(&self) -> &'static Kind {
        &FAIL
    }

    async fn run(
        &self,
        FailInput { times }: FailInput,
        ctx: &mut JobContext,
        _: &Services,
        _: Prefetched,
    ) -> Result<Ran, JobFailure> {
        ctx.checkpoint().await?;
        failing_attempt(ctx.attempt, times)?;
        Ok(Ran::plain(json!({ "attempts": ctx.attempt })))
    }
}

/// Fails attempt `attempt` if it is one of the first `times`.
pub(super) fn failing_attempt(attempt: u32, times: u64) -> Result<(), JobFailure> {
    if u64::from(attempt) <= times {
        return Err(JobFailure::Retryable(format!(
            "failing on purpose: attempt {attempt} of {times} planned failures"
        )));
    }
    Ok(())
}
