//! Live events: pushed, not polled. Every test sets the fallback poll to a minute, so an event
//! that arrives within seconds was pushed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, assert_problem, json_of};

/// The fallback poll in these tests: far longer than any wait below.
const SLOW_POLL: (&str, i64) = ("api.events_poll_ms", 60_000);

async fn app(backend: Backend, workers: bool) -> Option<TestApp> {
    TestApp::spawn_with(
        backend,
        Options {
            workers,
            overrides: vec![(SLOW_POLL.0, json!(SLOW_POLL.1))],
            ..Default::default()
        },
    )
    .await
}

/// Reads `status` events from `resp` until `stop` says so or `limit` passes; returns them.
pub(crate) async fn read_events(
    resp: Response,
    limit: Duration,
    stop: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, bool) {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let chunk = tokio::time::timeout_at(deadline, body.next()).await;
        match chunk {
            Ok(Some(Ok(bytes))) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(_) => return (events, true),
            Err(_) => return (events, false),
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if block.contains("event: status")
                && let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: "))
            {
                events.push(serde_json::from_str(data).expect("event data is JSON"));
            }
        }
        if stop(&events) {
            return (events, false);
        }
    }
}

async fn pushed_job_end(backend: Backend) {
    let Some(app) = app(backend, true).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "sleep", "input": {"ms": 300}}))
        .await;
    let started = Instant::now();
    let resp = app
        .get(&app.user_key, &format!("/v1/jobs/{id}/events"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (events, ended) = read_events(resp, Duration::from_secs(15), |_| false).await;
    assert!(ended, "the stream ends after the job's end: {events:?}");
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(json!("succeeded"))
    );
    assert!(
        events.iter().any(|e| e["status"] == "running"),
        "{events:?}"
    );
    // The event is the job's whole view, as a poll answers it (its cost included).
    let polled = json_of(
        app.get(&app.user_key, &format!("/v1/jobs/{id}")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(events.last(), Some(&polled));
    assert_eq!(polled["cost"]["settled"], 0, "{polled}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "pushed, not found by the one-minute poll: {:?}",
        started.elapsed()
    );
    app.stop().await;
}

async fn user_stream_sees_only_own_jobs(backend: Backend) {
    let Some(app) = app(backend, true).await else {
        return;
    };
    let other_key = app.new_user("other@example.com").await;
    let mine = app.get(&app.user_key, "/v1/events").await;
    assert_eq!(mine.status(), StatusCode::OK);
    let theirs = app.get(&other_key, "/v1/events").await;
    assert_eq!(theirs.status(), StatusCode::OK);
    let id = app.submit(json!({"kind": "echo", "input": {"x": 1}})).await;
    let want = id.clone();
    let (events, _) = read_events(mine, Duration::from_secs(15), move |evs| {
        evs.iter()
            .any(|e| e["id"] == want.as_str() && e["status"] == "succeeded")
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| e["id"] == id.as_str() && e["status"] == "succeeded"),
        "the owner's stream shows the job's end: {events:?}"
    );
    let (seen, _) = read_events(theirs, Duration::from_secs(1), |evs| !evs.is_empty()).await;
    assert!(
        seen.is_empty(),
        "another user's stream shows nothing: {seen:?}"
    );
    app.stop().await;
}

async fn stream_survives_lagging(backend: Backend) {
    let Some(app) = app(backend, true).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "sleep", "input": {"ms": 500}}))
        .await;
    let resp = app
        .get(&app.user_key, &format!("/v1/jobs/{id}/events"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // More changes than the broadcast keeps: the stream falls behind and looks again.
    for i in 0..tally_workflows::events::CAPACITY * 3 {
        tally_workflows::events::publish([format!("noise-{i}")]);
    }
    let (events, ended) = read_events(resp, Duration::from_secs(15), |_| false).await;
    assert!(ended, "{events:?}");
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(json!("succeeded"))
    );
    app.stop().await;
}

async fn bad_ids(backend: Backend) {
    let Some(app) = app(backend, false).await else {
        return;
    };
    let resp = app.get(&app.user_key, "/v1/jobs/not-a-job/events").await;
    assert_problem(resp, StatusCode::BAD_REQUEST).await;
    let unknown = uuid::Uuid::now_v7();
    let resp = app
        .get(&app.user_key, &format!("/v1/jobs/{unknown}/events"))
        .await;
    assert_problem(resp, StatusCode::NOT_FOUND).await;
    let resp = app.get("not-a-key", "/v1/events").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

/// On Postgres, a change this process did not make (a statement on another connection, as
/// another process would) reaches the stream through NOTIFY.
async fn another_writer_is_heard(backend: Backend) {
    let Some(app) = app(backend, false).await else {
        return;
    };
    let id = app.submit(json!({"kind": "echo", "input": {}})).await;
    let resp = app
        .get(&app.user_key, &format!("/v1/jobs/{id}/events"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    if backend == Backend::Sqlite {
        // Across processes SQLite has only the fallback poll; nothing to push here.
        let (events, _) = read_events(resp, Duration::from_secs(5), |e| !e.is_empty()).await;
        assert_eq!(
            events.first().map(|e| e["status"].clone()),
            Some(json!("queued"))
        );
        app.stop().await;
        return;
    }
    let tally_workflows::Db::Postgres(pool) = &app.db else {
        panic!("a Postgres app has a Postgres pool");
    };
    let writer = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .expect("another connection");
    let (id2, w) = (id.clone(), writer.clone());
    let write = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query(
            "UPDATE tally_jobs SET status = 'cancelled', cancel_requested = TRUE, \
             finished_at = updated_at, updated_at = updated_at + 1 WHERE id = $1",
        )
        .bind(&id2)
        .execute(&w)
        .await
        .expect("update");
        Instant::now()
    });
    let (events, ended) = read_events(resp, Duration::from_secs(10), |_| false).await;
    let arrived = Instant::now();
    let written = write.await.expect("writer");
    assert!(ended, "{events:?}");
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(json!("cancelled"))
    );
    assert!(
        arrived.duration_since(written) < Duration::from_secs(2),
        "notified, not polled"
    );
    writer.close().await;
    app.stop().await;
}

crate::both_backends!(
    pushed_job_end,
    user_stream_sees_only_own_jobs,
    stream_survives_lagging,
    bad_ids,
    another_writer_is_heard,
);
