//! `/v1/admin/queues`: the queues' numbers, and pausing and resuming one.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, assert_problem, json_of};

/// Longer than a worker takes to see a pause or a resume (`workers::pause::REFRESH`, 1 s).
const SEEN: Duration = Duration::from_millis(1500);

async fn queues(app: &TestApp) -> Vec<Value> {
    let v = json_of(
        app.get(&app.admin_key, "/v1/admin/queues").await,
        StatusCode::OK,
    )
    .await;
    v["queues"].as_array().expect("queues").clone()
}

async fn queue(app: &TestApp, name: &str) -> Value {
    queues(app)
        .await
        .into_iter()
        .find(|q| q["name"] == name)
        .unwrap_or_else(|| panic!("no queue {name}"))
}

async fn the_view_lists_every_queue(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let all = queues(&app).await;
    let names: Vec<&str> = all.iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(names, tally_workflows::config::QUEUES);
    for q in &all {
        let mut keys: Vec<&str> = q.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["depth", "name", "oldest_queued_ms", "paused", "running"],
            "{q}"
        );
        assert_eq!(q["depth"], 0);
        assert_eq!(q["running"], 0);
        assert_eq!(q["oldest_queued_ms"], Value::Null);
        assert_eq!(q["paused"], false);
    }
    // No worker runs here: submitted jobs wait, and one scheduled later counts in the depth
    // without being due.
    for _ in 0..3 {
        app.submit(json!({"kind": "echo", "input": 1})).await;
    }
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    app.submit(json!({"kind": "echo", "input": 2, "run_at": later.to_rfc3339()}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let system = queue(&app, "system").await;
    assert_eq!(system["depth"], 4, "{system}");
    assert_eq!(system["running"], 0, "{system}");
    let oldest = system["oldest_queued_ms"].as_i64().expect("a due job");
    assert!((150..10_000).contains(&oldest), "{system}");
    assert_eq!(queue(&app, "ai").await["depth"], 0);
    app.stop().await;
}

async fn only_admins_see_or_pause_queues(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let user = &app.user_key;
    assert_problem(
        app.get(user, "/v1/admin/queues").await,
        StatusCode::FORBIDDEN,
    )
    .await;
    for path in [
        "/v1/admin/queues/system/pause",
        "/v1/admin/queues/system/resume",
        "/v1/admin/queues/bogus/pause",
    ] {
        assert_problem(app.post(user, path, json!({})).await, StatusCode::FORBIDDEN).await;
    }
    assert_problem(
        app.client
            .get(app.url("/v1/admin/queues"))
            .send()
            .await
            .expect("request"),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let admin = &app.admin_key;
    for path in [
        "/v1/admin/queues/bogus/pause",
        "/v1/admin/queues/bogus/resume",
        "/v1/admin/queues/SYSTEM/pause",
        "/v1/admin/queues/%20/pause",
    ] {
        let p = assert_problem(
            app.post(admin, path, json!({})).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        assert!(
            p["detail"].as_str().unwrap().contains("known queues"),
            "{p}"
        );
    }
    // GET on the switch is not a route.
    assert_problem(
        app.get(admin, "/v1/admin/queues/system/pause").await,
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;
    app.stop().await;
}

async fn a_paused_queue_waits_and_runs_on_resume(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let admin = app.admin_key.clone();
    // A job running when the pause comes finishes.
    let long = app
        .submit(json!({"kind": "sleep", "input": {"ms": 1500}}))
        .await;
    app.wait_for(&long, &["running"], Duration::from_secs(10))
        .await;
    let paused = json_of(
        app.post(&admin, "/v1/admin/queues/system/pause", json!({}))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(paused["name"], "system");
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["running"], 1, "{paused}");
    // Pausing again changes nothing.
    let again = json_of(
        app.post(&admin, "/v1/admin/queues/system/pause", json!({}))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(again["paused"], true);
    tokio::time::sleep(SEEN).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(app.submit(json!({"kind": "echo", "input": i})).await);
    }
    let done = app
        .wait_for(&long, &["succeeded"], Duration::from_secs(10))
        .await;
    assert_eq!(done["attempts"], 1);
    tokio::time::sleep(SEEN).await;
    for id in &ids {
        let job = app.job(id).await;
        assert_eq!(job["status"], "queued", "a paused queue's job waits: {job}");
    }
    let system = queue(&app, "system").await;
    assert_eq!(system["paused"], true);
    assert_eq!(system["depth"], 3, "{system}");
    assert_eq!(system["running"], 0, "{system}");
    assert!(
        system["oldest_queued_ms"].as_i64().unwrap() >= 1000,
        "{system}"
    );
    assert_eq!(queue(&app, "ai").await["paused"], false);
    let resumed = json_of(
        app.post(&admin, "/v1/admin/queues/system/resume", json!({}))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(resumed["paused"], false);
    let resumed_at = std::time::Instant::now();
    for id in &ids {
        let job = app
            .wait_for(id, &["succeeded"], Duration::from_secs(10))
            .await;
        assert_eq!(job["attempts"], 1, "{job}");
    }
    assert!(
        resumed_at.elapsed() < Duration::from_secs(3),
        "resumed within about a second: {:?}",
        resumed_at.elapsed()
    );
    let system = queue(&app, "system").await;
    assert_eq!(
        (system["depth"].as_i64(), system["paused"].as_bool()),
        (Some(0), Some(false))
    );
    app.stop().await;
}

crate::both_backends!(
    the_view_lists_every_queue,
    only_admins_see_or_pause_queues,
    a_paused_queue_waits_and_runs_on_resume,
);
