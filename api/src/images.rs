//! Image generation: a request becomes an `image` job that holds the estimated credits; the
//! bytes are served from the image folder.

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_workflows::{
    ai::{self, ModelKind},
    images,
    jobs::{self, NewJob},
};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiJson, ApiQuery, parse_id},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/images/generate", post(generate))
        .route("/v1/images/generate/{job_id}", get(generation))
        .route("/v1/images", get(list))
        .route("/v1/images/{id}/content", get(content))
        .route("/v1/images/{id}", axum::routing::delete(remove))
}

const SIZES: [&str; 4] = ["256x256", "512x512", "1024x1024", "auto"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    prompt: String,
    model: Option<String>,
    size: Option<String>,
    n: Option<u32>,
}

async fn generate(
    State(state): State<AppState>,
    Caller(user): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<GenerateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    crate::extract::text("prompt", &body.prompt, 4000)?;
    let size = body.size.unwrap_or_else(|| "1024x1024".to_owned());
    if !SIZES.contains(&size.as_str()) {
        return Err(ApiError::invalid(format!(
            "size must be one of {}",
            SIZES.join(", ")
        )));
    }
    let n = body.n.unwrap_or(1);
    if !(1..=10).contains(&n) {
        return Err(ApiError::invalid("n must be between 1 and 10"));
    }
    let preferred = ai::preferences(&state.db, &user.id).await?.image_model;
    let model = crate::models::pick(
        &state.catalog,
        ModelKind::Image,
        body.model.or(preferred).as_deref(),
    )?;
    let estimate = model.image_cost(n);
    let input = json!({
        "prompt": body.prompt, "model": model.id, "size": size, "n": n, "user_id": user.id,
    });
    let new = NewJob {
        user_id: user.id.clone(),
        kind: tally_workflows::images::KIND.name.to_owned(),
        queue: tally_workflows::images::KIND.queue,
        input: input.clone(),
        priority: 0,
        run_at_ms: None,
        max_attempts: state.cfg.jobs.default_max_attempts,
        idempotency_key: crate::extract::idempotency_key(&headers)?,
        request_hash: crate::extract::request_hash(&input),
        price: estimate,
        id: None,
        rows: Vec::new(),
    };
    let (job, _) = state.submissions.call(new).await??;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "job_id": job.id,
            "status": job.status,
            "model": model.id,
            "estimate": { "n": n, "credits": estimate },
        })),
    ))
}

async fn generation(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw).ok_or_else(|| {
        ApiError::bad_request(format!("{raw:?} is not a job id (job ids are UUIDs)"))
    })?;
    let job = jobs::get(&state.db, &id, &user).await?;
    if job.kind != tally_workflows::images::KIND.name {
        return Err(ApiError::not_found("no image generation with this job id"));
    }
    let made = images::of_job(&state.db, &job.id).await?;
    let cost = crate::jobs::cost(&state, &job).await?;
    Ok(Json(json!({
        "job_id": job.id,
        "status": job.status,
        "error": job.error,
        "cost": cost,
        "images": made.iter().map(images::Image::view).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    cursor: Option<String>,
    limit: Option<u32>,
}

fn image_id(raw: &str) -> Result<&str, ApiError> {
    if raw.is_empty()
        || raw.len() > 100
        || !raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ApiError::not_found("no image with this id"));
    }
    Ok(raw)
}

async fn list(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let before = match &p.cursor {
        Some(c) => {
            Some(image_id(c).map_err(|_| ApiError::bad_request("cursor must be a next_cursor"))?)
        }
        None => None,
    };
    let (rows, next) = images::list(&state.db, &user.id, before, p.limit.unwrap_or(50)).await?;
    Ok(Json(json!({
        "images": rows.iter().map(images::Image::view).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

async fn content(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let image = images::get(&state.db, image_id(&raw)?, &user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("no image with this id"))?;
    let path = state.cfg.image_dir().join(&image.file);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found("the image's file is gone"));
        }
        Err(e) => return Err(ApiError::internal(&format!("{}: {e}", path.display()))),
    };
    let mut resp = Body::from(bytes).into_response();
    let ct = HeaderValue::from_str(&image.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    Ok(resp)
}

async fn remove(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let image = images::delete(&state.db, image_id(&raw)?, &user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("no image with this id"))?;
    let path = state.cfg.image_dir().join(&image.file);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, path = %path.display(), "image file not removed"),
    }
    Ok(StatusCode::NO_CONTENT)
}
