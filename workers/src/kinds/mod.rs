//! One file per job kind, each a [`Runner`] of a kind that `tally_workflows::kinds` describes.
//! [`RUNNERS`] lists them; the pool finds a job's runner by its kind's name and knows nothing
//! else about any kind.

mod agent;
mod chain;
mod chat;
mod echo;
mod fail;
mod image;
mod ledger_expire;
mod sleep;

use std::any::Any;

use futures::future::BoxFuture;
use serde_json::Value;
use tally_workflows::kinds::{self, Input, Kind};

use crate::{
    ai::{AiError, Services},
    context::{JobContext, JobFailure},
};

/// What a kind read while its job was being claimed (see [`Runner::prefetch`]); each kind
/// knows its own type.
pub type Prefetched = Option<Box<dyn Any + Send>>;

/// A successful attempt: its result, and the credits it used when that is not simply its
/// reservation (AI jobs pay for their actual usage).
#[derive(Debug)]
pub struct Ran {
    pub result: Value,
    pub credits: Option<i64>,
}

impl Ran {
    /// A result that settles the job's reservation as it is.
    pub fn plain(result: Value) -> Ran {
        Ran {
            result,
            credits: None,
        }
    }

    /// A result that used `credits`.
    pub fn charged(result: Value, credits: i64) -> Ran {
        Ran {
            result,
            credits: Some(credits),
        }
    }
}

/// How a worker runs one kind.
pub trait Runner: Send + Sync + 'static {
    /// The kind's typed input (checked at submission, parsed again here).
    type Input: Input + Send;

    /// The kind this runs.
    fn kind(&self) -> &'static Kind;

    /// Reads what the kind will read first, while its job is being claimed: it has only the
    /// job's id. Dropped if the claim refuses the job.
    fn prefetch(&self, job_id: &str, ai: &Services) -> impl Future<Output = Prefetched> + Send {
        let _ = (job_id, ai);
        std::future::ready(None)
    }

    /// Runs one attempt. What its success (or its job's death) must also write, it stages on
    /// `ctx` (see [`JobContext::on_success`]).
    fn run(
        &self,
        input: Self::Input,
        ctx: &mut JobContext,
        ai: &Services,
        prefetched: Prefetched,
    ) -> impl Future<Output = Result<Ran, JobFailure>> + Send;
}

/// A [`Runner`] of any input type, as the registry holds it.
pub trait AnyRunner: Send + Sync {
    fn kind(&self) -> &'static Kind;
    fn prefetch<'a>(&'a self, job_id: &'a str, ai: &'a Services) -> BoxFuture<'a, Prefetched>;
    fn run<'a>(
        &'a self,
        input: Value,
        ctx: &'a mut JobContext,
        ai: &'a Services,
        prefetched: Prefetched,
    ) -> BoxFuture<'a, Result<Ran, JobFailure>>;
}

impl<R: Runner> AnyRunner for R {
    fn kind(&self) -> &'static Kind {
        Runner::kind(self)
    }
    fn prefetch<'a>(&'a self, job_id: &'a str, ai: &'a Services) -> BoxFuture<'a, Prefetched> {
        Box::pin(Runner::prefetch(self, job_id, ai))
    }
    fn run<'a>(
        &'a self,
        input: Value,
        ctx: &'a mut JobContext,
        ai: &'a Services,
        prefetched: Prefetched,
    ) -> BoxFuture<'a, Result<Ran, JobFailure>> {
        Box::pin(async move {
            // Checked at submission: a failure here means the job can never run (the kind's
            // input changed since).
            let input = kinds::parse::<R::Input>(&input).map_err(JobFailure::Fatal)?;
            Runner::run(self, input, ctx, ai, prefetched).await
        })
    }
}

/// Every kind this worker runs.
pub static RUNNERS: &[&dyn AnyRunner] = &[
    &echo::Echo,
    &sleep::Sleep,
    &fail::Fail,
    &chain::Chain,
    &chat::Chat,
    &image::ImageKind,
    &agent::Agent,
    &ledger_expire::LedgerExpire,
];

/// The runner of `kind`.
pub fn runner(kind: &str) -> Option<&'static dyn AnyRunner> {
    RUNNERS.iter().copied().find(|r| r.kind().name == kind)
}

/// Reads what `kind` will read first (see [`Runner::prefetch`]).
pub async fn prefetch(kind: &str, job_id: &str, ai: &Services) -> Prefetched {
    match runner(kind) {
        Some(r) => r.prefetch(job_id, ai).await,
        None => None,
    }
}

/// Runs one attempt of `kind`.
pub async fn run(
    kind: &str,
    input: Value,
    ctx: &mut JobContext,
    ai: &Services,
    prefetched: Prefetched,
) -> Result<Ran, JobFailure> {
    match runner(kind) {
        Some(r) => r.run(input, ctx, ai, prefetched).await,
        None => Err(JobFailure::Fatal(format!(
            "this worker does not know job kind {kind:?}"
        ))),
    }
}

/// How a provider's failure ends the attempt: retried when another try may work, dead
/// otherwise.
fn provider_failure(e: AiError) -> JobFailure {
    match e {
        AiError::Retryable(m) => JobFailure::Retryable(m),
        other => JobFailure::Fatal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_exactly_one_runner() {
        for kind in kinds::REGISTRY {
            let n = RUNNERS
                .iter()
                .filter(|r| r.kind().name == kind.name)
                .count();
            assert_eq!(n, 1, "kind {} has {n} runners", kind.name);
        }
        assert_eq!(RUNNERS.len(), kinds::REGISTRY.len());
    }
}
