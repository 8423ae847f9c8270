//! The OpenAI-compatible provider adapter against real loopback HTTP servers, each scripted per
//! test, and the offline provider.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use tally_workers::ai::{
    AiError, ChatMessage, ChatRequest, ImageRequest, Provider, ProviderSettings, Providers, Route,
    Usage, tokens,
};

// ---------------------------------------------------------------------------------------------
// The scripted server.

/// One scripted answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn json(body: Value) -> Reply {
        Reply::status(200, body.to_string())
    }

    fn status(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".to_string())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }

    fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// What the server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    authorization: Option<String>,
    body: Option<Value>,
    at: Instant,
}

struct Script {
    /// Answers in order; the last one repeats.
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts a request as in flight until dropped, even when the client gives up on it.
struct InFlight<'a>(&'a Script);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(
    State(script): State<Arc<Script>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = script.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    script.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _in_flight = InFlight(&script);
    lock(&script.seen).push(Seen {
        method,
        path: uri.path().to_string(),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string),
        body: serde_json::from_slice(&body).ok(),
        at: Instant::now(),
    });
    let reply = {
        let mut replies = lock(&script.replies);
        if replies.len() > 1 {
            replies.pop_front()
        } else {
            replies.front().cloned()
        }
    };
    let Some(reply) = reply else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    tokio::time::sleep(reply.delay).await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    for (name, value) in reply.headers {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// A loopback server answering every request with the script.
struct Server {
    url: String,
    script: Arc<Script>,
}

impl Server {
    async fn start(replies: Vec<Reply>) -> Server {
        let script = Arc::new(Script {
            replies: Mutex::new(replies.into()),
            seen: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(answer).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server {
            url: format!("http://{addr}"),
            script,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        lock(&self.script.seen).clone()
    }

    fn hits(&self) -> usize {
        lock(&self.script.seen).len()
    }
}

fn settings(name: &str, base_url: &str) -> ProviderSettings {
    ProviderSettings {
        name: name.to_string(),
        base_url: base_url.to_string(),
        api_key: Some("test-key".to_string()),
        timeout: Duration::from_secs(5),
        max_retries: 3,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        max_concurrency: 8,
    }
}

fn provider(settings: ProviderSettings) -> Provider {
    Provider::new(settings).expect("valid provider settings")
}

fn chat_request(model: &str) -> ChatRequest {
    ChatRequest {
        model: model.to_string(),
        messages: vec![
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", "Say hello."),
        ],
        temperature: Some(0.5),
        max_tokens: Some(64),
    }
}

fn completion(content: &str, usage: Option<(u64, u64)>) -> Value {
    let mut body = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "test-model-2024",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }]
    });
    if let Some((prompt, completion)) = usage {
        body["usage"] = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion
        });
    }
    body
}

// ---------------------------------------------------------------------------------------------
// 1. Success.

#[tokio::test]
async fn chat_success_reports_usage_and_sends_the_request() {
    let server = Server::start(vec![Reply::json(completion("Hello!", Some((21, 3))))]).await;
    let provider = provider(settings("alpha", &server.url));
    let req = chat_request("test-model");

    let reply = provider.chat(&req).await.expect("chat succeeds");

    assert_eq!(reply.content, "Hello!");
    assert_eq!(
        reply.usage,
        Usage {
            input_tokens: 21,
            output_tokens: 3
        }
    );
    assert_eq!(reply.provider, "alpha");
    assert_eq!(reply.model, "test-model");
    assert_eq!(provider.name(), "alpha");

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.method, Method::POST);
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.authorization.as_deref(), Some("Bearer test-key"));
    let body = request.body.as_ref().expect("a JSON body");
    assert_eq!(body["model"], "test-model");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."}
        ])
    );
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["max_tokens"], 64);
}

#[tokio::test]
async fn chat_without_usage_or_options_estimates_tokens() {
    let server = Server::start(vec![Reply::json(completion("Hi there, friend.", None))]).await;
    let mut settings = settings("alpha", &format!("{}/v1", server.url));
    settings.api_key = None;
    let provider = provider(settings);
    let mut req = chat_request("test-model");
    req.temperature = None;
    req.max_tokens = None;

    let reply = provider.chat(&req).await.expect("chat succeeds");

    assert_eq!(
        reply.usage,
        Usage {
            input_tokens: tokens::count_messages(&req.messages),
            output_tokens: tokens::count("Hi there, friend."),
        }
    );
    let seen = server.seen();
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].authorization, None);
    let body = seen[0].body.as_ref().expect("a JSON body");
    assert!(body.get("temperature").is_none(), "{body}");
    assert!(body.get("max_tokens").is_none(), "{body}");
}

