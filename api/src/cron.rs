//! `GET /v1/admin/cron`: every schedule (the platform's own first) with its expression, time
//! zone, next tick and last tick (its job and that job's status). Admins only.

use axum::{Json, Router, extract::State, routing::get};
use serde::Serialize;
use tally_workflows::cron::{self, ScheduleView};

use crate::{AppState, auth::Admin, error::ApiError};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/admin/cron", get(list))
}

#[derive(Serialize)]
struct Schedules {
    schedules: Vec<ScheduleView>,
}

async fn list(State(state): State<AppState>, Admin(_): Admin) -> Result<Json<Schedules>, ApiError> {
    // The configuration was validated with the same rule at start.
    let schedules = cron::schedules(&state.cfg).map_err(|e| ApiError::internal(&e))?;
    Ok(Json(Schedules {
        schedules: cron::overview(&state.db, &schedules).await?,
    }))
}
