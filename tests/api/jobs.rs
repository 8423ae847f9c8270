//! The job lifecycle through the API: submit, poll, retries, dead and retry, cancel, events.

use std::time::{Duration, Instant};

use chrono::DateTime;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, assert_problem};

fn ms(v: &Value) -> i64 {
    DateTime::parse_from_rfc3339(v.as_str().expect("timestamp"))
        .expect("rfc3339")
        .timestamp_millis()
}

async fn submit_and_poll(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let input = json!({"prompt": "hello", "n": [1, 2, 3]});
    let resp = app
        .post(
            &app.user_key,
            "/v1/jobs",
            json!({"kind": "echo", "input": input}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let accepted: Value = resp.json().await.unwrap();
    assert_eq!(accepted["status"], "queued");
    let id = accepted["id"].as_str().unwrap();
    let job = app
        .wait_for(id, &["succeeded"], Duration::from_secs(10))
        .await;
    assert_eq!(job["result"], input);
    assert_eq!(job["kind"], "echo");
    assert_eq!(job["attempts"], 1);
    assert!(job["error"].is_null());
    assert!(job["worker"].as_str().is_some_and(|w| !w.is_empty()));
    let (created, started, finished) = (
        ms(&job["created_at"]),
        ms(&job["started_at"]),
        ms(&job["finished_at"]),
    );
    assert!(created <= started && started <= finished, "{job}");
    // The queue task is gone with the outcome that completed it.
    assert_eq!(app.tasks_of(id).await, 0);
    app.stop().await;
}

async fn idempotency(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let send = |body: Value, key: &'static str, api_key: String| {
        let app = &app;
        async move {
            app.client
                .post(app.url("/v1/jobs"))
                .bearer_auth(api_key)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let body = json!({"kind": "echo", "input": {"x": 1}});
    let first = send(body.clone(), "order-1", app.user_key.clone()).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let again = send(body.clone(), "order-1", app.user_key.clone()).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers().get("idempotent-replayed").unwrap(), "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let other = send(
        json!({"kind": "echo", "input": {"x": 2}}),
        "order-1",
        app.user_key.clone(),
    )
    .await;
    let problem = assert_problem(other, StatusCode::CONFLICT).await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("idempotency-conflict")
    );
    // Keys belong to their user: another user's same key makes another job.
    let bob = app.new_user("bob@example.com").await;
    let theirs: Value = send(body.clone(), "order-1", bob)
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(theirs["id"], first["id"]);
    // Concurrent replays still make exactly one job.
    let replays = futures::future::join_all(
        (0..10).map(|_| send(body.clone(), "order-2", app.user_key.clone())),
    )
    .await;
    let mut ids = Vec::new();
    for r in replays {
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        ids.push(r.json::<Value>().await.unwrap()["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let list: Value = app
        .get(&app.user_key, "/v1/jobs")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
    app.stop().await;
}

async fn retries_wait_for_backoff(backend: Backend) {
    let opts = Options {
        workers: true,
        overrides: vec![("jobs.retry_base_ms", json!(1000))],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "fail", "input": {"times": 2}, "max_attempts": 5}))
        .await;
    let start = Instant::now();
    let mut due: Option<(i64, i64)> = None; // (attempt that failed, its next run_at)
    let mut checked = 0;
    loop {
        let job = app.job(&id).await;
        let now = chrono::Utc::now().timestamp_millis();
        let attempts = job["attempts"].as_i64().unwrap();
        if let Some((failed, run_at)) = due
            && attempts > failed
        {
            assert!(
                now + 50 >= run_at,
                "attempt {attempts} started {}ms before its run_at",
                run_at - now
            );
            checked += 1;
            due = None;
        }
        if job["status"] == "failed" && due.is_none() {
            let run_at = ms(&job["run_at"]);
            let failed_at = ms(&job["updated_at"]);
            let delay = run_at - failed_at;
            // 1 s base doubling per failure, with up to one more delay of jitter.
            let floor = 1000 * 2i64.pow(attempts as u32 - 1);
            assert!(
                delay >= floor && delay <= 2 * floor + 50,
                "attempt {attempts}: delay {delay}ms, floor {floor}ms"
            );
            assert!(
                job["error"]
                    .as_str()
                    .unwrap()
                    .contains("failing on purpose")
            );
            due = Some((attempts, run_at));
        }
        if job["status"] == "succeeded" {
            assert_eq!(job["attempts"], 3);
            assert_eq!(job["result"], json!({"attempts": 3}));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "job stuck: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        checked, 2,
        "both retries were observed waiting for their time"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(3000),
        "two retries took at least 1 s + 2 s"
    );
    // Each failed attempt's task was completed as its retry's task was pushed; the last
    // attempt's task went with the success.
    assert_eq!(app.tasks_of(&id).await, 0);
    app.stop().await;
}

async fn dead_then_retry(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "fail", "input": {"times": 5}, "max_attempts": 2}))
        .await;
    let job = app.wait_for(&id, &["dead"], Duration::from_secs(15)).await;
    assert_eq!(job["attempts"], 2);
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("failing on purpose")
    );
    assert!(job["finished_at"].is_string());
    // Retry of a job that is not dead is refused.
    let ok = app.submit(json!({"kind": "echo"})).await;
    app.wait_for(&ok, &["succeeded"], Duration::from_secs(10))
        .await;
    assert_problem(
        app.post(&app.user_key, &format!("/v1/jobs/{ok}/retry"), json!({}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    // A dead job runs again with fresh attempts.
    let resp = app
        .post(&app.user_key, &format!("/v1/jobs/{id}/retry"), json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let requeued: Value = resp.json().await.unwrap();
    assert_eq!(requeued["status"], "queued");
    assert_eq!(requeued["attempts"], 0);
    let job = app.wait_for(&id, &["dead"], Duration::from_secs(15)).await;
    assert_eq!(job["attempts"], 2, "ran its two attempts again: {job}");
    app.stop().await;
}

async fn cancel_queued(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let later = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let id = app
        .submit(json!({"kind": "echo", "input": 1, "run_at": later}))
        .await;
    assert_eq!(
        app.tasks_of(&id).await,
        1,
        "its queue task waits for run_at"
    );
    let resp = app
        .post(&app.user_key, &format!("/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["status"], "cancelled");
    // Past its run_at, the task is fetched and dropped: the job never runs.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let job = app.job(&id).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["attempts"], 0);
    assert!(job["started_at"].is_null() && job["result"].is_null());
    // The task that ran no attempt is completed all the same.
    assert_eq!(app.tasks_of(&id).await, 0);
    assert_problem(
        app.post(&app.user_key, &format!("/v1/jobs/{id}/cancel"), json!({}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    app.stop().await;
}

async fn cancel_running(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "sleep", "input": {"ms": 20000}}))
        .await;
    app.wait_for(&id, &["running"], Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let resp = app
        .post(&app.user_key, &format!("/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["cancel_requested"], true);
    let job = app
        .wait_for(&id, &["cancelled"], Duration::from_secs(5))
        .await;
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "stopped at its next check"
    );
    assert_eq!(job["attempts"], 1);
    assert!(
        job["progress"]["done_ms"].as_u64().unwrap() >= 100,
        "it reported progress: {job}"
    );
    assert!(job["result"].is_null());
    app.stop().await;
}

async fn events_stream(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "sleep", "input": {"ms": 600}}))
        .await;
    let resp = app
        .get(&app.user_key, &format!("/v1/jobs/{id}/events"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends when the job ends: {text}");
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert!(text.contains("event: status"));
    assert_eq!(statuses.last(), Some(&"succeeded"), "{statuses:?}");
    assert!(statuses.contains(&"running"), "{statuses:?}");
    let progress: Vec<u64> = events
        .iter()
        .filter_map(|e| e["progress"]["percent"].as_u64())
        .collect();
    assert!(
        progress.len() >= 2 && progress.windows(2).all(|w| w[0] <= w[1]),
        "progress rises: {progress:?}"
    );
    app.stop().await;
}

async fn list_and_page(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.submit(json!({"kind": "echo", "input": i})).await);
    }
    app.submit(json!({"kind": "sleep", "input": {"ms": 1}}))
        .await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?kind=echo&limit=2&cursor={c}"),
            None => "/v1/jobs?kind=echo&limit=2".to_owned(),
        };
        let page: Value = app.get(&app.user_key, &path).await.json().await.unwrap();
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");
    let queued: Value = app
        .get(&app.user_key, "/v1/jobs?status=queued")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 6);
    let none: Value = app
        .get(&app.user_key, "/v1/jobs?status=succeeded")
        .await
        .json()
        .await
        .unwrap();
    assert!(none["jobs"].as_array().unwrap().is_empty());
    app.stop().await;
}

async fn priorities_run_first(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let low = app.submit(json!({"kind": "echo", "priority": 0})).await;
    let high = app.submit(json!({"kind": "echo", "priority": 90})).await;
    let cfg = crate::helpers::test_config(
        &app.url,
        &[
            ("worker.concurrency", json!(1)),
            ("worker.batch_size", json!(1)),
        ],
    );
    let pool = tally_workers::WorkerPool::new(app.db.clone(), cfg);
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(pool.run(stop.clone().cancelled_owned()));
    let low = app
        .wait_for(&low, &["succeeded"], Duration::from_secs(10))
        .await;
    let high = app
        .wait_for(&high, &["succeeded"], Duration::from_secs(10))
        .await;
    assert!(
        ms(&high["started_at"]) <= ms(&low["started_at"]),
        "high priority first: {high} {low}"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
    app.stop().await;
}

async fn health(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let h = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(h.status(), StatusCode::OK);
    let r: Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "ready");
    app.stop().await;
}

/// A failure of an attempt whose job was asked to stop ends the job as cancelled: no retry.
async fn failure_after_cancel_request_is_final(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "fail", "input": {"times": 3}}))
        .await;
    let claimed = tally_workflows::jobs::claim_next(
        &app.db,
        "w:1",
        "system",
        10,
        &tally_workflows::limits::Limits::none(),
    )
    .await
    .unwrap();
    let [claimed] = &claimed[..] else {
        panic!("one job claimed: {claimed:?}");
    };
    assert_eq!(claimed.id, id);
    let resp = app
        .post(&app.user_key, &format!("/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let finish = tally_workflows::jobs::plan(
        claimed,
        tally_workflows::jobs::Outcome::Failed("boom".into()),
        |_| Duration::from_secs(1),
    );
    let done = tally_workflows::jobs::finish_many(&app.db, "w:1", vec![finish], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(done[0], tally_workflows::jobs::Status::Cancelled);
    let job = app.job(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["finished_at"].is_string());
    app.stop().await;
}

/// A worker whose queue went idle takes each new job within its poll interval. apalis' own
/// interval strategy lost its wake-up whenever a fetch outlasted the interval and found
/// nothing: with a 1 ms interval that is every idle fetch, and the worker then slept until its
/// next heartbeat (10 s with a 30 s lease).
async fn an_idle_worker_takes_each_new_job_promptly(backend: Backend) {
    let opts = Options {
        overrides: vec![
            ("worker.poll_ms", json!(1)),
            ("worker.lease_secs", json!(30)),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    for i in 0..10 {
        // Idle first: the worker's fetches come back empty.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let id = app.submit(json!({"kind": "echo", "input": i})).await;
        let job = app
            .wait_for(&id, &["succeeded"], Duration::from_secs(3))
            .await;
        assert_eq!(job["result"], i);
    }
    app.stop().await;
}

/// An idle worker is woken by each new task, not by its poll: by the task's notification on
/// Postgres, by the commit that stored it on SQLite. With a ten-minute poll interval (and a
/// 10 s heartbeat) a new job still runs at once, after the database has been quiet too.
async fn new_tasks_wake_idle_workers(backend: Backend) {
    let opts = Options {
        overrides: vec![
            ("worker.poll_ms", json!(600_000)),
            ("worker.lease_secs", json!(30)),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    // Quiet long enough for SQLite's watch to look at its slowest.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let id = app.submit(json!({"kind": "echo", "input": i})).await;
        app.wait_for(&id, &["succeeded"], Duration::from_secs(3))
            .await;
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    app.stop().await;
}

/// Connections the server dropped (as a restart does) cost no submission: the transaction
/// that meets one begins again on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replaces_connections_the_server_dropped() {
    let Some(app) = TestApp::spawn_api_only(Backend::Postgres).await else {
        return;
    };
    // Several pooled connections, all idle for less than a second afterwards.
    let firsts: Vec<_> = (0..8)
        .map(|i| {
            app.post(
                &app.user_key,
                "/v1/jobs",
                json!({"kind": "echo", "input": i}),
            )
        })
        .collect();
    for resp in futures::future::join_all(firsts).await {
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&app.url)
        .await
        .expect("connect");
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .expect("terminate");
    assert!(!dropped.is_empty(), "the app held no connection");
    let resp = app
        .post(
            &app.user_key,
            "/v1/jobs",
            json!({"kind": "echo", "input": "after"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().await.expect("json");
    assert_eq!(
        app.job(job["id"].as_str().expect("id")).await["status"],
        "queued"
    );
    app.stop().await;
}

crate::both_backends!(
    new_tasks_wake_idle_workers,
    an_idle_worker_takes_each_new_job_promptly,
    failure_after_cancel_request_is_final,
    submit_and_poll,
    idempotency,
    retries_wait_for_backoff,
    dead_then_retry,
    cancel_queued,
    cancel_running,
    events_stream,
    list_and_page,
    priorities_run_first,
    health,
);
