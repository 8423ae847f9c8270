//! `sleep {"ms"}`: waits, reporting progress about ten times a second, and stops when cancelled.

use std::time::Duration;

use serde_json::{Value, json};

use crate::context::{JobContext, JobFailure};

const STEP: Duration = Duration::from_millis(100);

pub async fn run(input: Value, ctx: &mut JobContext) -> Result<Value, JobFailure> {
    let total = input
        .get("ms")
        .and_then(Value::as_u64)
        .ok_or_else(|| JobFailure::Fatal("input.ms must be a non-negative integer".into()))?;
    let total = Duration::from_millis(total);
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
    Ok(json!({ "slept_ms": total.as_millis() as u64 }))
}
