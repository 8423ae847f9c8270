//! The model catalog, preferences and cost estimates.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, assert_problem};

async fn ok(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let body = resp.text().await.expect("body");
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).expect("json")
}

async fn offline_catalog_preferences_and_estimates(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let key = app.user_key.clone();
    // With no provider configured, the offline models, which say so.
    let list = ok(app.get(&key, "/v1/models").await).await;
    let models = list["models"].as_array().expect("models");
    let ids: Vec<&str> = models.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["offline-chat", "offline-image"]);
    assert!(
        models
            .iter()
            .all(|m| m["offline"] == true && m["provider"] == "offline")
    );
    assert_eq!(models[0]["kind"], "chat");
    assert_eq!(models[0]["prices"]["output_per_1k_tokens"], 2);
    assert_eq!(models[1]["prices"]["per_image"], 5);

    // Defaults, then the user's own.
    let p = ok(app.get(&key, "/v1/models/preferences").await).await;
    assert_eq!(p["chat_model"], "offline-chat");
    assert_eq!(p["max_tokens"], 512);
    let put = |body: Value| {
        app.client
            .put(app.url("/v1/models/preferences"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let p = ok(put(json!({ "chat_model": "offline-chat", "image_model": null, "temperature": 0.5, "max_tokens": 1000 })).await.expect("send")).await;
    assert_eq!(p["max_tokens"], 1000);
    assert_eq!(p["temperature"], 0.5);
    for bad in [
        json!({ "chat_model": "offline-image", "image_model": null, "temperature": null, "max_tokens": null }),
        json!({ "chat_model": "gpt-9", "image_model": null, "temperature": null, "max_tokens": null }),
        json!({ "chat_model": null, "image_model": null, "temperature": 3.0, "max_tokens": null }),
        json!({ "chat_model": null, "image_model": null, "temperature": null, "max_tokens": 0 }),
        json!({ "chat_model": null, "image_model": null, "temperature": null, "max_tokens": null, "x": 1 }),
    ] {
        let resp = put(bad.clone()).await.expect("send");
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let p = ok(app.get(&key, "/v1/models/preferences").await).await;
    assert_eq!(p["max_tokens"], 1000, "a refused update changed nothing");

    // Estimates follow the published rule: tokens = ceil(chars / 4) + 4 per message; credits =
    // ceil(input * 1 / 1000) + ceil(max_output * 2 / 1000).
    let e = ok(app
        .post(
            &key,
            "/v1/models/estimate-cost",
            json!({ "content": "x".repeat(4000) }),
        )
        .await)
    .await;
    assert_eq!(e["input_tokens"], 1004);
    assert_eq!(e["max_output_tokens"], 1000, "the user's max_tokens");
    assert_eq!(e["credits"], 2 + 2);
    let e = ok(app
        .post(
            &key,
            "/v1/models/estimate-cost",
            json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 10 }),
        )
        .await)
    .await;
    assert_eq!(e["input_tokens"], 5);
    assert_eq!(e["credits"], 1 + 1);
    let e = ok(app
        .post(
            &key,
            "/v1/models/estimate-cost",
            json!({ "kind": "image", "n": 3 }),
        )
        .await)
    .await;
    assert_eq!(
        (e["model"].as_str(), e["credits"].as_i64()),
        (Some("offline-image"), Some(15))
    );
    for bad in [
        json!({ "kind": "video" }),
        json!({ "model": "offline-image", "content": "hi" }),
        json!({ "kind": "image", "n": 0 }),
        json!({ "messages": [{ "role": "robot", "content": "hi" }] }),
        json!({ "content": "x".repeat(40000) }),
        json!({ "content": 5 }),
    ] {
        let resp = app
            .post(&key, "/v1/models/estimate-cost", bad.clone())
            .await;
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let resp = app
        .client
        .get(app.url("/v1/models"))
        .send()
        .await
        .expect("send");
    assert_problem(resp, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

async fn configured_catalog(backend: Backend) {
    let opts = Options {
        workers: false,
        overrides: vec![
            (
                "ai.providers",
                json!([
                    { "name": "main", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-test" },
                    { "name": "backup", "base_url": "http://127.0.0.1:9" }
                ]),
            ),
            (
                "ai.models",
                json!([
                    { "id": "big-chat", "provider": "main", "kind": "chat", "input_per_1k": 3,
                      "output_per_1k": 15, "context_window": 128000, "fallback": "backup" },
                    { "id": "painter", "provider": "main", "kind": "image", "per_image": 40 }
                ]),
            ),
        ],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let list = ok(app.get(&app.user_key, "/v1/models").await).await;
    let models = list["models"].as_array().expect("models");
    assert_eq!(
        models.len(),
        2,
        "configured models only, no offline ones: {list}"
    );
    assert_eq!(models[0]["id"], "big-chat");
    assert_eq!(models[0]["fallback"], "backup");
    assert_eq!(models[0]["offline"], false);
    let e = ok(app
        .post(
            &app.user_key,
            "/v1/models/estimate-cost",
            json!({ "content": "hello", "max_tokens": 1000 }),
        )
        .await)
    .await;
    assert_eq!(e["model"], "big-chat");
    assert_eq!(e["credits"], 1 + 15);
    app.stop().await;
}

crate::both_backends!(
    offline_catalog_preferences_and_estimates,
    configured_catalog
);
