//! `/healthz`: the process answers. `/readyz`: the database answers and is migrated.

use std::time::Duration;

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use crate::{AppState, error::ApiError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// How long `/readyz` waits for the database. A healthy one answers in milliseconds; a server
/// that is down would otherwise hold the probe for the whole pool acquire timeout.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let Ok(ready) = tokio::time::timeout(READY_TIMEOUT, state.db.ready()).await else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            format!("the database did not answer within {READY_TIMEOUT:?}"),
        ));
    };
    match ready {
        Ok(true) => Ok(Json(
            json!({ "status": "ready", "database": state.db.backend().name() }),
        )),
        Ok(false) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "migrations are not applied; run `tally migrate`",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            format!("database unreachable: {e}"),
        )),
    }
}
