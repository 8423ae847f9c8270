//! API keys, roles, and isolation between users.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, assert_problem};

async fn keys_and_roles(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    // No key, a malformed header, an unknown key.
    let none = app.client.get(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    assert_problem(none, StatusCode::UNAUTHORIZED).await;
    let basic = app
        .client
        .get(app.url("/v1/jobs"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_problem(basic, StatusCode::UNAUTHORIZED).await;
    assert_problem(
        app.get("tly_not_a_key", "/v1/jobs").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // Only admins create users.
    let denied = app
        .post(
            &app.user_key,
            "/v1/users",
            json!({"email": "x@example.com"}),
        )
        .await;
    assert_problem(denied, StatusCode::FORBIDDEN).await;
    let created = app
        .post(
            &app.admin_key,
            "/v1/users",
            json!({"email": "Carol@Example.com", "role": "admin"}),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let carol: Value = created.json().await.unwrap();
    assert_eq!(carol["email"], "carol@example.com");
    assert_eq!(carol["role"], "admin");
    let key = carol["api_key"].as_str().unwrap();
    assert!(key.starts_with("tly_") && key.len() > 40);
    // The key works, and it is not stored in the clear.
    assert_eq!(app.get(key, "/v1/jobs").await.status(), StatusCode::OK);
    let stored: i64 = match &app.db {
        tally_workflows::Db::Postgres(p) => {
            sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE key_hash = $1")
                .bind(key)
                .fetch_one(p)
                .await
                .unwrap()
        }
        tally_workflows::Db::Sqlite(p) => {
            sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE key_hash = $1")
                .bind(key)
                .fetch_one(p)
                .await
                .unwrap()
        }
    };
    assert_eq!(stored, 0);
    // Duplicates and bad values.
    assert_problem(
        app.post(
            &app.admin_key,
            "/v1/users",
            json!({"email": "carol@example.com"}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_problem(
        app.post(
            &app.admin_key,
            "/v1/users",
            json!({"email": "not-an-email"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let nul = json!({"email": "nul\u{0}@example.com"});
    assert_problem(
        app.post(&app.admin_key, "/v1/users", nul).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_problem(
        app.post(
            &app.admin_key,
            "/v1/users",
            json!({"email": "d@example.com", "role": "root"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    app.stop().await;
}

async fn users_see_only_their_jobs(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let id = app.submit(json!({"kind": "echo", "input": "mine"})).await;
    let bob = app.new_user("bob@example.com").await;
    for (method, path) in [
        ("GET", format!("/v1/jobs/{id}")),
        ("POST", format!("/v1/jobs/{id}/cancel")),
        ("POST", format!("/v1/jobs/{id}/retry")),
        ("GET", format!("/v1/jobs/{id}/events")),
    ] {
        let resp = match method {
            "GET" => app.get(&bob, &path).await,
            _ => app.post(&bob, &path, json!({})).await,
        };
        assert_problem(resp, StatusCode::NOT_FOUND).await;
    }
    let list: Value = app.get(&bob, "/v1/jobs").await.json().await.unwrap();
    assert!(list["jobs"].as_array().unwrap().is_empty());
    // Bob's failed attempts changed nothing; the owner and an admin still see the job.
    let job = app.job(&id).await;
    assert_eq!(job["status"], "queued");
    assert!(!job["cancel_requested"].as_bool().unwrap());
    assert_eq!(
        app.get(&app.admin_key, &format!("/v1/jobs/{id}"))
            .await
            .status(),
        StatusCode::OK
    );
    app.stop().await;
}

crate::both_backends!(keys_and_roles, users_see_only_their_jobs);
