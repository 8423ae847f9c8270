//! Tally's HTTP API.
//!
//! # Layout
//! - [`error`]: [`ApiError`], the one error type; every 4xx/5xx is `application/problem+json`.
//! - [`extract`]: JSON, query and path extractors whose rejections answer in that format.
//! - [`auth`]: bearer API keys → [`Caller`]; admin-only routes take [`Admin`].
//! - [`jobs`], [`chat`], [`images`], [`credits`], [`ledger`], [`models`], [`users`], [`health`]: one router per area, merged in
//!   [`router`].
//! - [`events`]: live events (SSE) of one job and of all the caller's jobs, pushed.
//! - [`queues`]: the admin's view of the queues, and their pause switch.
//! - [`cron`]: the admin's view of the cron schedules.

pub mod auth;
pub mod chat;
pub mod credits;
pub mod cron;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod images;
pub mod jobs;
pub mod ledger;
pub mod models;
pub mod queues;
pub mod users;

use std::{future::Future, sync::Arc};

use axum::{Router, extract::DefaultBodyLimit};
use tally_workflows::{
    Db,
    batch::Batcher,
    config::Config,
    jobs::{Job, JobError, NewJob},
    ledger::log::Keys,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::{Admin, Caller};
pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub cfg: Arc<Config>,
    /// Submissions from all concurrent requests, group-committed.
    pub submissions: Batcher<NewJob, Result<(Job, bool), JobError>>,
    /// Chat questions from all concurrent requests, group-committed with their jobs.
    pub questions: Batcher<
        tally_workflows::chat::Question,
        Result<(tally_workflows::chat::Message, Job), JobError>,
    >,
    /// What concurrent questions need read (their conversations, preferences and history
    /// sizes), read together.
    pub question_contexts:
        Batcher<tally_workflows::chat::Asker, Option<tally_workflows::chat::QuestionContext>>,
    /// Ledger operations from all concurrent requests, group-committed.
    pub ledger: tally_workflows::ledger::Writer,
    /// The ledger's signing key (if this process signs) and trusted public keys.
    pub ledger_keys: Arc<Keys>,
    /// The AI models users can pick, with their prices.
    pub catalog: Arc<tally_workflows::ai::Catalog>,
    /// Valid API keys seen lately.
    pub keys: Arc<auth::KeyCache>,
    /// Cancelled when the server starts shutting down: event streams end, so graceful shutdown
    /// does not wait on a client that follows a long job.
    pub stopping: CancellationToken,
}

/// Most submissions (or ledger operations) written in one transaction.
const MAX_SUBMIT_BATCH: usize = 256;
/// Ledger transactions in flight at once on Postgres.
const LEDGER_SHARDS: usize = 4;

impl AppState {
    /// Must be called inside a Tokio runtime: it starts the batchers.
    pub fn new(db: Db, cfg: Config, ledger_keys: Keys) -> AppState {
        let submissions = Batcher::spawn_with(
            db.clone(),
            MAX_SUBMIT_BATCH,
            |db: Db, jobs: Vec<NewJob>| async move {
                tally_workflows::jobs::submit_many(&db, jobs).await
            },
        );
        let ledger = tally_workflows::ledger::Writer::spawn(&db, LEDGER_SHARDS, MAX_SUBMIT_BATCH);
        let questions = Batcher::spawn_with(
            db.clone(),
            MAX_SUBMIT_BATCH,
            |db: Db, qs: Vec<tally_workflows::chat::Question>| async move {
                tally_workflows::chat::ask_many(&db, qs).await
            },
        );
        let question_contexts = Batcher::spawn_with(
            db.clone(),
            MAX_SUBMIT_BATCH,
            |db: Db, askers: Vec<tally_workflows::chat::Asker>| async move {
                tally_workflows::chat::question_contexts(&db, askers).await
            },
        );
        // The configuration was validated with the same rule, so this cannot fail here; if it
        // did, the offline models are the safe catalog (they never reach the network).
        let catalog = tally_workflows::ai::Catalog::from_config(&cfg.ai)
            .unwrap_or_else(|_| tally_workflows::ai::Catalog::offline());
        let stopping = CancellationToken::new();
        // On Postgres, this process' one listener for other processes' job changes.
        tally_workflows::events::listen(&db, stopping.clone());
        AppState {
            db,
            catalog: Arc::new(catalog),
            cfg: Arc::new(cfg),
            submissions,
            questions,
            question_contexts,
            ledger,
            ledger_keys: Arc::new(ledger_keys),
            keys: Arc::default(),
            stopping,
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let limit = state.cfg.api.body_limit;
    Router::new()
        .merge(health::router())
        .merge(jobs::router())
        .merge(events::router())
        .merge(credits::router())
        .merge(ledger::router())
        .merge(models::router())
        .merge(chat::router())
        .merge(images::router())
        .merge(users::router())
        .merge(queues::router())
        .merge(cron::router())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            error::panicked,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http().on_failure(on_failure))
        .with_state(state)
}

/// A server error answered: logged, except `503`s (an outage is logged once, by
/// `tally_workflows::outage`, not once per refused request).
fn on_failure(
    class: tower_http::classify::ServerErrorsFailureClass,
    latency: std::time::Duration,
    _: &tracing::Span,
) {
    use tower_http::classify::ServerErrorsFailureClass::StatusCode as Status;
    let latency_ms = latency.as_millis() as u64;
    if matches!(class, Status(s) if s == axum::http::StatusCode::SERVICE_UNAVAILABLE) {
        tracing::debug!(latency_ms, "answered 503");
    } else {
        tracing::error!(classification = %class, latency_ms, "response failed");
    }
}

/// Serves the API on `listener` until `shutdown` resolves; requests in flight are finished.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = state.stopping.clone();
    // No Nagle: an event stream writes one small frame per change, and without this the
    // second of two frames waits for the client's delayed ACK (40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.cancel();
        })
        .await
}
