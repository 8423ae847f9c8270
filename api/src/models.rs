//! The model catalog, users' model preferences, and cost estimates (the same rule that reserves
//! credits when an AI job is submitted).

use axum::{Json, Router, extract::State, routing::get, routing::post};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_workflows::ai::{self, Catalog, Model, ModelKind, Preferences, tokens};

use crate::{AppState, auth::Caller, error::ApiError, extract::ApiJson};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list))
        .route(
            "/v1/models/preferences",
            get(get_preferences).put(put_preferences),
        )
        .route("/v1/models/estimate-cost", post(estimate))
}

async fn list(State(state): State<AppState>, Caller(_): Caller) -> Json<Value> {
    let models: Vec<Value> = state.catalog.models().iter().map(Model::view).collect();
    Json(json!({ "models": models }))
}

fn preferences_view(p: &Preferences, catalog: &Catalog, default_max_tokens: u32) -> Value {
    let default = |kind| catalog.first(kind).map(|m| m.id.clone());
    json!({
        "chat_model": p.chat_model.clone().or_else(|| default(ModelKind::Chat)),
        "image_model": p.image_model.clone().or_else(|| default(ModelKind::Image)),
        "temperature": p.temperature.unwrap_or(1.0),
        "max_tokens": p.max_tokens.unwrap_or(default_max_tokens),
    })
}

async fn get_preferences(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Json<Value>, ApiError> {
    let p = ai::preferences(&state.db, &user.id).await?;
    Ok(Json(preferences_view(
        &p,
        &state.catalog,
        state.cfg.ai.default_max_tokens,
    )))
}

/// The model a request names, which must be of `kind` (a 422 says what is available); without
/// one, the catalog's first model of that kind. Every endpoint that takes a model uses this.
pub(crate) fn pick<'a>(
    catalog: &'a Catalog,
    kind: ModelKind,
    id: Option<&str>,
) -> Result<&'a Model, ApiError> {
    let name = match kind {
        ModelKind::Chat => "chat",
        ModelKind::Image => "image",
    };
    let Some(id) = id else {
        return catalog
            .first(kind)
            .ok_or_else(|| ApiError::invalid(format!("no {name} model is configured")));
    };
    match catalog.get(id) {
        Some(m) if m.kind == kind => Ok(m),
        _ => {
            let ids: Vec<&str> = catalog
                .models()
                .iter()
                .filter(|m| m.kind == kind)
                .map(|m| m.id.as_str())
                .collect();
            Err(ApiError::invalid(format!(
                "{id:?} is not a {name} model; available: {}",
                ids.join(", ")
            )))
        }
    }
}

async fn put_preferences(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiJson(body): ApiJson<Preferences>,
) -> Result<Json<Value>, ApiError> {
    if let Some(id) = &body.chat_model {
        pick(&state.catalog, ModelKind::Chat, Some(id))?;
    }
    if let Some(id) = &body.image_model {
        pick(&state.catalog, ModelKind::Image, Some(id))?;
    }
    if let Some(t) = body.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid("temperature must be between 0 and 2"));
    }
    if let Some(n) = body.max_tokens
        && !(1..=1_000_000).contains(&n)
    {
        return Err(ApiError::invalid(
            "max_tokens must be between 1 and 1000000",
        ));
    }
    ai::set_preferences(&state.db, &user.id, &body).await?;
    Ok(Json(preferences_view(
        &body,
        &state.catalog,
        state.cfg.ai.default_max_tokens,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EstimateBody {
    /// `chat` (default) or `image`.
    kind: Option<String>,
    model: Option<String>,
    /// Chat: the conversation to send, or just `content` for one user message.
    messages: Option<Vec<Message>>,
    content: Option<String>,
    max_tokens: Option<u32>,
    /// Image: how many.
    n: Option<u32>,
}

async fn estimate(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiJson(body): ApiJson<EstimateBody>,
) -> Result<Json<Value>, ApiError> {
    let kind = match body.kind.as_deref() {
        None | Some("chat") => ModelKind::Chat,
        Some("image") => ModelKind::Image,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "kind must be chat or image, not {other:?}"
            )));
        }
    };
    let prefs = ai::preferences(&state.db, &user.id).await?;
    let preferred = match kind {
        ModelKind::Chat => prefs.chat_model.clone(),
        ModelKind::Image => prefs.image_model.clone(),
    };
    let model = pick(&state.catalog, kind, body.model.or(preferred).as_deref())?;
    match kind {
        ModelKind::Image => {
            let n = body.n.unwrap_or(1);
            if !(1..=10).contains(&n) {
                return Err(ApiError::invalid("n must be between 1 and 10"));
            }
            Ok(Json(json!({
                "kind": "image",
                "model": model.id,
                "n": n,
                "credits": model.image_cost(n),
            })))
        }
        ModelKind::Chat => {
            if body.n.is_some() {
                return Err(ApiError::invalid("n applies to images only"));
            }
            for m in body.messages.iter().flatten() {
                if !["system", "user", "assistant"].contains(&m.role.as_str()) {
                    return Err(ApiError::invalid(format!(
                        "message role must be system, user or assistant, not {:?}",
                        m.role
                    )));
                }
            }
            let texts = body
                .messages
                .iter()
                .flatten()
                .map(|m| m.content.as_str())
                .chain(body.content.as_deref());
            let input = tokens::count_messages(texts);
            let max_output = body
                .max_tokens
                .or(prefs.max_tokens)
                .unwrap_or(state.cfg.ai.default_max_tokens);
            if max_output == 0 {
                return Err(ApiError::invalid("max_tokens must be at least 1"));
            }
            if model.context_window > 0
                && input + u64::from(max_output) > u64::from(model.context_window)
            {
                return Err(ApiError::invalid(format!(
                    "{input} input tokens plus {max_output} output tokens exceed {}'s context window of {}",
                    model.id, model.context_window
                )));
            }
            Ok(Json(json!({
                "kind": "chat",
                "model": model.id,
                "input_tokens": input,
                "max_output_tokens": max_output,
                "credits": model.chat_cost(input, u64::from(max_output)),
                "rule": "ceil(input_tokens * input_per_1k / 1000) + ceil(max_output_tokens * output_per_1k / 1000); tokens = ceil(chars / 4) + 4 per message",
            })))
        }
    }
}
