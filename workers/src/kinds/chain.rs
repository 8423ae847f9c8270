//! `chain {"then", "if_dead", "fail_times"}`: fails `fail_times` attempts, then succeeds. It
//! stages its follow-up jobs on every attempt; the engine enqueues them only with the outcome
//! they belong to (`then` with its success, `if_dead` with its death), under ids derived from
//! the job, so a retry or a second delivery never enqueues one twice.

use serde_json::json;
use tally_workflows::{
    jobs::NewJob,
    kinds::{self, CHAIN, ChainInput, Kind, Step},
};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::Services,
    context::{JobContext, JobFailure},
};

pub struct Chain;

impl Runner for Chain {
    type Input = ChainInput;

    fn kind(&self) -> &'static Kind {
        &CHAIN
    }

    async fn run(
        &self,
        input: ChainInput,
        ctx: &mut JobContext,
        _: &Services,
        _: Prefetched,
    ) -> Result<Ran, JobFailure> {
        let ChainInput {
            then,
            if_dead,
            fail_times,
        } = input;
        for (i, step) in if_dead.into_iter().enumerate() {
            let job = follow_up(ctx, step)?;
            ctx.on_dead().follow_up(format!("if_dead/{i}"), job);
        }
        let count = then.len();
        for (i, step) in then.into_iter().enumerate() {
            let job = follow_up(ctx, step)?;
            ctx.on_success().follow_up(format!("then/{i}"), job);
        }
        ctx.checkpoint().await?;
        super::fail::failing_attempt(ctx.attempt, fail_times)?;
        Ok(Ran::plain(
            json!({ "attempts": ctx.attempt, "follow_ups": count }),
        ))
    }
}

/// The job `step` describes, for the chain job's owner.
fn follow_up(ctx: &JobContext, step: Step) -> Result<NewJob, JobFailure> {
    let kind = kinds::lookup(&step.kind)
        .ok_or_else(|| JobFailure::Fatal(format!("unknown follow-up kind {:?}", step.kind)))?;
    Ok(NewJob::new(ctx.user_id(), kind, step.input))
}
