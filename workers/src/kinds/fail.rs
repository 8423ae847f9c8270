//! `fail {"times"}`: fails that many attempts, then succeeds. Exercises retries and `dead`.

use serde_json::{Value, json};

use crate::context::{JobContext, JobFailure};

pub async fn run(input: Value, ctx: &mut JobContext) -> Result<Value, JobFailure> {
    let times = input
        .get("times")
        .and_then(Value::as_u64)
        .ok_or_else(|| JobFailure::Fatal("input.times must be a non-negative integer".into()))?;
    ctx.checkpoint().await?;
    if u64::from(ctx.attempt) <= times {
        return Err(JobFailure::Retryable(format!(
            "failing on purpose: attempt {} of {times} planned failures",
            ctx.attempt
        )));
    }
    Ok(json!({ "attempts": ctx.attempt }))
}
