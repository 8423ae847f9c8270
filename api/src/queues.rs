//! `/v1/admin/queues`: each queue's depth, running jobs, oldest waiting job and pause switch.
//! Admins only.

use axum::{
    Json, Router,
    extract::{FromRequestParts, State},
    http::request::Parts,
    routing::{get, post},
};
use serde::Serialize;
use tally_workflows::{
    config::QUEUES,
    queues::{self, QueueView},
};

use crate::{AppState, auth::Admin, error::ApiError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/queues", get(list))
        .route("/v1/admin/queues/{name}/pause", post(pause))
        .route("/v1/admin/queues/{name}/resume", post(resume))
}

#[derive(Serialize)]
struct Queues {
    queues: Vec<QueueView>,
}

/// A queue name from the path: one Tally knows, or 404.
struct QueueName(&'static str);

impl<S: Send + Sync> FromRequestParts<S> for QueueName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::bad_request(e.body_text()))?;
        queues::lookup(&raw).map(QueueName).ok_or_else(|| {
            ApiError::not_found(format!(
                "no queue named {raw:?}; known queues: {}",
                QUEUES.join(", ")
            ))
        })
    }
}

async fn list(State(state): State<AppState>, Admin(_): Admin) -> Result<Json<Queues>, ApiError> {
    Ok(Json(Queues {
        queues: queues::overview(&state.db).await?,
    }))
}

/// The queue as it is after the change.
async fn view(state: &AppState, name: &str) -> Result<Json<QueueView>, ApiError> {
    queues::overview(&state.db)
        .await?
        .into_iter()
        .find(|q| q.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no queue named {name:?}")))
}

/// Pauses the queue: workers stop fetching its tasks within about a second; jobs already
/// running finish. Pausing a paused queue changes nothing.
async fn pause(
    State(state): State<AppState>,
    Admin(admin): Admin,
    QueueName(name): QueueName,
) -> Result<Json<QueueView>, ApiError> {
    queues::pause(&state.db, name, &admin.id).await?;
    tracing::info!(queue = name, admin = %admin.id, "queue paused");
    view(&state, name).await
}

/// Resumes the queue: workers fetch its tasks again within about a second.
async fn resume(
    State(state): State<AppState>,
    Admin(admin): Admin,
    QueueName(name): QueueName,
) -> Result<Json<QueueView>, ApiError> {
    queues::resume(&state.db, name).await?;
    tracing::info!(queue = name, admin = %admin.id, "queue resumed");
    view(&state, name).await
}