// ---------------------------------------------------------------------------------------------
// 2-6. Retries.

#[tokio::test]
async fn rate_limit_waits_for_retry_after() {
    let server = Server::start(vec![
        Reply::status(429, r#"{"error":{"message":"slow down"}}"#).header("retry-after", "1"),
        Reply::json(completion("finally", Some((5, 1)))),
    ])
    .await;
    let mut settings = settings("alpha", &server.url);
    settings.retry_max = Duration::from_secs(5);
    let provider = provider(settings);

    let started = Instant::now();
    let reply = provider
        .chat(&chat_request("test-model"))
        .await
        .expect("the second try succeeds");

    assert_eq!(reply.content, "finally");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let waited = seen[1].at - seen[0].at;
    assert!(waited >= Duration::from_millis(950), "waited {waited:?}");
    assert!(started.elapsed() >= Duration::from_millis(950));
    // The Retry-After wait, not some longer backoff.
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
}

#[tokio::test]
async fn retry_after_is_capped_at_retry_max() {
    let server = Server::start(vec![
        Reply::status(429, "").header("retry-after", "3600"),
        Reply::json(completion("ok", Some((5, 1)))),
    ])
    .await;
    let provider = provider(settings("alpha", &server.url));

    let started = Instant::now();
    let reply = provider.chat(&chat_request("test-model")).await;

    assert_eq!(reply.map(|reply| reply.content), Ok("ok".to_string()));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn server_error_is_retried() {
    let server = Server::start(vec![
        Reply::status(500, r#"{"error":{"message":"oops"}}"#),
        Reply::json(completion("recovered", Some((5, 1)))),
    ])
    .await;
    let provider = provider(settings("alpha", &server.url));

    let reply = provider.chat(&chat_request("test-model")).await;

    assert_eq!(
        reply.map(|reply| reply.content),
        Ok("recovered".to_string())
    );
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn persistent_server_errors_become_retryable() {
    let server = Server::start(vec![Reply::status(502, "bad gateway")]).await;
    let provider = provider(settings("alpha", &server.url));

    let error = provider
        .chat(&chat_request("test-model"))
        .await
        .expect_err("always 502");

    assert!(
        matches!(&error, AiError::Retryable(message) if message.contains("502")),
        "{error:?}"
    );
    assert_eq!(server.hits(), 4, "max_retries + 1 attempts");
}

#[tokio::test]
async fn timeouts_are_retried_then_retryable() {
    let server = Server::start(vec![
        Reply::json(completion("too late", None)).delay(Duration::from_secs(5)),
    ])
    .await;
    let mut settings = settings("alpha", &server.url);
    settings.timeout = Duration::from_millis(200);
    settings.max_retries = 2;
    let provider = provider(settings);

    let started = Instant::now();
    let error = provider
        .chat(&chat_request("test-model"))
        .await
        .expect_err("always too slow");

    assert!(
        matches!(&error, AiError::Retryable(message) if message.contains("timed out")),
        "{error:?}"
    );
    assert_eq!(server.hits(), 3, "max_retries + 1 attempts");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[tokio::test]
async fn connection_errors_are_retryable() {
    // Bind a port, then free it: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    let mut settings = settings("alpha", &format!("http://{addr}"));
    settings.max_retries = 1;
    let provider = provider(settings);

    let error = provider
        .chat(&chat_request("test-model"))
        .await
        .expect_err("nothing listens");

    assert!(matches!(error, AiError::Retryable(_)), "{error:?}");
}

#[tokio::test]
async fn malformed_json_is_retried_then_retryable() {
    let server = Server::start(vec![Reply::status(200, "not json")]).await;
    let provider = provider(settings("alpha", &server.url));

    let error = provider
        .chat(&chat_request("test-model"))
        .await
        .expect_err("never JSON");

    assert!(
        matches!(&error, AiError::Retryable(message) if message.contains("not json")),
        "{error:?}"
    );
    assert_eq!(server.hits(), 4, "max_retries + 1 attempts");
}

#[tokio::test]
async fn unexpected_json_shape_is_retried() {
    let server = Server::start(vec![
        Reply::json(json!({"choices": []})),
        Reply::json(json!({"object": "list"})),
        Reply::json(completion("third time lucky", Some((1, 1)))),
    ])
    .await;
    let provider = provider(settings("alpha", &server.url));

    let reply = provider.chat(&chat_request("test-model")).await;

    assert_eq!(
        reply.map(|reply| reply.content),
        Ok("third time lucky".to_string())
    );
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn client_errors_are_rejected_at_once() {
    let server = Server::start(vec![Reply::status(
        400,
        r#"{"error":{"message":"bad model","type":"invalid_request_error","code":"model_not_found"}}"#,
    )])
    .await;
    let provider = provider(settings("alpha", &server.url));

    let error = provider
        .chat(&chat_request("test-model"))
        .await
        .expect_err("400");

    assert!(
        matches!(&error, AiError::Rejected(message) if message.contains("bad model")),
        "{error:?}"
    );
    assert_eq!(server.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// 7. Routing and fallback.

#[tokio::test]
async fn fallback_answers_when_the_primary_keeps_failing() {
    let primary = Server::start(vec![Reply::status(503, "unavailable")]).await;
    let backup = Server::start(vec![Reply::json(completion("from backup", Some((4, 2))))]).await;
    let providers = Providers::new(
        vec![
            provider(settings("primary", &primary.url)),
            provider(settings("backup", &backup.url)),
        ],
        vec![Route {
            model: "test-model".to_string(),
            provider: "primary".to_string(),
            fallback: Some("backup".to_string()),
        }],
    );

    let reply = providers
        .chat(&chat_request("test-model"))
        .await
        .expect("the fallback answers");

    assert_eq!(reply.provider, "backup");
    assert_eq!(reply.content, "from backup");
    assert_eq!(primary.hits(), 4, "the primary used its own retries first");
    assert_eq!(backup.hits(), 1);
}

#[tokio::test]
async fn rejections_do_not_fall_back_and_routed_models_never_go_offline() {
    let primary = Server::start(vec![Reply::status(
        401,
        r#"{"error":{"message":"invalid api key"}}"#,
    )])
    .await;
    let backup = Server::start(vec![Reply::json(completion("from backup", None))]).await;
    let lonely = Server::start(vec![Reply::status(500, "down")]).await;
    let providers = Providers::new(
        vec![
            provider(settings("primary", &primary.url)),
            provider(settings("backup", &backup.url)),
            provider(settings("lonely", &lonely.url)),
        ],
        vec![
            Route {
                model: "test-model".to_string(),
                provider: "primary".to_string(),
                fallback: Some("backup".to_string()),
            },
            // Routed to a real provider: never answered offline, even when it fails.
            Route {
                model: "offline-chat".to_string(),
                provider: "lonely".to_string(),
                fallback: None,
            },
        ],
    );

    let error = providers
        .chat(&chat_request("test-model"))
        .await
        .expect_err("401");
    assert!(
        matches!(&error, AiError::Rejected(message) if message.contains("invalid api key")),
        "{error:?}"
    );
    assert_eq!(primary.hits(), 1);
    assert_eq!(backup.hits(), 0);

    let error = providers
        .chat(&chat_request("offline-chat"))
        .await
        .expect_err("always 500");
    assert!(matches!(error, AiError::Retryable(_)), "{error:?}");
    assert_eq!(lonely.hits(), 4);

    let error = providers
        .chat(&chat_request("other-model"))
        .await
        .expect_err("not routed");
    assert!(matches!(error, AiError::NoProvider(_)), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// 8. Concurrency limit.

#[tokio::test]
async fn concurrency_is_limited_per_provider() {
    let server = Server::start(vec![
        Reply::json(completion("slow", Some((1, 1)))).delay(Duration::from_millis(150)),
    ])
    .await;
    let mut settings = settings("alpha", &server.url);
    settings.max_concurrency = 2;
    let provider = provider(settings);
    let req = chat_request("test-model");

    let replies = futures::future::join_all((0..6).map(|_| provider.chat(&req))).await;

    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    assert_eq!(server.hits(), 6);
    let max = server.script.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 2, "{max} requests were in flight at once");
    assert_eq!(max, 2, "the two permits were used in parallel");
}

// ---------------------------------------------------------------------------------------------
// 9. Images.

/// A tiny real PNG (1x1), base64.
const ONE_PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

#[tokio::test]
async fn images_are_decoded_from_b64_json() {
    let server = Server::start(vec![Reply::json(json!({
        "created": 1,
        "data": [{"b64_json": ONE_PIXEL_PNG}, {"b64_json": ONE_PIXEL_PNG}]
    }))])
    .await;
    let provider = provider(settings("alpha", &server.url));
    let req = ImageRequest {
        model: "image-model".to_string(),
        prompt: "a lighthouse".to_string(),
        size: "256x256".to_string(),
        n: 2,
    };

    let reply = provider.image(&req).await.expect("images");

    let expected = base64::engine::general_purpose::STANDARD
        .decode(ONE_PIXEL_PNG)
        .expect("valid base64");
    assert_eq!(&expected[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(reply.images, vec![expected.clone(), expected]);
    assert_eq!(reply.content_type, "image/png");
    assert_eq!(reply.provider, "alpha");
    assert_eq!(reply.model, "image-model");
    let seen = server.seen();
    assert_eq!(seen[0].path, "/v1/images/generations");
    assert_eq!(
        seen[0].body,
        Some(json!({
            "model": "image-model",
            "prompt": "a lighthouse",
            "size": "256x256",
            "n": 2,
            "response_format": "b64_json"
        }))
    );
}

#[tokio::test]
async fn images_with_bad_base64_are_retried() {
    let server = Server::start(vec![
        Reply::json(json!({"data": [{"b64_json": "%%% not base64 %%%"}]})),
        Reply::json(json!({"data": [{"b64_json": ONE_PIXEL_PNG}]})),
    ])
    .await;
    let provider = provider(settings("alpha", &server.url));
    let req = ImageRequest {
        model: "image-model".to_string(),
        prompt: "a lighthouse".to_string(),
        size: "256x256".to_string(),
        n: 1,
    };

    let reply = provider.image(&req).await.expect("the second try succeeds");

    assert_eq!(reply.images.len(), 1);
    assert_eq!(server.hits(), 2);
}

/// CRC-32 (IEEE), bit by bit: independent of the encoder's table.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Checks the PNG's structure and every chunk's CRC; returns (width, height, inflated IDAT).
fn check_png(png: &[u8]) -> (u32, u32, Vec<u8>) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "signature");
    let mut at = 8;
    let mut kinds = Vec::new();
    let mut ihdr = Vec::new();
    let mut idat = Vec::new();
    while at < png.len() {
        let length = be32(&png[at..]) as usize;
        let kind = &png[at + 4..at + 8];
        let data = &png[at + 8..at + 8 + length];
        let crc = be32(&png[at + 8 + length..]);
        assert_eq!(
            crc,
            crc32(&png[at + 4..at + 8 + length]),
            "CRC of {}",
            String::from_utf8_lossy(kind)
        );
        kinds.push(String::from_utf8_lossy(kind).into_owned());
        match kind {
            b"IHDR" => ihdr = data.to_vec(),
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + length;
    }
    assert_eq!(at, png.len());
    assert_eq!(kinds.first().map(String::as_str), Some("IHDR"));
    assert_eq!(kinds.last().map(String::as_str), Some("IEND"));
    assert_eq!(ihdr.len(), 13);
    assert_eq!(&ihdr[8..], &[8, 2, 0, 0, 0], "8-bit RGB, no interlace");

    // zlib with stored blocks only: inflate by hand.
    assert_eq!(
        (u16::from(idat[0]) << 8 | u16::from(idat[1])) % 31,
        0,
        "zlib header check"
    );
    let mut raw = Vec::new();
    let mut at = 2;
    loop {
        let last = idat[at] & 1 == 1;
        assert_eq!(idat[at] & 0b110, 0, "stored block");
        let length = u16::from_le_bytes([idat[at + 1], idat[at + 2]]);
        let inverse = u16::from_le_bytes([idat[at + 3], idat[at + 4]]);
        assert_eq!(length, !inverse);
        raw.extend_from_slice(&idat[at + 5..at + 5 + usize::from(length)]);
        at += 5 + usize::from(length);
        if last {
            break;
        }
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    assert_eq!(be32(&idat[at..]), (b << 16) | a, "adler32");
    assert_eq!(at + 4, idat.len());
    (be32(&ihdr[0..]), be32(&ihdr[4..]), raw)
}

#[tokio::test]
async fn offline_images_are_valid_pngs() {
    let providers = Providers::offline();
    let req = ImageRequest {
        model: "offline-image".to_string(),
        prompt: "a lighthouse at dusk".to_string(),
        size: "320x200".to_string(),
        n: 2,
    };

    let reply = providers.image(&req).await.expect("offline image");

    assert_eq!(reply.provider, "offline");
    assert_eq!(reply.model, "offline-image");
    assert_eq!(reply.content_type, "image/png");
    assert_eq!(reply.images.len(), 2);
    assert_ne!(reply.images[0], reply.images[1]);
    for png in &reply.images {
        let (width, height, raw) = check_png(png);
        assert_eq!((width, height), (320, 200));
        let line = 1 + 320 * 3;
        assert_eq!(raw.len(), 200 * line);
        assert!(
            raw.chunks(line).all(|scanline| scanline[0] == 0),
            "filter 0"
        );
        let pixels: Vec<&[u8]> = raw
            .chunks(line)
            .flat_map(|scanline| scanline[1..].chunks(3))
            .collect();
        assert!(
            pixels.iter().any(|pixel| *pixel != pixels[0]),
            "not a flat colour"
        );
    }
    let again = providers.image(&req).await.expect("offline image");
    assert_eq!(again.images, reply.images, "deterministic");

    // Larger than 512x512 is capped (and spans several stored deflate blocks).
    let big = ImageRequest {
        size: "1024x1792".to_string(),
        n: 1,
        ..req.clone()
    };
    let reply = providers.image(&big).await.expect("offline image");
    let (width, height, _) = check_png(&reply.images[0]);
    assert_eq!((width, height), (512, 512));

    let bad = ImageRequest {
        size: "huge".to_string(),
        ..req
    };
    let error = providers.image(&bad).await.expect_err("bad size");
    assert!(matches!(error, AiError::Rejected(_)), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// 10. Offline chat.

#[tokio::test]
async fn offline_chat_is_deterministic_and_says_so() {
    let providers = Providers::offline();
    let long = "x".repeat(500);
    let req = ChatRequest {
        model: "offline-chat".to_string(),
        messages: vec![
            ChatMessage::new("system", "Be nice."),
            ChatMessage::new("user", "First question?"),
            ChatMessage::new("assistant", "First answer."),
            ChatMessage::new("user", format!("Second: {long}")),
        ],
        temperature: None,
        max_tokens: None,
    };

    let reply = providers.chat(&req).await.expect("offline chat");
    let again = providers.chat(&req).await.expect("offline chat");

    assert_eq!(reply.content, again.content);
    assert_eq!(reply.usage, again.usage);
    assert_eq!(reply.provider, "offline");
    assert_eq!(reply.model, "offline-chat");
    let quoted: String = format!("Second: {long}").chars().take(200).collect();
    assert_eq!(
        reply.content,
        format!(
            "[offline model offline-chat] You said: {quoted}. (This reply was generated locally \
             by Tally's offline provider; no AI model was called.)"
        )
    );
    assert_eq!(
        reply.usage,
        Usage {
            input_tokens: tokens::count_messages(&req.messages),
            output_tokens: tokens::count(&reply.content),
        }
    );

    // max_tokens bounds the output.
    let short = ChatRequest {
        max_tokens: Some(5),
        ..req.clone()
    };
    let reply = providers.chat(&short).await.expect("offline chat");
    assert!(reply.usage.output_tokens <= 5, "{:?}", reply.usage);
    assert_eq!(reply.usage.output_tokens, tokens::count(&reply.content));

    let unknown = ChatRequest {
        model: "gpt-unknown".to_string(),
        ..req.clone()
    };
    let error = providers.chat(&unknown).await.expect_err("unknown model");
    assert!(
        matches!(&error, AiError::NoProvider(message) if message.contains("gpt-unknown")),
        "{error:?}"
    );
    // The offline image model does not chat.
    let image_model = ChatRequest {
        model: "offline-image".to_string(),
        ..req
    };
    assert!(matches!(
        providers.chat(&image_model).await,
        Err(AiError::NoProvider(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// 11. Models.

#[tokio::test]
async fn models_lists_ids() {
    let server = Server::start(vec![Reply::json(json!({
        "object": "list",
        "data": [
            {"id": "gpt-test", "object": "model", "owned_by": "tally"},
            {"id": "image-test", "object": "model", "owned_by": "tally"}
        ]
    }))])
    .await;
    let provider = provider(settings("alpha", &format!("{}/v1/", server.url)));

    let models = provider.models().await.expect("models");

    assert_eq!(
        models,
        vec!["gpt-test".to_string(), "image-test".to_string()]
    );
    let seen = server.seen();
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(seen[0].path, "/v1/models");
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer test-key"));
}
