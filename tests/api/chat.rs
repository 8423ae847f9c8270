//! Conversations answered by chat jobs: the offline provider by default, and a scripted
//! OpenAI-compatible server on loopback. Credits are held at the estimate and settled at the
//! reply's actual usage, or released when the provider refuses.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode as AxumStatus, routing::post};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, assert_problem, json_of};

/// Creates a conversation with `body`; answers its id and the path to ask it questions.
async fn conversation(app: &TestApp, key: &str, body: Value) -> (String, String) {
    let c = json_of(
        app.post(key, "/v1/chat/conversations", body).await,
        StatusCode::CREATED,
    )
    .await;
    let id = c["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/chat/conversations/{id}/messages");
    (id, path)
}

/// The conversation `cid` with its messages, as `key` sees it.
async fn show(app: &TestApp, key: &str, cid: &str) -> Value {
    json_of(
        app.get(key, &format!("/v1/chat/conversations/{cid}")).await,
        StatusCode::OK,
    )
    .await
}

async fn offline_conversation(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let key = app.user_key.clone();
    let c = json_of(
        app.post(&key, "/v1/chat/conversations", json!({ "title": "Trip" }))
            .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(c["model"], "offline-chat");
    let cid = c["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/chat/conversations/{cid}/messages");

    // No credits: 402, and the question is not kept.
    let resp = app
        .post(&key, &path, json!({ "content": "Where to?" }))
        .await;
    assert_problem(resp, StatusCode::PAYMENT_REQUIRED).await;
    let conv = show(&app, &key, &cid).await;
    assert_eq!(conv["messages"].as_array().map(Vec::len), Some(0), "{conv}");
    assert_eq!(
        app.queue_size().await,
        0,
        "the refused job left a queue task"
    );

    app.grant(&app.user_id, 100).await;
    let asked = json_of(
        app.post(&key, &path, json!({ "content": "Where to?" }))
            .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let job_id = asked["job_id"].as_str().expect("job id").to_owned();
    let estimate = asked["estimate"]["credits"].as_i64().expect("estimate");
    assert_eq!(
        estimate,
        1 + 2,
        "5 input tokens at 1/1k, 512 output tokens at 2/1k"
    );
    let job = app
        .wait_for(&job_id, &["succeeded"], Duration::from_secs(20))
        .await;
    let conv = show(&app, &key, &cid).await;
    let messages = conv["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "{conv}");
    assert_eq!(
        (
            messages[0]["role"].as_str(),
            messages[0]["content"].as_str()
        ),
        (Some("user"), Some("Where to?"))
    );
    assert_eq!(messages[1]["role"], "assistant");
    assert!(
        messages[1]["content"]
            .as_str()
            .unwrap_or_default()
            .contains("offline"),
        "{conv}"
    );
    assert_eq!(messages[1]["provider"], "offline");
    let (input, output) = (
        messages[1]["usage"]["input_tokens"]
            .as_i64()
            .expect("input"),
        messages[1]["usage"]["output_tokens"]
            .as_i64()
            .expect("output"),
    );
    let cost = (input + 999) / 1000 + (output * 2 + 999) / 1000;
    assert_eq!(job["cost"]["settled"], cost, "{job}");
    assert_eq!(app.balance(&key).await, (100 - cost, 0));

    // Isolation and bad input.
    let other = app.new_user("other@example.com").await;
    let resp = app
        .get(&other, &format!("/v1/chat/conversations/{cid}"))
        .await;
    assert_problem(resp, StatusCode::NOT_FOUND).await;
    let resp = app.post(&other, &path, json!({ "content": "hi" })).await;
    assert_problem(resp, StatusCode::NOT_FOUND).await;
    assert_problem(
        app.get(&key, "/v1/chat/conversations/nope").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    for body in [
        json!({ "content": "" }),
        json!({ "content": "a\u{0}b" }),
        json!({ "content": "hi", "model": "offline-image" }),
        json!({ "content": "hi", "max_tokens": 0 }),
        json!({ "text": "hi" }),
    ] {
        let resp = app.post(&key, &path, body.clone()).await;
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let resp = app
        .post(&key, "/v1/jobs", json!({ "kind": "chat", "input": {} }))
        .await;
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    let list = json_of(
        app.get(&key, "/v1/chat/conversations").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(list["conversations"][0]["id"], cid.as_str());
    app.stop().await;
}

/// A scripted OpenAI-compatible server: answers from a queue, records what it was sent.
#[derive(Clone, Default)]
struct Script {
    replies: Arc<Mutex<VecDeque<(u16, Value)>>>,
    seen: Arc<Mutex<Vec<Value>>>,
}

async fn completions(
    State(s): State<Script>,
    Json(body): Json<Value>,
) -> (AxumStatus, Json<Value>) {
    s.seen.lock().expect("lock").push(body);
    let (status, reply) = s
        .replies
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or((500, json!({ "error": { "message": "script ran out" } })));
    (
        AxumStatus::from_u16(status).unwrap_or(AxumStatus::INTERNAL_SERVER_ERROR),
        Json(reply),
    )
}

async fn start(script: Script) -> String {
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(script);
    crate::helpers::serve_router(app).await
}

fn completion(content: &str, prompt: u64, completion: u64) -> (u16, Value) {
    (
        200,
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "big-chat",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
            "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion },
        }),
    )
}

async fn provider_usage_refusals_and_fallback(backend: Backend) {
    let script = Script::default();
    let url = start(script.clone()).await;
    // "main" listens nowhere: every question falls back to the scripted "backup".
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let opts = Options {
        overrides: vec![
            (
                "ai.providers",
                json!([
                    { "name": "main", "base_url": dead, "max_retries": 0, "retry_base_ms": 10, "timeout_ms": 2000 },
                    { "name": "backup", "base_url": url, "api_key": "sk-test", "max_retries": 2, "retry_base_ms": 10, "timeout_ms": 2000 }
                ]),
            ),
            (
                "ai.models",
                json!([{ "id": "big-chat", "provider": "main", "fallback": "backup", "kind": "chat",
                         "input_per_1k": 3, "output_per_1k": 15, "context_window": 100000 }]),
            ),
            ("jobs.default_max_attempts", json!(1)),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 1000).await;
    let (cid, path) = conversation(&app, &key, json!({})).await;

    // Success: the usage the provider reports is what is charged.
    script
        .replies
        .lock()
        .expect("lock")
        .extend([completion("Paris.", 1000, 500)]);
    let asked = json_of(
        app.post(
            &key,
            &path,
            json!({ "content": "Capital of France?", "max_tokens": 1000 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(asked["estimate"]["credits"], 1 + 15);
    let job = app
        .wait_for(
            asked["job_id"].as_str().expect("id"),
            &["succeeded"],
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        job["cost"]["settled"],
        3 + 8,
        "ceil(1000*3/1000) + ceil(500*15/1000): {job}"
    );
    assert_eq!(job["result"]["provider"], "backup");
    assert_eq!(app.balance(&key).await, (1000 - 11, 0));

    // A 500 is retried by the adapter; the whole history goes to the model.
    script.replies.lock().expect("lock").extend([
        (500, json!({ "error": { "message": "overloaded" } })),
        completion("About 2 million.", 30, 10),
    ]);
    let asked = json_of(
        app.post(
            &key,
            &path,
            json!({ "content": "Population?", "max_tokens": 100 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let job = app
        .wait_for(
            asked["job_id"].as_str().expect("id"),
            &["succeeded"],
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(job["cost"]["settled"], 1 + 1, "{job}");
    let sent = script
        .seen
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("a request");
    let roles: Vec<&str> = sent["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{sent}");
    assert_eq!(sent["messages"][1]["content"], "Paris.");
    assert_eq!(sent["max_tokens"], 100);

    // A 400 is not retried: the job is dead and its credits come back.
    let before = app.balance(&key).await;
    let seen = script.seen.lock().expect("lock").len();
    script
        .replies
        .lock()
        .expect("lock")
        .extend([(400, json!({ "error": { "message": "content policy" } }))]);
    let asked = json_of(
        app.post(&key, &path, json!({ "content": "Something odd" }))
            .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let job = app
        .wait_for(
            asked["job_id"].as_str().expect("id"),
            &["dead"],
            Duration::from_secs(20),
        )
        .await;
    assert!(
        job["error"]
            .as_str()
            .unwrap_or_default()
            .contains("content policy"),
        "{job}"
    );
    assert_eq!(job["cost"]["settled"], 0);
    assert_eq!(app.balance(&key).await, before, "released");
    assert_eq!(
        script.seen.lock().expect("lock").len(),
        seen + 1,
        "not retried"
    );
    let conv = show(&app, &key, &cid).await;
    assert_eq!(
        conv["messages"].as_array().map(Vec::len),
        Some(5),
        "two answered questions and one refused: {conv}"
    );
    app.assert_ledger_verifies().await;
    app.stop().await;
}

/// A provider that never answers in time, and one that answers garbage: after the adapter's
/// retries and the job's attempts the job is dead and holds nothing.
async fn hangs_and_garbage_release_the_credits(backend: Backend) {
    let router = Router::new()
        .route(
            "/slow/v1/chat/completions",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .route("/junk/v1/chat/completions", post(|| async { "{not json" }));
    let url = crate::helpers::serve_router(router).await;
    let opts = Options {
        overrides: vec![
            (
                "ai.providers",
                json!([
                    { "name": "slow", "base_url": format!("{url}/slow"), "timeout_ms": 200, "max_retries": 1, "retry_base_ms": 10 },
                    { "name": "junk", "base_url": format!("{url}/junk"), "max_retries": 1, "retry_base_ms": 10 }
                ]),
            ),
            (
                "ai.models",
                json!([
                    { "id": "slow-chat", "provider": "slow", "kind": "chat", "input_per_1k": 5, "output_per_1k": 5 },
                    { "id": "junk-chat", "provider": "junk", "kind": "chat", "input_per_1k": 5, "output_per_1k": 5 }
                ]),
            ),
            ("jobs.default_max_attempts", json!(2)),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 100).await;
    for (model, says) in [("slow-chat", "timed out"), ("junk-chat", "not json")] {
        let (_, path) = conversation(&app, &key, json!({ "model": model })).await;
        let asked = json_of(
            app.post(
                &key,
                &path,
                json!({ "content": "hello?", "max_tokens": 10 }),
            )
            .await,
            StatusCode::ACCEPTED,
        )
        .await;
        let job = app
            .wait_for(
                asked["job_id"].as_str().expect("id"),
                &["dead"],
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(job["attempts"], 2, "{job}");
        assert!(
            job["error"].as_str().unwrap_or_default().contains(says),
            "{model}: {job}"
        );
        assert_eq!(job["cost"]["settled"], 0);
        assert_eq!(app.balance(&key).await, (100, 0), "{model}: released");
    }
    app.assert_ledger_verifies().await;
    app.stop().await;
}

/// The database counts a conversation's tokens for the estimate: it must count characters the
/// way the published rule does (`POST /v1/models/estimate-cost`), multi-byte text included,
/// and hold exactly that estimate.
async fn estimates_count_characters_like_the_rule(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 1000).await;
    let (cid, path) = conversation(&app, &key, json!({})).await;
    for content in ["Grüße aus Köln — ✓ ünïcödé 東京", "e\u{301}🙂 a"] {
        let asked = json_of(
            app.post(&key, &path, json!({ "content": content })).await,
            StatusCode::ACCEPTED,
        )
        .await;
        let job_id = asked["job_id"].as_str().expect("job id").to_owned();
        // What the rule says for the history as stored, plus the new question.
        let conv = show(&app, &key, &cid).await;
        let history: Vec<Value> = conv["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["job_id"] != job_id.as_str())
            .map(|m| json!({ "role": m["role"], "content": m["content"] }))
            .collect();
        let rule = json_of(
            app.post(
                &key,
                "/v1/models/estimate-cost",
                json!({ "model": "offline-chat", "messages": history, "content": content }),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(
            asked["estimate"]["input_tokens"], rule["input_tokens"],
            "{asked} vs {rule}"
        );
        assert_eq!(asked["estimate"]["credits"], rule["credits"]);
        let job = app
            .wait_for(&job_id, &["succeeded"], Duration::from_secs(20))
            .await;
        let hold = job["cost"]["transfers"]
            .as_array()
            .expect("transfers")
            .iter()
            .find(|t| t["kind"] == "reserve")
            .map(|t| t["amount"].clone());
        assert_eq!(hold, Some(rule["credits"].clone()), "{job}");
    }
    app.stop().await;
}

/// Questions asked at once are read and stored in batches: each gets its own conversation's
/// answer, another user's conversation is a 404 and a user without credits a 402 in the same
/// batch, and nothing of the refused ones is kept. A conversation's `updated_at` is its last
/// message's time.
async fn concurrent_questions_each_get_their_own_answer(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 1_000).await;
    let other = app.new_user("broke@example.com").await;
    let mut mine = Vec::new();
    for title in ["a", "b", "c"] {
        mine.push(conversation(&app, &key, json!({ "title": title })).await);
    }
    let (theirs_id, theirs) = conversation(&app, &other, json!({ "title": "theirs" })).await;
    let created = show(&app, &key, &mine[0].0).await;
    // (who, where, the answer expected, the conversation it belongs to)
    let mut asks = Vec::new();
    for round in 0..3 {
        for (cid, path) in &mine {
            asks.push((
                key.clone(),
                path.clone(),
                StatusCode::ACCEPTED,
                cid.clone(),
                round,
            ));
            asks.push((
                other.clone(),
                path.clone(),
                StatusCode::NOT_FOUND,
                cid.clone(),
                round,
            ));
        }
        asks.push((
            key.clone(),
            theirs.clone(),
            StatusCode::NOT_FOUND,
            theirs_id.clone(),
            round,
        ));
        asks.push((
            other.clone(),
            theirs.clone(),
            StatusCode::PAYMENT_REQUIRED,
            theirs_id.clone(),
            round,
        ));
    }
    let answers = futures::future::join_all(asks.iter().map(|(who, path, _, _, round)| {
        let body = json!({ "content": format!("question {round}") });
        app.post(who, path, body)
    }))
    .await;
    let mut jobs = Vec::new();
    for ((_, path, expected, cid, _), resp) in asks.iter().zip(answers) {
        if *expected == StatusCode::ACCEPTED {
            let asked = json_of(resp, StatusCode::ACCEPTED).await;
            assert_eq!(asked["conversation_id"], cid.as_str(), "{path}: {asked}");
            jobs.push(asked["job_id"].as_str().expect("job id").to_owned());
        } else {
            assert_problem(resp, *expected).await;
        }
    }
    assert_eq!(jobs.len(), 9);
    for job in &jobs {
        app.wait_for(job, &["succeeded"], Duration::from_secs(20))
            .await;
    }
    for (cid, _) in &mine {
        let conv = show(&app, &key, cid).await;
        let messages = conv["messages"].as_array().expect("messages");
        assert_eq!(
            messages.len(),
            6,
            "three questions and their replies: {conv}"
        );
        let questions = messages.iter().filter(|m| m["role"] == "user").count();
        assert_eq!(questions, 3, "{conv}");
        let last = messages
            .iter()
            .filter_map(|m| m["created_at"].as_str())
            .max();
        assert_eq!(conv["updated_at"].as_str(), last, "{conv}");
    }
    assert_eq!(
        created["updated_at"], created["created_at"],
        "a conversation without messages was updated when it was made: {created}"
    );
    let theirs_now = show(&app, &other, &theirs_id).await;
    assert_eq!(
        theirs_now["messages"].as_array().map(Vec::len),
        Some(0),
        "refused questions are not kept: {theirs_now}"
    );
    assert_eq!(
        theirs_now["updated_at"], theirs_now["created_at"],
        "{theirs_now}"
    );
    app.stop().await;
}

crate::both_backends!(
    concurrent_questions_each_get_their_own_answer,
    estimates_count_characters_like_the_rule,
    offline_conversation,
    provider_usage_refusals_and_fallback,
    hangs_and_garbage_release_the_credits
);
