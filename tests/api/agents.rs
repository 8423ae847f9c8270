//! Agent tasks: durable steps, each paid once; a worker killed mid-task resumes from the last
//! finished step; cancel stops between steps.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, routing::post};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, assert_problem, json_of, signal, spawn_worker};

async fn offline_task(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 100).await;
    let t = json_of(
        app.post(
            &key,
            "/v1/chat/agent-tasks",
            json!({ "goal": "Plan a picnic", "max_steps": 2 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let id = t["id"].as_str().expect("id").to_owned();
    app.wait_for(&id, &["succeeded"], Duration::from_secs(20))
        .await;
    let task = json_of(
        app.get(&key, &format!("/v1/chat/agent-tasks/{id}")).await,
        StatusCode::OK,
    )
    .await;
    let steps = task["steps"].as_array().expect("steps");
    let kinds: Vec<&str> = steps.iter().filter_map(|s| s["kind"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"plan"), "{task}");
    assert_eq!(kinds.last(), Some(&"summary"), "{task}");
    assert!(kinds.len() >= 3, "{task}");
    let charged: i64 = steps.iter().filter_map(|s| s["credits"].as_i64()).sum();
    assert!(charged > 0);
    assert_eq!(
        task["cost"]["settled"], charged,
        "every step settled once: {task}"
    );
    assert_eq!(task["cost"]["reserved"], 0);
    assert_eq!(app.balance(&key).await, (100 - charged, 0));

    let other = app.new_user("other@example.com").await;
    assert_problem(
        app.get(&other, &format!("/v1/chat/agent-tasks/{id}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    for body in [
        json!({ "goal": "" }),
        json!({ "goal": "a\u{0}" }),
        json!({ "goal": "x", "max_steps": 11 }),
        json!({ "goal": "x", "model": "offline-image" }),
    ] {
        let resp = app.post(&key, "/v1/chat/agent-tasks", body.clone()).await;
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    app.stop().await;
}

/// A provider that plans two steps and hangs on the second until released.
#[derive(Clone, Default)]
struct Scripted {
    prompts: Arc<Mutex<Vec<String>>>,
    release: Arc<AtomicBool>,
}

fn reply(content: &str) -> Value {
    json!({
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content } }],
        "usage": { "prompt_tokens": 100, "completion_tokens": 100 },
    })
}

async fn start(s: Scripted) -> String {
    let router = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| {
            let s = s.clone();
            async move {
                let prompt = body["messages"][0]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                s.prompts.lock().expect("lock").push(prompt.clone());
                if prompt.starts_with("Plan") {
                    return Json(reply("buy bread\nfind a park"));
                }
                if prompt.contains("find a park")
                    && !prompt.starts_with("Goal: Picnic\nStep results")
                {
                    while !s.release.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    return Json(reply("the park by the river"));
                }
                if prompt.contains("Summarise") {
                    return Json(reply("bread, river park"));
                }
                Json(reply("bread bought"))
            }
        }),
    );
    crate::helpers::serve_router(router).await
}

async fn killed_task_resumes_without_repaying(backend: Backend) {
    let script = Scripted::default();
    let url = start(script.clone()).await;
    let dir = crate::helpers::scratch_dir();
    let config = dir.join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "[[ai.providers]]\nname = \"p\"\nbase_url = \"{url}\"\ntimeout_ms = 120000\nmax_retries = 0\n\
             [[ai.models]]\nid = \"agent-model\"\nprovider = \"p\"\nkind = \"chat\"\ninput_per_1k = 10\noutput_per_1k = 20\n"
        ),
    )
    .expect("config");
    let opts = Options {
        workers: false,
        overrides: vec![
            ("ai.providers", json!([{ "name": "p", "base_url": url }])),
            (
                "ai.models",
                json!([{ "id": "agent-model", "provider": "p", "kind": "chat", "input_per_1k": 10, "output_per_1k": 20 }]),
            ),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 1000).await;
    let config_env = config.display().to_string();
    let (mut first, _) = spawn_worker(&app.url, &[("TALLY_CONFIG", config_env.as_str())]).await;
    let t = json_of(
        app.post(
            &key,
            "/v1/chat/agent-tasks",
            json!({ "goal": "Picnic", "max_steps": 5, "max_tokens": 100 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let id = t["id"].as_str().expect("id").to_owned();
    // Wait until the worker is inside the second step's call, then kill it.
    let start = std::time::Instant::now();
    while !script
        .prompts
        .lock()
        .expect("lock")
        .iter()
        .any(|p| p.contains("Now do this step and reply with its result: find a park"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the second step never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&first, "KILL");
    let _ = first.wait().await;
    let task = json_of(
        app.get(&key, &format!("/v1/chat/agent-tasks/{id}")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        task["steps"].as_array().map(Vec::len),
        Some(2),
        "plan and step 1 are stored: {task}"
    );
    let paid_before = task["cost"]["settled"].as_i64().expect("settled");
    assert_eq!(
        paid_before,
        2 * (1 + 2),
        "two steps of 100 + 100 tokens at 10/20 per 1k"
    );

    script.release.store(true, Ordering::SeqCst);
    let (mut second, _) = spawn_worker(&app.url, &[("TALLY_CONFIG", config_env.as_str())]).await;
    app.wait_for(&id, &["succeeded"], Duration::from_secs(40))
        .await;
    let task = json_of(
        app.get(&key, &format!("/v1/chat/agent-tasks/{id}")).await,
        StatusCode::OK,
    )
    .await;
    let steps = task["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 4, "plan, two steps, summary: {task}");
    let prompts = script.prompts.lock().expect("lock").clone();
    let count = |needle: &str| prompts.iter().filter(|p| p.contains(needle)).count();
    assert_eq!(
        count("Plan how to reach"),
        1,
        "the plan ran once: {prompts:?}"
    );
    assert_eq!(
        count("result: buy bread"),
        1,
        "the finished step ran once: {prompts:?}"
    );
    assert_eq!(
        count("result: find a park"),
        2,
        "the interrupted step ran again: {prompts:?}"
    );
    assert_eq!(
        task["cost"]["settled"],
        4 * 3,
        "four steps, each paid once: {task}"
    );
    assert_eq!(
        task["cost"]["reserved"], 0,
        "the dead attempt's hold was released: {task}"
    );
    assert_eq!(app.balance(&key).await, (1000 - 12, 0));
    app.assert_ledger_verifies().await;
    signal(&second, "TERM");
    let _ = second.wait().await;
    app.stop().await;
}

async fn cancel_stops_between_steps(backend: Backend) {
    let script = Scripted::default();
    let url = start(script.clone()).await;
    let opts = Options {
        overrides: vec![
            (
                "ai.providers",
                json!([{ "name": "p", "base_url": url, "max_retries": 0 }]),
            ),
            (
                "ai.models",
                json!([{ "id": "agent-model", "provider": "p", "kind": "chat", "input_per_1k": 10, "output_per_1k": 20 }]),
            ),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 1000).await;
    let t = json_of(
        app.post(
            &key,
            "/v1/chat/agent-tasks",
            json!({ "goal": "Picnic", "max_tokens": 100 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let id = t["id"].as_str().expect("id").to_owned();
    let start = std::time::Instant::now();
    while !script
        .prompts
        .lock()
        .expect("lock")
        .iter()
        .any(|p| p.contains("result: find a park"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the second step never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Cancel while the second step is with the model: it finishes (and is paid), then the task
    // stops before the summary.
    let resp = app
        .post(&key, &format!("/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    script.release.store(true, Ordering::SeqCst);
    app.wait_for(&id, &["cancelled"], Duration::from_secs(20))
        .await;
    let task = json_of(
        app.get(&key, &format!("/v1/chat/agent-tasks/{id}")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        task["steps"].as_array().map(Vec::len),
        Some(3),
        "no summary after the cancel: {task}"
    );
    assert_eq!(task["cost"]["settled"], 3 * 3);
    assert_eq!(task["cost"]["reserved"], 0, "nothing is left held: {task}");
    assert_eq!(app.balance(&key).await, (1000 - 9, 0));
    assert!(
        !script
            .prompts
            .lock()
            .expect("lock")
            .iter()
            .any(|p| p.contains("Summarise"))
    );
    app.stop().await;
}

/// A task that died (the provider refused a step) and is retried: every step of the new run
/// holds and is paid, and the dead run left nothing held.
async fn retried_dead_task_pays_every_step(backend: Backend) {
    let refuse = Arc::new(AtomicBool::new(true));
    let router = {
        let refuse = refuse.clone();
        Router::new().route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| {
                let refuse = refuse.clone();
                async move {
                    let prompt = body["messages"][0]["content"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    if prompt.starts_with("Plan") {
                        return (axum::http::StatusCode::OK, Json(reply("buy bread")));
                    }
                    if refuse.load(Ordering::SeqCst) {
                        return (
                            axum::http::StatusCode::BAD_REQUEST,
                            Json(json!({ "error": { "message": "not today" } })),
                        );
                    }
                    (axum::http::StatusCode::OK, Json(reply("done")))
                }
            }),
        )
    };
    let url = crate::helpers::serve_router(router).await;
    let opts = Options {
        overrides: vec![
            (
                "ai.providers",
                json!([{ "name": "p", "base_url": url, "max_retries": 0 }]),
            ),
            (
                "ai.models",
                json!([{ "id": "agent-model", "provider": "p", "kind": "chat", "input_per_1k": 10, "output_per_1k": 20 }]),
            ),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 1000).await;
    let t = json_of(
        app.post(
            &key,
            "/v1/chat/agent-tasks",
            json!({ "goal": "Picnic", "max_tokens": 100 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let id = t["id"].as_str().expect("id").to_owned();
    let job = app.wait_for(&id, &["dead"], Duration::from_secs(20)).await;
    assert!(
        job["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not today"),
        "{job}"
    );
    assert_eq!(job["cost"]["settled"], 3, "the plan was paid: {job}");
    assert_eq!(
        job["cost"]["reserved"], 0,
        "the refused step's hold went back: {job}"
    );
    refuse.store(false, Ordering::SeqCst);
    let resp = app
        .post(&key, &format!("/v1/jobs/{id}/retry"), json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    app.wait_for(&id, &["succeeded"], Duration::from_secs(20))
        .await;
    let task = json_of(
        app.get(&key, &format!("/v1/chat/agent-tasks/{id}")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(task["steps"].as_array().map(Vec::len), Some(3), "{task}");
    assert_eq!(
        task["cost"]["settled"],
        3 * 3,
        "plan, step and summary, each paid once: {task}"
    );
    assert_eq!(task["cost"]["reserved"], 0);
    assert_eq!(app.balance(&key).await, (1000 - 9, 0));
    app.assert_ledger_verifies().await;
    app.stop().await;
}

crate::both_backends!(
    retried_dead_task_pays_every_step,
    offline_task,
    killed_task_resumes_without_repaying,
    cancel_stops_between_steps
);
