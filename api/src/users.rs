//! `POST /v1/users` (admin): create a user and return their API key, once.

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_workflows::users::{self, Role};

use crate::{AppState, auth::Admin, error::ApiError, extract::ApiJson};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/users", post(create))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    email: String,
    role: Option<String>,
}

async fn create(
    State(state): State<AppState>,
    Admin(_): Admin,
    ApiJson(body): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let role = match body.role.as_deref() {
        None => Role::User,
        Some(r) => Role::parse(r).ok_or_else(|| {
            ApiError::invalid(format!("role must be \"user\" or \"admin\", not {r:?}"))
        })?,
    };
    let user = users::create(&state.db, &body.email, role, None).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": user.id, "email": user.email, "role": user.role, "api_key": user.api_key }),
        ),
    ))
}
