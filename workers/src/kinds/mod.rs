//! One file per job kind. A kind takes its input and a [`JobContext`] and returns its result.

mod agent;
mod chat;
mod echo;
mod fail;
mod image;
mod sleep;

use serde_json::Value;

use crate::{
    ai::Services,
    context::{JobContext, JobFailure},
};

/// Runs one attempt of `kind`: its result, and the credits it used when that is not simply its
/// reservation (AI jobs pay for their actual usage).
pub async fn run(
    kind: &str,
    input: Value,
    ctx: &mut JobContext,
    ai: &Services,
) -> Result<(Value, Option<i64>), JobFailure> {
    let plain = |r: Result<Value, JobFailure>| r.map(|v| (v, None));
    match kind {
        "echo" => plain(echo::run(input).await),
        "sleep" => plain(sleep::run(input, ctx).await),
        "fail" => plain(fail::run(input, ctx).await),
        "chat" => chat::run(input, ctx, ai).await,
        "image" => image::run(input, ctx, ai).await,
        "agent" => agent::run(input, ctx, ai).await,
        other => Err(JobFailure::Fatal(format!(
            "this worker does not know job kind {other:?}"
        ))),
    }
}
