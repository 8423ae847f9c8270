//! Image generation: offline images, and a scripted OpenAI-compatible server. The bytes are
//! served from the image folder; credits are settled for the images actually made.

use std::{sync::Arc, time::Duration};

use axum::{Json, Router, routing::post};
use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, assert_problem, json_of};

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";

async fn offline_images(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let key = app.user_key.clone();
    // No credits: 402, no job.
    let resp = app
        .post(
            &key,
            "/v1/images/generate",
            json!({ "prompt": "a red fox" }),
        )
        .await;
    assert_problem(resp, StatusCode::PAYMENT_REQUIRED).await;
    app.grant(&app.user_id, 100).await;
    let asked = json_of(
        app.post(
            &key,
            "/v1/images/generate",
            json!({ "prompt": "a red fox", "size": "256x256", "n": 2 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(asked["estimate"]["credits"], 10);
    let job_id = asked["job_id"].as_str().expect("job id").to_owned();
    app.wait_for(&job_id, &["succeeded"], Duration::from_secs(20))
        .await;
    let done = json_of(
        app.get(&key, &format!("/v1/images/generate/{job_id}"))
            .await,
        StatusCode::OK,
    )
    .await;
    let made = done["images"].as_array().expect("images").clone();
    assert_eq!(made.len(), 2, "{done}");
    assert_eq!(done["cost"]["settled"], 10, "{done}");
    assert_eq!(made[0]["provider"], "offline");
    assert_eq!(app.balance(&key).await, (90, 0));

    let content = made[0]["content"]
        .as_str()
        .expect("content link")
        .to_owned();
    let resp = app.get(&key, &content).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"image/png"[..])
    );
    let bytes = resp.bytes().await.expect("bytes");
    assert!(bytes.starts_with(PNG), "a PNG");
    assert_eq!(made[0]["bytes"].as_u64(), Some(bytes.len() as u64));
    // Width and height from the IHDR chunk.
    assert_eq!(&bytes[16..24], &[0, 0, 1, 0, 0, 0, 1, 0]);

    let list = json_of(app.get(&key, "/v1/images?limit=1").await, StatusCode::OK).await;
    assert_eq!(list["images"].as_array().map(Vec::len), Some(1));
    assert!(list["next_cursor"].is_string());

    // Another user sees none of it.
    let other = app.new_user("other@example.com").await;
    assert_problem(app.get(&other, &content).await, StatusCode::NOT_FOUND).await;
    assert_problem(
        app.get(&other, &format!("/v1/images/generate/{job_id}"))
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let resp = app
        .client
        .delete(app.url(&format!(
            "/v1/images/{}",
            made[0]["id"].as_str().expect("id")
        )))
        .bearer_auth(&other)
        .send()
        .await
        .expect("send");
    assert_problem(resp, StatusCode::NOT_FOUND).await;

    // Delete: the bytes and the record go.
    let resp = app
        .client
        .delete(app.url(&format!(
            "/v1/images/{}",
            made[0]["id"].as_str().expect("id")
        )))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_problem(app.get(&key, &content).await, StatusCode::NOT_FOUND).await;
    let list = json_of(app.get(&key, "/v1/images").await, StatusCode::OK).await;
    assert_eq!(list["images"].as_array().map(Vec::len), Some(1));

    for body in [
        json!({ "prompt": "" }),
        json!({ "prompt": "fox\u{0}" }),
        json!({ "prompt": "fox", "size": "7x7" }),
        json!({ "prompt": "fox", "n": 11 }),
        json!({ "prompt": "fox", "model": "offline-chat" }),
        json!({ "prompt": "fox", "style": "bold" }),
    ] {
        let resp = app.post(&key, "/v1/images/generate", body.clone()).await;
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    assert_problem(
        app.get(&key, "/v1/images/..%2Fetc/content").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_problem(
        app.get(&key, "/v1/images/generate/not-a-job").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(
        app.balance(&key).await,
        (90, 0),
        "refused requests held nothing"
    );
    app.stop().await;
}

async fn provider_images_settle_what_was_made(backend: Backend) {
    // The provider makes one image, whatever was asked for.
    let image =
        base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nnot really a picture");
    let reply = Arc::new(json!({ "created": 1, "data": [{ "b64_json": image }] }));
    let router = Router::new().route(
        "/v1/images/generations",
        post(move |Json(_): Json<Value>| {
            let reply = reply.clone();
            async move { Json((*reply).clone()) }
        }),
    );
    let url = crate::helpers::serve_router(router).await;
    let opts = Options {
        overrides: vec![
            (
                "ai.providers",
                json!([{ "name": "art", "base_url": url, "retry_base_ms": 10 }]),
            ),
            (
                "ai.models",
                json!([{ "id": "painter", "provider": "art", "kind": "image", "per_image": 40 }]),
            ),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let key = app.user_key.clone();
    app.grant(&app.user_id, 100).await;
    let asked = json_of(
        app.post(
            &key,
            "/v1/images/generate",
            json!({ "prompt": "two cats", "n": 2 }),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(asked["estimate"]["credits"], 80);
    let job_id = asked["job_id"].as_str().expect("job id").to_owned();
    app.wait_for(&job_id, &["succeeded"], Duration::from_secs(20))
        .await;
    let done = json_of(
        app.get(&key, &format!("/v1/images/generate/{job_id}"))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(done["images"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        done["cost"]["settled"], 40,
        "one image made, one paid: {done}"
    );
    assert_eq!(app.balance(&key).await, (60, 0));
    let content = done["images"][0]["content"]
        .as_str()
        .expect("link")
        .to_owned();
    let bytes = app.get(&key, &content).await.bytes().await.expect("bytes");
    assert_eq!(&bytes[..], b"\x89PNG\r\n\x1a\nnot really a picture");
    app.stop().await;
}

crate::both_backends!(offline_images, provider_images_settle_what_was_made);
