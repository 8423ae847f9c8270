//! The API's one error type. Each error is answered as an RFC 9457 problem document; server
//! faults are logged with their cause and answered without it.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;
use tally_workflows::{DbError, jobs::JobError, ledger::LedgerError, users::UserError};

/// The problem slug of a request refused because the database is unreachable.
pub const UNAVAILABLE: &str = "database-unavailable";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Short machine-readable name; the problem `type` is `https://tally.dev/problems/<slug>`.
    pub slug: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            slug,
            detail: detail.into(),
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
            detail,
        )
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    /// The database could not be reached: `503`, to be tried again shortly. Logged once per
    /// outage (see `tally_workflows::outage`), not once per request.
    pub fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tally_workflows::outage::lost("the API", cause);
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            UNAVAILABLE,
            "the database is unreachable; try again shortly",
        )
    }
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle this request; it has been logged",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = json!({
            "type": format!("https://tally.dev/problems/{}", self.slug),
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut resp = (self.status, body.to_string()).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.slug == UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            return ApiError::unavailable(&e);
        }
        ApiError::internal(&e)
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotFound => ApiError::not_found("no job with this id"),
            JobError::IdempotencyConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency-conflict", e.to_string())
            }
            JobError::Conflict(msg) => ApiError::conflict(msg),
            JobError::InsufficientCredits { .. } => insufficient(e.to_string()),
            JobError::Db(e) => e.into(),
        }
    }
}

fn insufficient(detail: String) -> ApiError {
    ApiError::new(StatusCode::PAYMENT_REQUIRED, "insufficient-credits", detail)
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InsufficientCredits { .. } => insufficient(e.to_string()),
            LedgerError::TransferConflict(_) | LedgerError::ReservationConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency-conflict", e.to_string())
            }
            LedgerError::NotFound => ApiError::not_found("no reservation with this id"),
            LedgerError::Closed { .. } => {
                ApiError::new(StatusCode::CONFLICT, "reservation-closed", e.to_string())
            }
            LedgerError::Invalid(msg) => ApiError::invalid(msg),
            LedgerError::Db(e) => e.into(),
        }
    }
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::EmailTaken(_) => ApiError::conflict(e.to_string()),
            UserError::Invalid(msg) => ApiError::invalid(msg),
            UserError::Db(e) => e.into(),
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not take that method",
    )
}

pub fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal(&"handler panicked").into_response()
}
