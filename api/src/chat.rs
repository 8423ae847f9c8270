//! Conversations: a user message becomes a `chat` job that holds the estimated credits, asks the
//! model, stores the reply and settles what the reply actually used.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_workflows::{
    agents,
    ai::{self, ModelKind, tokens},
    chat,
    jobs::{self, NewJob},
};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiJson, ApiQuery, parse_id},
    models::pick,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/conversations", post(create).get(list))
        .route("/v1/chat/conversations/{id}", get(show))
        .route("/v1/chat/conversations/{id}/messages", post(ask))
        .route("/v1/chat/agent-tasks", post(create_task))
        .route("/v1/chat/agent-tasks/{id}", get(show_task))
}

/// Longest message a user may send, in characters.
const MAX_CONTENT: usize = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    title: Option<String>,
    model: Option<String>,
}

async fn create(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let title = body.title.unwrap_or_else(|| "New conversation".to_owned());
    if title.trim().is_empty() || title.chars().count() > 200 || title.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "title must be 1 to 200 characters, without control characters",
        ));
    }
    let preferred = ai::preferences(&state.db, &user.id).await?.chat_model;
    let model = pick(
        &state.catalog,
        ModelKind::Chat,
        body.model.as_deref().or(preferred.as_deref()),
    )?;
    let c = chat::create(&state.db, &user.id, title.trim(), &model.id).await?;
    Ok((StatusCode::CREATED, Json(c.view())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    cursor: Option<String>,
    limit: Option<u32>,
}

async fn list(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let before = match &p.cursor {
        Some(c) => {
            Some(parse_id(c).ok_or_else(|| ApiError::bad_request("cursor must be a next_cursor"))?)
        }
        None => None,
    };
    let (rows, next) = chat::list(
        &state.db,
        &user.id,
        before.as_deref(),
        p.limit.unwrap_or(50),
    )
    .await?;
    Ok(Json(json!({
        "conversations": rows.iter().map(chat::Conversation::view).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

fn parse_conversation_id(raw: &str) -> Result<String, ApiError> {
    parse_id(raw).ok_or_else(|| {
        ApiError::bad_request(format!("{raw:?} is not a conversation id (ids are UUIDs)"))
    })
}

async fn own(state: &AppState, raw: &str, user_id: &str) -> Result<chat::Conversation, ApiError> {
    let id = parse_conversation_id(raw)?;
    chat::get(&state.db, &id, user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("no conversation with this id"))
}

async fn show(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = own(&state, &id, &user.id).await?;
    let messages = chat::messages(&state.db, &c.id).await?;
    let mut view = c.view();
    view["messages"] = messages.iter().map(chat::Message::view).collect();
    Ok(Json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    content: String,
    model: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
}

async fn ask(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AskBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_conversation_id(&id)?;
    crate::extract::text("content", &body.content, MAX_CONTENT)?;
    // One read, batched with concurrent questions': the conversation, the user's preferences
    // and the history's size.
    let chat::QuestionContext {
        conversation: c,
        preferences: prefs,
        history_tokens,
    } = state
        .question_contexts
        .call((id, user.id.clone()))
        .await?
        .ok_or_else(|| ApiError::not_found("no conversation with this id"))?;
    let model = pick(
        &state.catalog,
        ModelKind::Chat,
        Some(body.model.as_deref().unwrap_or(&c.model)),
    )?;
    let max_tokens = body
        .max_tokens
        .or(prefs.max_tokens)
        .unwrap_or(state.cfg.ai.default_max_tokens);
    if max_tokens == 0 || max_tokens > 1_000_000 {
        return Err(ApiError::invalid(
            "max_tokens must be between 1 and 1000000",
        ));
    }
    let temperature = body.temperature.or(prefs.temperature);
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid("temperature must be between 0 and 2"));
    }
    // The estimate, by the rule GET /v1/models/estimate-cost shows: the whole history goes to
    // the model.
    let input = history_tokens.saturating_add(tokens::count_messages([body.content.as_str()]));
    if model.context_window > 0 && input + u64::from(max_tokens) > u64::from(model.context_window) {
        return Err(ApiError::invalid(format!(
            "the conversation ({input} tokens) plus {max_tokens} output tokens exceeds {}'s context window of {}",
            model.id, model.context_window
        )));
    }
    let estimate = model.chat_cost(input, u64::from(max_tokens));
    let key = crate::extract::idempotency_key(&headers)?;
    let job_input = json!({
        "conversation_id": c.id,
        "model": model.id,
        "max_tokens": max_tokens,
        "temperature": temperature,
    });
    let request = json!({ "conversation": c.id, "content": body.content, "input": job_input });
    let new = NewJob {
        user_id: user.id.clone(),
        kind: tally_workflows::chat::KIND.name.to_owned(),
        queue: tally_workflows::chat::KIND.queue,
        input: job_input,
        priority: 0,
        run_at_ms: None,
        max_attempts: state.cfg.jobs.default_max_attempts,
        idempotency_key: key,
        request_hash: crate::extract::request_hash(&request),
        price: estimate,
        id: None,
        rows: Vec::new(),
    };
    let question = chat::Question {
        conversation_id: c.id.clone(),
        content: body.content.clone(),
        job: new,
    };
    let (message, job) = state.questions.call(question).await??;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "job_id": job.id,
            "status": job.status,
            "conversation_id": c.id,
            "message": message.view(),
            "model": model.id,
            "estimate": { "input_tokens": input, "max_output_tokens": max_tokens, "credits": estimate },
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskBody {
    goal: String,
    /// The step budget: the plan has at most this many steps (1 to 10, default 3).
    max_steps: Option<u32>,
    model: Option<String>,
    /// Output tokens each step may use (default 256).
    max_tokens: Option<u32>,
}

async fn create_task(
    State(state): State<AppState>,
    Caller(user): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<TaskBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    crate::extract::text("goal", &body.goal, 4000)?;
    let max_steps = body.max_steps.unwrap_or(3);
    if !(1..=10).contains(&max_steps) {
        return Err(ApiError::invalid("max_steps must be between 1 and 10"));
    }
    let max_tokens = body.max_tokens.unwrap_or(256);
    if !(1..=100_000).contains(&max_tokens) {
        return Err(ApiError::invalid("max_tokens must be between 1 and 100000"));
    }
    let preferred = ai::preferences(&state.db, &user.id).await?.chat_model;
    let model = pick(
        &state.catalog,
        ModelKind::Chat,
        body.model.as_deref().or(preferred.as_deref()),
    )?;
    // Each step holds its own estimate when it runs; nothing is held for the task itself.
    let input = json!({ "max_tokens": max_tokens });
    let request =
        json!({ "goal": body.goal, "max_steps": max_steps, "model": model.id, "input": input });
    let new = NewJob {
        user_id: user.id.clone(),
        kind: tally_workflows::agents::KIND.name.to_owned(),
        queue: tally_workflows::agents::KIND.queue,
        input,
        priority: 0,
        run_at_ms: None,
        max_attempts: state.cfg.jobs.default_max_attempts,
        idempotency_key: crate::extract::idempotency_key(&headers)?,
        request_hash: crate::extract::request_hash(&request),
        price: 0,
        id: None,
        rows: Vec::new(),
    };
    let (task, job) = agents::create(
        &state.db,
        &user.id,
        body.goal.trim(),
        &model.id,
        max_steps,
        new,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": task.id,
            "job_id": job.id,
            "status": job.status,
            "goal": task.goal,
            "model": task.model,
            "max_steps": task.max_steps,
        })),
    ))
}

async fn show_task(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw).ok_or_else(|| {
        ApiError::bad_request(format!("{raw:?} is not a task id (ids are UUIDs)"))
    })?;
    let job = jobs::get(&state.db, &id, &user).await?;
    let task = agents::get(&state.db, &id)
        .await?
        .filter(|_| job.kind == tally_workflows::agents::KIND.name)
        .ok_or_else(|| ApiError::not_found("no agent task with this id"))?;
    let steps = agents::steps(&state.db, &id).await?;
    let cost = tally_workflows::ledger::job_cost(&state.db, &id).await?;
    let job_view = job.view();
    Ok(Json(json!({
        "id": task.id,
        "goal": task.goal,
        "model": task.model,
        "max_steps": task.max_steps,
        "status": job.status,
        "progress": job_view["progress"],
        "result": job_view["result"],
        "error": job.error,
        "steps": steps.iter().map(agents::Step::view).collect::<Vec<_>>(),
        "cost": cost,
    })))
}
