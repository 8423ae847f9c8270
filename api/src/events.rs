//! Live events over server-sent events: one job's (`GET /v1/jobs/{id}/events`) and all of the
//! caller's jobs' (`GET /v1/events`). Both send a `status` event with the job's whole view each
//! time it changes: the view `GET /v1/jobs/{id}` answers, with its cost and cron tick.
//!
//! Changes are pushed (`tally_workflows::events`: an in-process broadcast fed after each
//! commit, and on Postgres the `tally_jobs` notifications of every process). Each stream also
//! looks for itself every `api.events_poll_ms` (1 s by default), the fallback for a change it
//! was not told about: one made by another process on SQLite, one that committed while the
//! Postgres listener was reconnecting, or one it missed by falling behind the broadcast.

use std::{collections::HashMap, convert::Infallible, time::Duration};

use axum::{
    Router,
    extract::State,
    response::{
        IntoResponse,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use serde_json::json;
use tally_workflows::{
    events::{self, Change},
    jobs::{self, Job, JobError},
};
use tokio::sync::broadcast::{Receiver, error::RecvError};

use crate::{AppState, auth::Caller, error::ApiError, extract::JobId};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/events", get(user_events))
}

/// How far back the fallback poll of `/v1/events` looks before the newest change it saw: a
/// change written (its `updated_at`) before another but committed after it is still found.
const POLL_SLACK_MS: i64 = 5_000;
/// Most jobs one fallback poll of `/v1/events` reads (the newest changes first).
const POLL_LIMIT: i64 = 1_000;

/// What woke a stream up.
enum Wake {
    /// These jobs changed.
    Jobs(Vec<String>),
    /// Anything may have changed (the fallback poll is due, the stream fell behind, or the
    /// listener reconnected): look for yourself.
    Look,
}

/// Waits for a change `wanted` picks (all the changes already waiting are taken together), or
/// until the fallback poll is `due`.
async fn next_wake(
    changes: &mut Receiver<Change>,
    due: tokio::time::Instant,
    wanted: impl Fn(&str) -> bool,
) -> Wake {
    let due = tokio::time::sleep_until(due);
    tokio::pin!(due);
    let mut ids = Vec::new();
    loop {
        let change = if ids.is_empty() {
            tokio::select! {
                () = &mut due => return Wake::Look,
                change = changes.recv() => change,
            }
        } else {
            match changes.try_recv() {
                Ok(c) => Ok(c),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(RecvError::Lagged(n))
                }
                Err(_) => return Wake::Jobs(ids),
            }
        };
        match change {
            Ok(Change::Jobs(changed)) => {
                ids.extend(changed.iter().filter(|id| wanted(id)).cloned());
            }
            Ok(Change::Unknown) | Err(RecvError::Lagged(_)) => return Wake::Look,
            // The broadcast lives as long as the process: this does not happen. Poll only.
            Err(RecvError::Closed) => {
                due.await;
                return Wake::Look;
            }
        }
    }
}

fn status_event(view: &str) -> Event {
    Event::default().event("status").data(view)
}

fn error_event(e: &dyn std::fmt::Display) -> Event {
    Event::default()
        .event("error")
        .data(json!({ "detail": e.to_string() }).to_string())
}

/// Whether a stream should keep going after this error (the database is away for a while).
fn passing(e: &JobError) -> bool {
    matches!(e, JobError::Db(d) if d.is_unavailable())
}

/// One job: a `status` event with the job now, then one each time it changes; the stream ends
/// after a terminal state.
async fn job_events(
    State(state): State<AppState>,
    Caller(user): Caller,
    JobId(id): JobId,
) -> Result<impl IntoResponse, ApiError> {
    // Subscribed before the first read: a change committed after it is not missed.
    let mut changes = events::subscribe();
    let first = jobs::get(&state.db, &id, &user).await?;
    let poll = Duration::from_millis(state.cfg.api.events_poll_ms);
    let stopping = state.stopping.clone();
    let db = state.db.clone();
    let stream = async_stream::stream! {
        let state = state;
        let mut sent: Option<String> = None;
        let mut next: Option<Job> = Some(first);
        loop {
            let job = match next.take() {
                Some(job) => Ok(job),
                None => jobs::get(&db, &id, &user).await,
            };
            match job {
                Ok(job) => match crate::jobs::full_view(&state, &job).await {
                    Ok(view) => {
                        let view = view.to_string();
                        if sent.as_deref() != Some(view.as_str()) {
                            yield Ok::<_, Infallible>(status_event(&view));
                            if job.status().is_terminal() {
                                break;
                            }
                            sent = Some(view);
                        }
                    }
                    // Read again at the next wake, once the database answers.
                    Err(e) if e.is_unavailable() => {}
                    Err(e) => {
                        yield Ok(error_event(&e));
                        break;
                    }
                },
                Err(e) if passing(&e) => {}
                Err(e) => {
                    yield Ok(error_event(&e));
                    break;
                }
            }
            let due = tokio::time::Instant::now() + poll;
            let _ = next_wake(&mut changes, due, |changed| changed == id).await;
        }
    };
    let stream = futures::StreamExt::take_until(stream, stopping.cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// All the caller's jobs (an admin's too: their own, not everyone's): a `status` event with a
/// job's view each time one of them changes or a new one is submitted, from the moment the
/// stream is open (it sends no backlog: list `GET /v1/jobs` for the state before). It ends
/// only when the server stops.
async fn user_events(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<impl IntoResponse, ApiError> {
    let mut changes = events::subscribe();
    let poll = Duration::from_millis(state.cfg.api.events_poll_ms);
    let stopping = state.stopping.clone();
    let db = state.db.clone();
    let stream = async_stream::stream! {
        let state = state;
        // The view last sent of each job changed lately (kept while the fallback poll may
        // read it again), so a job read twice is sent once.
        let mut sent: HashMap<String, (i64, String)> = HashMap::new();
        // When the last fallback poll ran (or the stream opened): the next one reads the jobs
        // changed since then, less `POLL_SLACK_MS`.
        let mut polled = tally_workflows::now_ms();
        let mut due = tokio::time::Instant::now() + poll;
        'stream: loop {
            let read = match next_wake(&mut changes, due, |_| true).await {
                Wake::Jobs(ids) => events::jobs_of(&db, &user.id, &ids).await,
                Wake::Look => {
                    let since = polled - POLL_SLACK_MS;
                    polled = tally_workflows::now_ms();
                    due = tokio::time::Instant::now() + poll;
                    events::changed_since(&db, &user.id, since, POLL_LIMIT).await
                }
            };
            let mut jobs = match read {
                Ok(jobs) => jobs,
                Err(e) if e.is_unavailable() => continue,
                Err(e) => {
                    yield Ok::<_, Infallible>(error_event(&e));
                    break;
                }
            };
            jobs.sort_by_key(|j| j.updated_at);
            for job in jobs {
                let view = match crate::jobs::full_view(&state, &job).await {
                    Ok(view) => view.to_string(),
                    // The database went away between the two reads: this change is passed
                    // over; the next one of the job is sent.
                    Err(e) if e.is_unavailable() => continue,
                    Err(e) => {
                        yield Ok(error_event(&e));
                        break 'stream;
                    }
                };
                if sent.get(&job.id).is_some_and(|(_, v)| *v == view) {
                    continue;
                }
                yield Ok(status_event(&view));
                sent.insert(job.id, (job.updated_at, view));
            }
            let keep_from = polled - POLL_SLACK_MS;
            sent.retain(|_, (at, _)| *at >= keep_from);
        }
    };
    let stream = futures::StreamExt::take_until(stream, stopping.cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
