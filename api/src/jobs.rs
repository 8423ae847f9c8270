//! The job API: submit, poll, list, cancel, retry (a job's live events: [`crate::events`]).

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_workflows::{
    DbError, cron,
    jobs::{self, Job, ListFilter, NewJob, Status},
    kinds,
    users::{PLATFORM_USER_ID, Role},
};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiJson, ApiQuery, JobId, parse_id},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/retry", post(retry))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitJob {
    kind: String,
    #[serde(default)]
    input: Value,
    priority: Option<i64>,
    run_at: Option<String>,
    max_attempts: Option<i64>,
}

async fn submit(
    State(state): State<AppState>,
    Caller(user): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SubmitJob>,
) -> Result<Response, ApiError> {
    let key = crate::extract::idempotency_key(&headers)?;
    let spec = kinds::lookup(&body.kind).ok_or_else(|| {
        ApiError::invalid(
            kinds::validate_input(&body.kind, &body.input)
                .err()
                .unwrap_or_default(),
        )
    })?;
    if !spec.public {
        return Err(ApiError::invalid(format!(
            "{:?} jobs are made by {}, not through POST /v1/jobs",
            spec.name, spec.made_by
        )));
    }
    spec.check(&body.input).map_err(ApiError::invalid)?;
    let priority = match body.priority {
        None => 0,
        Some(p @ 0..=100) => p as i32,
        Some(p) => {
            return Err(ApiError::invalid(format!(
                "priority must be between 0 and 100, not {p}"
            )));
        }
    };
    let max_attempts = match body.max_attempts {
        None => state.cfg.jobs.default_max_attempts,
        Some(n @ 1..=100) => n as u32,
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "max_attempts must be between 1 and 100, not {n}"
            )));
        }
    };
    let run_at_ms = match &body.run_at {
        None => None,
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| {
                    ApiError::invalid(format!(
                        "run_at must be an RFC 3339 timestamp such as 2030-01-01T00:00:00Z ({e})"
                    ))
                })?
                .timestamp_millis(),
        ),
    };
    let canonical = json!({
        "kind": body.kind, "input": body.input, "priority": priority,
        "run_at": run_at_ms, "max_attempts": body.max_attempts,
    });
    let new = NewJob {
        user_id: user.id.clone(),
        kind: body.kind,
        queue: spec.queue,
        input: body.input,
        priority,
        run_at_ms,
        max_attempts,
        idempotency_key: key,
        request_hash: crate::extract::request_hash(&canonical),
        // Kinds users may submit are priced by the table; usage-priced kinds have their own
        // endpoints, which hold their estimates.
        price: match spec.price {
            kinds::PriceRule::Table => state.cfg.price(spec.name),
            kinds::PriceRule::Usage => 0,
        },
        id: None,
        rows: Vec::new(),
    };
    let (job, created) = state.submissions.call(new).await??;
    let mut resp = (StatusCode::ACCEPTED, Json(with_cost(&state, &job).await?)).into_response();
    if !created {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// The job with what it cost: credits held and settled, and the ledger transfers (each linking
/// its log entry's inclusion proof). A free job costs nothing and needs no lookup.
async fn with_cost(state: &AppState, job: &Job) -> Result<Value, ApiError> {
    Ok(full_view(state, job).await?)
}

/// A job's whole view, as `GET /v1/jobs/{id}` and the event streams show it.
pub(crate) async fn full_view(state: &AppState, job: &Job) -> Result<Value, DbError> {
    let ticks = cron_ticks(state, std::slice::from_ref(job)).await?;
    let mut view = with_tick(job.view(), job, &ticks);
    view["cost"] = cost(state, job).await?;
    Ok(view)
}

/// The cron ticks that made these jobs, by job id. Only the platform's jobs can have one, so
/// other users' lists and polls read nothing more.
async fn cron_ticks(
    state: &AppState,
    page: &[Job],
) -> Result<std::collections::HashMap<String, (String, i64)>, DbError> {
    let ids: Vec<&str> = page
        .iter()
        .filter(|j| j.user_id == PLATFORM_USER_ID)
        .map(|j| j.id.as_str())
        .collect();
    cron::ticks_of(&state.db, &ids).await
}

/// A cron job's view gains `"cron": {"name", "tick"}`.
fn with_tick(
    mut view: Value,
    job: &Job,
    ticks: &std::collections::HashMap<String, (String, i64)>,
) -> Value {
    if let Some((name, tick)) = ticks.get(&job.id) {
        view["cron"] = cron::tick_view(name, *tick);
    }
    view
}

/// What a job cost (`{"reserved", "settled", "transfers"}`).
pub(crate) async fn cost(state: &AppState, job: &Job) -> Result<Value, DbError> {
    Ok(if job.shows_cost() {
        tally_workflows::ledger::job_cost(&state.db, &job.id).await?
    } else {
        json!({ "reserved": 0, "settled": 0, "transfers": [] })
    })
}

async fn show(
    State(state): State<AppState>,
    Caller(user): Caller,
    JobId(id): JobId,
) -> Result<Json<Value>, ApiError> {
    let job = jobs::get(&state.db, &id, &user).await?;
    Ok(Json(with_cost(&state, &job).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    kind: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

async fn list(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let status = match p.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status must be one of {}, not {s:?}",
                Status::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?),
    };
    let before = match p.cursor.as_deref() {
        None => None,
        Some(c) => Some(parse_id(c).ok_or_else(|| {
            ApiError::bad_request(format!("{c:?} is not a cursor from a previous page"))
        })?),
    };
    let limit = match p.limit {
        None => 50,
        Some(n @ 1..=200) => n,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and 200, not {n}"
            )));
        }
    };
    if let Some(k) = p.kind.as_deref()
        && kinds::lookup(k).is_none()
    {
        return Err(ApiError::bad_request(format!(
            "kind must be one of {}, not {k:?}",
            kinds::names().join(", ")
        )));
    }
    let filter = ListFilter {
        status,
        kind: p.kind,
        before,
        limit,
    };
    // An admin lists every user's jobs (the platform's cron jobs among them).
    let owner = (user.role != Role::Admin).then_some(user.id.as_str());
    let (page, next) = jobs::list(&state.db, owner, &filter).await?;
    let ticks = cron_ticks(&state, &page).await?;
    Ok(Json(json!({
        "jobs": page.iter().map(|j| with_tick(j.view(), j, &ticks)).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

async fn cancel(
    State(state): State<AppState>,
    Caller(user): Caller,
    JobId(id): JobId,
) -> Result<Json<Value>, ApiError> {
    let job = jobs::cancel(&state.db, &id, &user).await?;
    Ok(Json(with_cost(&state, &job).await?))
}

async fn retry(
    State(state): State<AppState>,
    Caller(user): Caller,
    JobId(id): JobId,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let job = jobs::retry(&state.db, &id, &user).await?;
    Ok((StatusCode::ACCEPTED, Json(with_cost(&state, &job).await?)))
}
