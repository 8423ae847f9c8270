//! Bad input of every kind gets a 4xx problem document and loses nothing already stored.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, assert_problem};

async fn bad_inputs_are_4xx(backend: Backend) {
    let opts = Options {
        workers: false,
        overrides: vec![("api.body_limit", json!(4096))],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let kept = app
        .submit(json!({"kind": "echo", "input": {"keep": true}}))
        .await;
    let raw = |body: &'static str, ct: Option<&'static str>| {
        let app = &app;
        async move {
            let mut req = app
                .client
                .post(app.url("/v1/jobs"))
                .bearer_auth(&app.user_key)
                .body(body);
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            req.send().await.unwrap()
        }
    };
    let json_ct = Some("application/json");
    let cases: Vec<(reqwest::Response, StatusCode, &str)> = vec![
        (
            raw("{\"kind\": \"echo\",", json_ct).await,
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            raw("", json_ct).await,
            StatusCode::BAD_REQUEST,
            "empty body",
        ),
        (
            raw("{\"kind\": 5}", json_ct).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "kind of the wrong type",
        ),
        (
            raw("{\"input\": 1}", json_ct).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "kind missing",
        ),
        (
            raw("{\"kind\": \"echo\", \"colour\": 1}", json_ct).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field",
        ),
        (
            raw("{\"kind\": \"echo\"}", None).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "no content type",
        ),
        (
            raw("{\"kind\": \"echo\"}", Some("text/plain")).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "wrong content type",
        ),
    ];
    for (resp, status, what) in cases {
        let got = resp.status();
        assert_eq!(got, status, "{what}");
        assert_problem(resp, status).await;
    }
    let big = json!({"kind": "echo", "input": "x".repeat(10_000)});
    assert_problem(
        app.post(&app.user_key, "/v1/jobs", big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    for (body, what) in [
        (json!({"kind": "teleport"}), "unknown kind"),
        (
            json!({"kind": "sleep", "input": {"ms": "soon"}}),
            "sleep.ms not a number",
        ),
        (
            json!({"kind": "sleep", "input": {"ms": 99_999_999_999u64}}),
            "sleep too long",
        ),
        (json!({"kind": "fail", "input": {}}), "fail.times missing"),
        (
            json!({"kind": "echo", "priority": 101}),
            "priority too high",
        ),
        (json!({"kind": "echo", "priority": -1}), "priority negative"),
        (
            json!({"kind": "echo", "max_attempts": 0}),
            "max_attempts zero",
        ),
        (
            json!({"kind": "echo", "run_at": "tomorrow"}),
            "run_at not a timestamp",
        ),
    ] {
        let p = assert_problem(
            app.post(&app.user_key, "/v1/jobs", body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(!p["detail"].as_str().unwrap().is_empty(), "{what}");
    }
    let unknown = assert_problem(
        app.post(&app.user_key, "/v1/jobs", json!({"kind": "teleport"}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        unknown["detail"]
            .as_str()
            .unwrap()
            .contains("unknown job kind")
    );
    // A bad Idempotency-Key header.
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(&app.user_key)
        .header("Idempotency-Key", "x".repeat(300))
        .json(&json!({"kind": "echo"}))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::BAD_REQUEST).await;
    // Bad ids, bad query parameters, unknown routes and methods.
    for path in [
        "/v1/jobs/not-a-uuid",
        "/v1/jobs/123/cancel",
        "/v1/jobs?status=weird",
        "/v1/jobs?limit=0",
        "/v1/jobs?limit=abc",
        "/v1/jobs?cursor=zzz",
        "/v1/jobs?kind=teleport",
        "/v1/jobs?kind=%00",
    ] {
        let resp = if path.ends_with("cancel") {
            app.post(&app.user_key, path, json!({})).await
        } else {
            app.get(&app.user_key, path).await
        };
        assert_problem(resp, StatusCode::BAD_REQUEST).await;
    }
    let missing = uuid::Uuid::now_v7();
    assert_problem(
        app.get(&app.user_key, &format!("/v1/jobs/{missing}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_problem(
        app.get(&app.user_key, "/v1/nothing-here").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let delete = app
        .client
        .delete(app.url("/v1/jobs"))
        .bearer_auth(&app.user_key)
        .send()
        .await
        .unwrap();
    assert_problem(delete, StatusCode::METHOD_NOT_ALLOWED).await;
    // Nothing was lost or added.
    let list: Value = app
        .get(&app.user_key, "/v1/jobs")
        .await
        .json()
        .await
        .unwrap();
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], kept.as_str());
    assert_eq!(jobs[0]["input"], json!({"keep": true}));
    app.stop().await;
}

crate::both_backends!(bad_inputs_are_4xx);
