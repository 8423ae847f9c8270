//! One file per job kind. A kind takes its input and a [`JobContext`] and returns its result.

mod echo;
mod fail;
mod sleep;

use serde_json::Value;

use crate::context::{JobContext, JobFailure};

/// Runs one attempt of `kind`.
pub async fn run(kind: &str, input: Value, ctx: &mut JobContext) -> Result<Value, JobFailure> {
    match kind {
        "echo" => echo::run(input).await,
        "sleep" => sleep::run(input, ctx).await,
        "fail" => fail::run(input, ctx).await,
        other => Err(JobFailure::Fatal(format!(
            "this worker does not know job kind {other:?}"
        ))),
    }
}
