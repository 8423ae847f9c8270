//! Credits: balance, history, reservations, the welcome bonus, analytics, and admin grants and
//! adjustments. Every movement is a ledger transfer, signed into the log.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_ledger::accounts;
use tally_workflows::{
    ledger::{self, Done, HistoryFilter, Op, TransferSpec},
    now_ms, users,
};

use crate::{
    AppState,
    auth::{Admin, Caller},
    error::ApiError,
    extract::{ApiJson, ApiQuery},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/credits/balance", get(balance))
        .route("/v1/credits/history", get(history))
        .route("/v1/credits/analytics", get(analytics))
        .route("/v1/credits/reserve", post(reserve))
        .route("/v1/credits/reservations/{id}", get(show_reservation))
        .route("/v1/credits/reservations/{id}/settle", post(settle))
        .route("/v1/credits/reservations/{id}/release", post(release))
        .route("/v1/credits/welcome-bonus", post(welcome_bonus))
        .route("/v1/admin/credits/grant", post(grant))
        .route("/v1/admin/credits/adjust", post(adjust))
}

/// The largest amount one request may move: far above any real use, far below overflow.
const MAX_AMOUNT: i64 = 1_000_000_000_000;

fn amount_in_range(name: &str, amount: i64, min: i64) -> Result<i64, ApiError> {
    if amount < min || amount > MAX_AMOUNT {
        return Err(ApiError::invalid(format!(
            "{name} must be a whole number of credits between {min} and {MAX_AMOUNT}, not {amount}"
        )));
    }
    Ok(amount)
}

