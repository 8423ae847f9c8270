//! One file per job kind. A kind takes its input and a [`JobContext`] and returns its result.

mod agent;
mod chat;
mod echo;
mod fail;
mod image;
mod sleep;

use serde_json::Value;

use crate::{
    ai::{AiError, Services},
    context::{JobContext, JobFailure},
};

/// What a kind reads first, read while its job is being claimed: it needs only the job's id.
pub enum Prefetched {
    Nothing,
    /// A chat job's conversation up to its question.
    History(Result<Option<Vec<tally_workflows::chat::Message>>, tally_workflows::DbError>),
}

/// Reads what `kind` will read first (see [`Prefetched`]).
pub async fn prefetch(kind: Option<&str>, job_id: &str, ai: &Services) -> Prefetched {
    match (kind, &ai.histories) {
        (Some("chat"), Some(histories)) => {
            Prefetched::History(histories.call(job_id.to_owned()).await)
        }
        _ => Prefetched::Nothing,
    }
}

/// Runs one attempt of `kind`: its result, and the credits it used when that is not simply its
/// reservation (AI jobs pay for their actual usage).
pub async fn run(
    kind: &str,
    input: Value,
    ctx: &mut JobContext,
    ai: &Services,
    prefetched: Prefetched,
) -> Result<(Value, Option<i64>), JobFailure> {
    let plain = |r: Result<Value, JobFailure>| r.map(|v| (v, None));
    match kind {
        "echo" => plain(echo::run(input).await),
        "sleep" => plain(sleep::run(input, ctx).await),
        "fail" => plain(fail::run(input, ctx).await),
        "chat" => chat::run(input, ctx, ai, prefetched).await,
        "image" => image::run(input, ctx, ai).await,
        "agent" => agent::run(input, ctx, ai).await,
        other => Err(JobFailure::Fatal(format!(
            "this worker does not know job kind {other:?}"
        ))),
    }
}

/// A text field of a kind's stored input; its absence means the job can never run.
fn text_field(input: &Value, kind: &str, name: &str) -> Result<String, JobFailure> {
    input
        .get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| JobFailure::Fatal(format!("{kind} input has no {name}")))
}

/// A whole-number field of a kind's stored input that fits a `u32`, if there is one.
fn u32_field(input: &Value, name: &str) -> Option<u32> {
    input
        .get(name)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
}

/// How a provider's failure ends the attempt: retried when another try may work, dead
/// otherwise.
fn provider_failure(e: AiError) -> JobFailure {
    match e {
        AiError::Retryable(m) => JobFailure::Retryable(m),
        other => JobFailure::Fatal(other.to_string()),
    }
}
