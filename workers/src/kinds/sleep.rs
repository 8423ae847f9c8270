//! `sleep {"ms"}`: waits, reporting progress about ten times a second, and stops when cancelled.

use std::time::Duration;

use serde_json::json;
use tally_workflows::kinds::{Kind, SLEEP, SleepInput};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::Services,
    context::{JobContext, JobFailure},
};

const STEP: Duration = Duration::from_millis(100);

pub struct Sleep;

impl Runner for Sleep {
    type Input = SleepInput;

    fn kind(&self) -> &'static Kind {
        &SLEEP
    }

    async fn run(
        &self,
        SleepInput { ms }: SleepInput,
        ctx: &mut JobContext,
        _: &Services,
        _: Prefetched,
    ) -> Result<Ran, JobFailure> {
        let total = Duration::from_millis(ms);
        let mut done = Duration::ZERO;
        while done < total {
            let step = STEP.min(total - done);
            tokio::time::sleep(step).await;
            done += step;
            ctx.progress(json!({
                "done_ms": done.as_millis() as u64,
                "total_ms": total.as_millis() as u64,
                "percent": (done.as_millis() * 100 / total.as_millis().max(1)) as u64,
            }))
            .await?;
        }
        Ok(Ran::plain(json!({ "slept_ms": total.as_millis() as u64 })))
    }
}
