//! Extractors whose rejections answer as problem+json and say what was wrong.

use axum::{
    extract::{
        FromRequest, FromRequestParts, Request,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{StatusCode, request::Parts},
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `axum::Json`, with malformed JSON → 400, wrong types or unknown fields → 422, a missing
/// content type → 415 and a body over the limit → 413.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    let status = rej.status();
    let detail = rej.body_text();
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(status, "payload-too-large", detail),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "unsupported-media-type",
            "send the body as JSON with Content-Type: application/json",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::invalid(detail),
        _ => ApiError::bad_request(detail),
    }
}

/// `axum::extract::Query`, with bad parameters → 400.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rej @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(ApiError::bad_request(rej.body_text()))
            }
            Err(rej) => Err(ApiError::bad_request(rej.body_text())),
        }
    }
}

/// A job id from the path: a UUID, or 400.
pub struct JobId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::bad_request(e.body_text()))?;
        parse_id(&raw).map(JobId).ok_or_else(|| {
            ApiError::bad_request(format!("{raw:?} is not a job id (job ids are UUIDs)"))
        })
    }
}

/// A UUID in its canonical lowercase form, or `None`.
pub fn parse_id(raw: &str) -> Option<String> {
    uuid::Uuid::parse_str(raw).ok().map(|u| u.to_string())
}

/// Checks free text a user sends to be stored (a message, a goal, a prompt): 1 to `max`
/// characters, and no control characters other than line breaks and tabs (Postgres cannot
/// store NUL at all).
pub fn text(name: &str, value: &str, max: usize) -> Result<(), crate::ApiError> {
    if value.trim().is_empty() || value.chars().count() > max {
        return Err(crate::ApiError::invalid(format!(
            "{name} must be 1 to {max} characters"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(crate::ApiError::invalid(format!(
            "{name} must not contain control characters other than line breaks and tabs"
        )));
    }
    Ok(())
}

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The request's `Idempotency-Key`, if it sent one: 1 to 255 printable ASCII characters.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, crate::ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = v.to_str().ok().map(str::trim).unwrap_or_default();
    if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || !k.chars().all(|c| c.is_ascii_graphic()) {
        return Err(crate::ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )));
    }
    Ok(Some(k.to_owned()))
}

/// SHA-256 (hex) of a request's canonical JSON: tells a replay under an idempotency key from a
/// different request.
pub fn request_hash(request: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(request.to_string().as_bytes()))
}