async fn balance(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Json<Value>, ApiError> {
    let (available, held) = ledger::balance(&state.db, &user.id).await?;
    Ok(Json(json!({
        "user_id": user.id,
        "available": available,
        "held": held,
        "total": available + held,
        "unit": "credit",
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    kind: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

fn parse_time(name: &str, t: &Option<String>) -> Result<Option<i64>, ApiError> {
    t.as_deref()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| d.timestamp_millis())
                .map_err(|e| {
                    ApiError::bad_request(format!(
                        "{name} must be an RFC 3339 timestamp such as 2030-01-01T00:00:00Z ({e})"
                    ))
                })
        })
        .transpose()
}

const TRANSFER_KINDS: [&str; 8] = [
    "grant", "bonus", "adjust", "reserve", "settle", "refund", "release", "expire",
];

async fn history(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiQuery(p): ApiQuery<HistoryParams>,
) -> Result<Json<Value>, ApiError> {
    if let Some(kind) = &p.kind
        && !TRANSFER_KINDS.contains(&kind.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "unknown transfer kind {kind:?}; kinds: {}",
            TRANSFER_KINDS.join(", ")
        )));
    }
    let before = match &p.cursor {
        None => None,
        Some(c) => {
            let parsed = c
                .split_once(':')
                .filter(|(_, id)| id.chars().all(|ch| ch.is_ascii_graphic()))
                .and_then(|(at, id)| at.parse::<i64>().ok().map(|at| (at, id.to_owned())));
            Some(parsed.ok_or_else(|| {
                ApiError::bad_request("cursor must be a next_cursor from an earlier page")
            })?)
        }
    };
    let filter = HistoryFilter {
        kind: p.kind,
        since_ms: parse_time("since", &p.since)?,
        until_ms: parse_time("until", &p.until)?,
        before,
        limit: p.limit.unwrap_or(50),
    };
    let (rows, next) = ledger::history(&state.db, &user.id, &filter).await?;
    let available = accounts::available(&user.id);
    let items: Vec<Value> = rows
        .iter()
        .map(|t| {
            let mut v = t.view();
            // How the transfer changed the caller's available credits.
            let delta = if t.credit == available {
                t.amount
            } else if t.debit == available {
                -t.amount
            } else {
                0
            };
            v["available_delta"] = json!(delta);
            v
        })
        .collect();
    Ok(Json(json!({ "items": items, "next_cursor": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalyticsParams {
    days: Option<u32>,
}

async fn analytics(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiQuery(p): ApiQuery<AnalyticsParams>,
) -> Result<Json<Value>, ApiError> {
    let days = p.days.unwrap_or(30);
    if !(1..=366).contains(&days) {
        return Err(ApiError::bad_request("days must be between 1 and 366"));
    }
    let since = now_ms() - i64::from(days) * 86_400_000;
    Ok(Json(ledger::analytics(&state.db, &user.id, since).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    amount: i64,
    expires_in_s: Option<u64>,
}

fn reservation_view(done: Done) -> Value {
    match done {
        Done::Reservation {
            reservation,
            transfers,
            ..
        } => reservation.view(&transfers),
        Done::Transfer { transfer, .. } => transfer.view(),
    }
}

async fn reserve(
    State(state): State<AppState>,
    Caller(user): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReserveBody>,
) -> Result<axum::response::Response, ApiError> {
    let amount = amount_in_range("amount", body.amount, 1)?;
    let ttl = body
        .expires_in_s
        .unwrap_or(state.cfg.credits.reservation_ttl_secs);
    let max = state.cfg.credits.max_reservation_ttl_secs;
    if ttl == 0 || ttl > max {
        return Err(ApiError::invalid(format!(
            "expires_in_s must be between 1 and {max}, not {ttl}"
        )));
    }
    // With an Idempotency-Key, a retried request finds the same reservation.
    let id = match crate::extract::idempotency_key(&headers)? {
        Some(key) => format!("rsv:{}:{key}", user.id),
        None => format!("rsv:{}", uuid::Uuid::now_v7()),
    };
    let done = state
        .ledger
        .call(Op::Reserve {
            first: false,
            id,
            user_id: user.id.clone(),
            amount,
            expires_at: Some(now_ms() + (ttl as i64) * 1000),
            job_id: None,
        })
        .await??;
    // A retried request (same Idempotency-Key) finds the first reservation.
    let replayed = matches!(done, Done::Reservation { replayed: true, .. });
    let mut resp = (
        if replayed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        Json(reservation_view(done)),
    )
        .into_response();
    if replayed {
        resp.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

/// The caller's reservation, unless a job holds it (a job's credits move only with the job).
async fn own_reservation(state: &AppState, user_id: &str, id: &str) -> Result<Value, ApiError> {
    if id.is_empty() || id.len() > 300 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::not_found("no reservation with this id"));
    }
    let (r, transfers) = ledger::reservation(&state.db, id, Some(user_id))
        .await?
        .ok_or_else(|| ApiError::not_found("no reservation with this id"))?;
    if let Some(job) = &r.job_id {
        return Err(ApiError::conflict(format!(
            "reservation {id} holds the credits of job {job}; it is settled or released when the job ends"
        )));
    }
    Ok(r.view(&transfers))
}

async fn show_reservation(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(own_reservation(&state, &user.id, &id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    amount: i64,
}

async fn settle(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SettleBody>,
) -> Result<Json<Value>, ApiError> {
    own_reservation(&state, &user.id, &id).await?;
    let amount = amount_in_range("amount", body.amount, 0)?;
    let done = state
        .ledger
        .call(Op::Settle {
            id,
            amount: Some(amount),
            owner: Some(user.id),
            clamp: false,
        })
        .await??;
    Ok(Json(reservation_view(done)))
}

async fn release(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    own_reservation(&state, &user.id, &id).await?;
    let done = state
        .ledger
        .call(Op::Release {
            id,
            expired: false,
            owner: Some(user.id),
        })
        .await??;
    Ok(Json(reservation_view(done)))
}

async fn welcome_bonus(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let amount = state.cfg.credits.welcome_bonus;
    if amount == 0 {
        return Err(ApiError::conflict(
            "there is no welcome bonus on this server",
        ));
    }
    let done = state
        .ledger
        .call(Op::Transfer(TransferSpec {
            id: format!("bonus/welcome/{}", user.id),
            debit: accounts::BONUSES.to_owned(),
            credit: accounts::available(&user.id),
            amount,
            kind: "bonus".to_owned(),
            user_id: Some(user.id.clone()),
            reservation_id: None,
            job_id: None,
            memo: Some("welcome bonus".to_owned()),
        }))
        .await?;
    match done {
        Ok(Done::Transfer {
            replayed: false,
            transfer,
        }) => Ok((StatusCode::CREATED, Json(transfer.view()))),
        Ok(_) | Err(ledger::LedgerError::TransferConflict(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "welcome-bonus-claimed",
            "the welcome bonus was already claimed by this user",
        )),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    user_id: String,
    amount: i64,
    reason: Option<String>,
    /// Makes the grant idempotent: the same id grants once.
    id: Option<String>,
}

fn check_reason(reason: &Option<String>) -> Result<(), ApiError> {
    if let Some(r) = reason
        && (r.len() > 500 || r.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(
            "reason must be at most 500 characters, without control characters",
        ));
    }
    Ok(())
}

fn transfer_id(prefix: &str, id: Option<String>, headers: &HeaderMap) -> Result<String, ApiError> {
    let key = match id {
        Some(id)
            if id.is_empty() || id.len() > 200 || !id.chars().all(|c| c.is_ascii_graphic()) =>
        {
            return Err(ApiError::invalid(
                "id must be 1 to 200 printable ASCII characters",
            ));
        }
        Some(id) => Some(id),
        None => crate::extract::idempotency_key(headers)?,
    };
    Ok(match key {
        Some(k) => format!("{prefix}/{k}"),
        None => format!("{prefix}/{}", uuid::Uuid::now_v7()),
    })
}

async fn transfer_answer(
    state: &AppState,
    spec: TransferSpec,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match state.ledger.call(Op::Transfer(spec)).await?? {
        Done::Transfer {
            transfer,
            replayed: false,
        } => Ok((StatusCode::CREATED, Json(transfer.view()))),
        Done::Transfer { transfer, .. } => Ok((StatusCode::OK, Json(transfer.view()))),
        Done::Reservation { .. } => {
            Err(ApiError::internal(&"a transfer answered as a reservation"))
        }
    }
}

async fn known_user(state: &AppState, id: &str) -> Result<String, ApiError> {
    let id = crate::extract::parse_id(id)
        .ok_or_else(|| ApiError::invalid(format!("user_id {id:?} is not a user id")))?;
    if !users::exists(&state.db, &id).await? {
        return Err(ApiError::invalid(format!("no user with id {id}")));
    }
    Ok(id)
}

async fn grant(
    State(state): State<AppState>,
    Admin(_): Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<GrantBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let amount = amount_in_range("amount", body.amount, 1)?;
    check_reason(&body.reason)?;
    let user_id = known_user(&state, &body.user_id).await?;
    let spec = TransferSpec {
        id: transfer_id("grant", body.id, &headers)?,
        debit: accounts::GRANTS.to_owned(),
        credit: accounts::available(&user_id),
        amount,
        kind: "grant".to_owned(),
        user_id: Some(user_id),
        reservation_id: None,
        job_id: None,
        memo: body.reason,
    };
    transfer_answer(&state, spec).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustBody {
    user_id: String,
    /// Positive adds credits, negative takes them away (never below zero).
    amount: i64,
    reason: String,
    id: Option<String>,
}

async fn adjust(
    State(state): State<AppState>,
    Admin(_): Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AdjustBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let size = amount_in_range("amount", body.amount.saturating_abs(), 1)?;
    if body.reason.trim().is_empty() {
        return Err(ApiError::invalid("an adjustment needs a reason"));
    }
    check_reason(&Some(body.reason.clone()))?;
    let user_id = known_user(&state, &body.user_id).await?;
    let (debit, credit) = if body.amount > 0 {
        (
            accounts::ADJUSTMENTS.to_owned(),
            accounts::available(&user_id),
        )
    } else {
        (
            accounts::available(&user_id),
            accounts::ADJUSTMENTS.to_owned(),
        )
    };
    let spec = TransferSpec {
        id: transfer_id("adjust", body.id, &headers)?,
        debit,
        credit,
        amount: size,
        kind: "adjust".to_owned(),
        user_id: Some(user_id),
        reservation_id: None,
        job_id: None,
        memo: Some(body.reason),
    };
    transfer_answer(&state, spec).await
}
