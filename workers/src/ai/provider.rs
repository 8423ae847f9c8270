//! One OpenAI-compatible HTTP provider ([`Provider`]) and the router over all of them
//! ([`Providers`]).
//!
//! # Retries
//! Each [`Provider`] call retries on its own, up to [`ProviderSettings::max_retries`] times after
//! the first try:
//! - `429 Too Many Requests` waits for `Retry-After` (seconds or an HTTP date, capped at
//!   [`ProviderSettings::retry_max`]) when the provider sends it, else backs off;
//! - `408`, `5xx`, timeouts, connection errors and a success whose body is not the expected JSON
//!   back off exponentially with jitter (from [`ProviderSettings::retry_base`], each wait capped
//!   at [`ProviderSettings::retry_max`]);
//! - any other status is [`AiError::Rejected`] at once.
//!
//! When the retries are used up the call fails with [`AiError::Retryable`] carrying the last
//! failure. Each retry is logged at `debug`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable as _};
use base64::Engine as _;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Client, RequestBuilder, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    ChatMessage, ChatReply, ChatRequest, ImageReply, ImageRequest, Usage, offline, tokens,
};

/// How to reach one OpenAI-compatible provider and how hard to try.
#[derive(Clone)]
pub struct ProviderSettings {
    /// The provider's name: in routes, replies and logs.
    pub name: String,
    /// Where the API lives, e.g. `http://127.0.0.1:1234`; requests go to
    /// `{base_url}/v1/chat/completions` and so on. A base URL that already ends in `/v1` is
    /// accepted too. Only `http` URLs: this build of the HTTP client has no TLS.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <api_key>` when set.
    pub api_key: Option<String>,
    /// Deadline of one HTTP request, from connecting until the whole response body is read.
    pub timeout: Duration,
    /// Retries after the first try, for retryable failures.
    pub max_retries: u32,
    /// The first backoff wait; later waits grow exponentially, with jitter.
    pub retry_base: Duration,
    /// The longest single wait between tries (also caps `Retry-After`).
    pub retry_max: Duration,
    /// Requests in flight at once to this provider.
    pub max_concurrency: usize,
}

impl fmt::Debug for ProviderSettings {
    /// Like a derived `Debug`, but never prints the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_base", &self.retry_base)
            .field("retry_max", &self.retry_max)
            .field("max_concurrency", &self.max_concurrency)
            .finish()
    }
}

/// Why an AI call failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AiError {
    /// The provider could not answer now (rate limit, server error, timeout, connection error,
    /// a reply that is not the expected JSON), and its retries are used up. A later try may
    /// work.
    #[error("{0}")]
    Retryable(String),
    /// The provider refused the request (a 4xx other than 408 and 429), or the request or
    /// settings are invalid. Trying again will not help. Carries the provider's own error
    /// message when it sent one.
    #[error("{0}")]
    Rejected(String),
    /// No provider serves the model.
    #[error("{0}")]
    NoProvider(String),
}

impl AiError {
    /// Whether a later try of the same request may work.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AiError::Retryable(_))
    }
}

/// One try's failure, before the retry policy has had its say.
#[derive(Debug)]
enum Failure {
    /// Worth another try, after `retry_after` when the provider asked for that wait.
    Retry {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Not worth another try.
    Reject(String),
}

impl Failure {
    fn retry(message: String) -> Failure {
        Failure::Retry {
            message,
            retry_after: None,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Retry { message, .. } | Failure::Reject(message) => message,
        }
    }

    fn into_error(self) -> AiError {
        match self {
            Failure::Retry { message, .. } => AiError::Retryable(message),
            Failure::Reject(message) => AiError::Rejected(message),
        }
    }
}

/// One OpenAI-compatible HTTP provider: its client, its settings and its concurrency limit.
///
/// Cheap to share behind a reference or an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Provider {
    settings: ProviderSettings,
    client: Client,
    permits: Semaphore,
    chat_url: Url,
    images_url: Url,
    models_url: Url,
}

impl Provider {
    /// Checks the settings and builds the HTTP client.
    ///
    /// [`AiError::Rejected`] when the base URL is not an `http` URL (or has a query or
    /// fragment), the timeout is zero, `max_concurrency` is zero or too large, or the client
    /// cannot be built.
    pub fn new(settings: ProviderSettings) -> Result<Provider, AiError> {
        let name = &settings.name;
        let invalid = |why: String| AiError::Rejected(format!("provider {name}: {why}"));
        let root = api_root(&settings.base_url).map_err(invalid)?;
        if settings.timeout.is_zero() {
            return Err(invalid("timeout must be more than zero".to_string()));
        }
        if settings.max_concurrency == 0 || settings.max_concurrency > Semaphore::MAX_PERMITS {
            return Err(invalid(format!(
                "max_concurrency must be between 1 and {}, not {}",
                Semaphore::MAX_PERMITS,
                settings.max_concurrency
            )));
        }
        let endpoint = |path: &str| {
            Url::parse(&format!("{root}/v1/{path}"))
                .map_err(|e| invalid(format!("bad base_url {:?}: {e}", settings.base_url)))
        };
        let chat_url = endpoint("chat/completions")?;
        let images_url = endpoint("images/generations")?;
        let models_url = endpoint("models")?;
        let client = Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("tally-workers/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {}", chain(&e))))?;
        Ok(Provider {
            permits: Semaphore::new(settings.max_concurrency),
            settings,
            client,
            chat_url,
            images_url,
            models_url,
        })
    }

    /// The provider's name, from its settings.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// `POST /v1/chat/completions`: the reply's `choices[0].message.content` and its usage
    /// (`usage.prompt_tokens` / `usage.completion_tokens`, estimated with [`tokens`] when the
    /// provider reports none).
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatReply, AiError> {
        self.with_retries("chat", || self.chat_once(req)).await
    }

    /// `POST /v1/images/generations` with `response_format: "b64_json"`: the decoded
    /// `data[].b64_json` images.
    pub async fn image(&self, req: &ImageRequest) -> Result<ImageReply, AiError> {
        self.with_retries("image", || self.image_once(req)).await
    }

    /// `GET /v1/models`: the ids of the models the provider serves.
    pub async fn models(&self) -> Result<Vec<String>, AiError> {
        self.with_retries("models", || self.models_once()).await
    }

    async fn chat_once(&self, req: &ChatRequest) -> Result<ChatReply, Failure> {
        let body = WireChatRequest {
            model: &req.model,
            messages: &req.messages,
            temperature: req.temperature,
            max_tokens: req.max_tokens,
        };
        let bytes = self
            .execute(self.client.post(self.chat_url.clone()).json(&body))
            .await?;
        let reply: WireChatResponse = self.parse(&bytes, "chat completion")?;
        let Some(choice) = reply.choices.into_iter().next() else {
            return Err(self.unexpected("chat completion", "it has no choices"));
        };
        let Some(content) = choice.message.content.or(choice.message.refusal) else {
            return Err(self.unexpected("chat completion", "choices[0].message has no content"));
        };
        let usage = reply.usage.unwrap_or_default();
        let usage = Usage {
            input_tokens: usage
                .prompt_tokens
                .unwrap_or_else(|| tokens::count_messages(&req.messages)),
            output_tokens: usage
                .completion_tokens
                .unwrap_or_else(|| tokens::count(&content)),
        };
        Ok(ChatReply {
            content,
            usage,
            provider: self.settings.name.clone(),
            model: req.model.clone(),
        })
    }

    async fn image_once(&self, req: &ImageRequest) -> Result<ImageReply, Failure> {
        let body = WireImageRequest {
            model: &req.model,
            prompt: &req.prompt,
            size: &req.size,
            n: req.n,
            response_format: "b64_json",
        };
        let bytes = self
            .execute(self.client.post(self.images_url.clone()).json(&body))
            .await?;
        let reply: WireImageResponse = self.parse(&bytes, "image generation")?;
        if reply.data.is_empty() {
            return Err(self.unexpected("image generation", "it has no data"));
        }
        let mut images = Vec::with_capacity(reply.data.len());
        for (index, datum) in reply.data.into_iter().enumerate() {
            let Some(encoded) = datum.b64_json else {
                return Err(self.unexpected(
                    "image generation",
                    &format!("data[{index}] has no b64_json"),
                ));
            };
            let image = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| {
                    self.unexpected(
                        "image generation",
                        &format!("data[{index}].b64_json is not base64: {e}"),
                    )
                })?;
            images.push(image);
        }
        let content_type = images
            .first()
            .map_or("image/png", |image| sniff_image_type(image))
            .to_string();
        Ok(ImageReply {
            images,
            content_type,
            provider: self.settings.name.clone(),
            model: req.model.clone(),
        })
    }

    async fn models_once(&self) -> Result<Vec<String>, Failure> {
        let bytes = self
            .execute(self.client.get(self.models_url.clone()))
            .await?;
        let reply: WireModels = self.parse(&bytes, "model list")?;
        Ok(reply.data.into_iter().map(|model| model.id).collect())
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are used up.
    async fn with_retries<T, F, Fut>(
        &self,
        operation: &'static str,
        attempt: F,
    ) -> Result<T, AiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let settings = &self.settings;
        let retry_max = settings.retry_max;
        let backoff = ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(settings.retry_base)
            .with_max_delay(retry_max)
            .with_max_times(usize::try_from(settings.max_retries).unwrap_or(usize::MAX));
        let mut retries = 0u32;
        attempt
            .retry(backoff)
            .when(|failure| matches!(failure, Failure::Retry { .. }))
            .adjust(move |failure, backoff| {
                // `None` means the retries are used up: keep it so.
                let wait = backoff?;
                let wait = match failure {
                    Failure::Retry {
                        retry_after: Some(asked),
                        ..
                    } => *asked,
                    _ => wait,
                };
                Some(wait.min(retry_max))
            })
            .notify(|failure, wait| {
                retries += 1;
                tracing::debug!(
                    provider = %settings.name,
                    operation,
                    retry = retries,
                    max_retries = settings.max_retries,
                    wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    error = failure.message(),
                    "AI provider call failed; retrying",
                );
            })
            .await
            .map_err(Failure::into_error)
    }

    /// Sends one request under the concurrency limit and reads the whole body of a success.
    async fn execute(&self, request: RequestBuilder) -> Result<Vec<u8>, Failure> {
        let name = &self.settings.name;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Failure::retry(format!("{name}: the provider is shutting down")))?;
        let request = match &self.settings.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        let retry_after = if status == StatusCode::TOO_MANY_REQUESTS {
            retry_after(response.headers(), SystemTime::now())
        } else {
            None
        };
        if status.is_success() {
            let body = response.bytes().await.map_err(|e| self.transport(&e))?;
            return Ok(body.to_vec());
        }
        // The error body only adds detail: a failure to read it does not change the outcome.
        let body = response.bytes().await.unwrap_or_default();
        let message = format!("{name}: HTTP {status}{}", error_detail(&body));
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            Err(Failure::Retry {
                message,
                retry_after,
            })
        } else {
            Err(Failure::Reject(message))
        }
    }

    /// Classifies an error of the HTTP client.
    fn transport(&self, error: &reqwest::Error) -> Failure {
        let name = &self.settings.name;
        if error.is_builder() || error.is_redirect() {
            Failure::Reject(format!("{name}: cannot send the request: {}", chain(error)))
        } else if error.is_timeout() {
            Failure::retry(format!(
                "{name}: timed out after {:?}: {}",
                self.settings.timeout,
                chain(error)
            ))
        } else if error.is_connect() {
            Failure::retry(format!("{name}: cannot connect: {}", chain(error)))
        } else {
            Failure::retry(format!("{name}: request failed: {}", chain(error)))
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, body: &[u8], what: &str) -> Result<T, Failure> {
        serde_json::from_slice(body).map_err(|e| {
            Failure::retry(format!(
                "{}: the {what} reply is not the expected JSON ({e}): {}",
                self.settings.name,
                excerpt(body)
            ))
        })
    }

    fn unexpected(&self, what: &str, why: &str) -> Failure {
        Failure::retry(format!(
            "{}: unexpected {what} reply: {why}",
            self.settings.name
        ))
    }
}

/// The URL that `/v1/...` paths are appended to: `base_url` without a trailing `/` or `/v1`.
fn api_root(base_url: &str) -> Result<String, String> {
    let url = Url::parse(base_url.trim()).map_err(|e| format!("bad base_url {base_url:?}: {e}"))?;
    match url.scheme() {
        // TLS is rustls with the Mozilla roots (reqwest's `rustls-tls`).
        "http" | "https" => {}
        other => {
            return Err(format!(
                "base_url {base_url:?} has unsupported scheme {other:?}"
            ));
        }
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "base_url {base_url:?} must not have a query or a fragment"
        ));
    }
    let root = url.as_str().trim_end_matches('/');
    let root = root.strip_suffix("/v1").unwrap_or(root);
    Ok(root.to_string())
}

/// The wait a `Retry-After` header asks for: delay-seconds or an HTTP date (a date in the past
/// is no wait). `None` when absent or unreadable.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // Not allowed by RFC 9110, but seen in the wild.
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = parse_http_date(value)?;
    let now = chrono::DateTime::<chrono::Utc>::from(now);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Parses the three HTTP date formats of RFC 9110 §5.6.7.
fn parse_http_date(value: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDateTime, Utc};
    // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT".
    if let Ok(at) = DateTime::parse_from_rfc2822(value) {
        return Some(at.with_timezone(&Utc));
    }
    // Obsolete RFC 850 ("Sunday, 06-Nov-94 08:49:37 GMT") and asctime
    // ("Sun Nov  6 08:49:37 1994") forms.
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .into_iter()
        .find_map(|format| NaiveDateTime::parse_from_str(value, format).ok())
        .map(|at| at.and_utc())
}

/// `": <message>"` from an OpenAI error body `{"error":{"message":..}}`, else a short excerpt
/// of the body, else nothing.
fn error_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorObject,
    }
    #[derive(Deserialize)]
    struct ErrorObject {
        message: Option<String>,
    }
    if let Ok(ErrorBody {
        error: ErrorObject {
            message: Some(message),
        },
    }) = serde_json::from_slice::<ErrorBody>(body)
    {
        return format!(": {message}");
    }
    let text = excerpt(body);
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// The start of a body, for messages.
fn excerpt(body: &[u8]) -> String {
    const LIMIT: usize = 300;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > LIMIT {
        let cut: String = text.chars().take(LIMIT).collect();
        format!("{cut}…")
    } else {
        text.to_string()
    }
}

/// An error and its sources, `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The MIME type of an image by its magic bytes; `image/png` when unknown.
fn sniff_image_type(image: &[u8]) -> &'static str {
    if image.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if image.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if image.len() >= 12 && image.starts_with(b"RIFF") && &image[8..12] == b"WEBP" {
        "image/webp"
    } else if image.starts_with(b"GIF8") {
        "image/gif"
    } else {
        "image/png"
    }
}

#[derive(Serialize)]
struct WireChatRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct WireChatResponse {
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireChoiceMessage,
}

#[derive(Deserialize)]
struct WireChoiceMessage {
    content: Option<String>,
    refusal: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Serialize)]
struct WireImageRequest<'a> {
    model: &'a str,
    prompt: &'a str,
    size: &'a str,
    n: u32,
    response_format: &'a str,
}

#[derive(Deserialize)]
struct WireImageResponse {
    data: Vec<WireImage>,
}

#[derive(Deserialize)]
struct WireImage {
    b64_json: Option<String>,
}

#[derive(Deserialize)]
struct WireModels {
    data: Vec<WireModel>,
}

#[derive(Deserialize)]
struct WireModel {
    id: String,
}

/// Which provider serves a model, and which one to try when it fails with
/// [`AiError::Retryable`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The model, as in [`ChatRequest::model`] and [`ImageRequest::model`].
    pub model: String,
    /// The name of the provider that serves it.
    pub provider: String,
    /// The name of the provider to try when `provider` fails with [`AiError::Retryable`].
    #[serde(default)]
    pub fallback: Option<String>,
}

/// Routes a model to its provider, with an optional fallback provider per model, and the
/// built-in offline provider.
///
/// - A model with a [`Route`] goes to its provider. When that provider fails with
///   [`AiError::Retryable`] (after its own retries) and the route has a fallback, the fallback
///   gets the same request; [`AiError::Rejected`] is returned at once.
/// - Otherwise `offline-chat` (chat) and `offline-image` (images) are served by the
///   [`offline`] provider. A model routed to a real provider never goes to the offline one.
/// - Any other model is [`AiError::NoProvider`].
#[derive(Debug)]
pub struct Providers {
    providers: HashMap<String, Provider>,
    routes: HashMap<String, Route>,
}

/// Where a request goes.
enum Target<'a> {
    Offline,
    Remote {
        route: &'a Route,
        primary: &'a Provider,
    },
}

impl Providers {
    /// The given providers and routes, plus the offline provider.
    ///
    /// Provider names should be unique (a later provider replaces an earlier one of the same
    /// name), as should route models (a later route wins). A route naming a provider that is
    /// not configured is logged now; requests for its model fail with [`AiError::NoProvider`].
    pub fn new(providers: Vec<Provider>, routes: Vec<Route>) -> Providers {
        let mut by_name = HashMap::with_capacity(providers.len());
        for provider in providers {
            let name = provider.name().to_string();
            if by_name.insert(name.clone(), provider).is_some() {
                tracing::warn!(provider = %name, "two AI providers have this name; the last one is used");
            }
        }
        let mut by_model = HashMap::with_capacity(routes.len());
        for route in routes {
            for name in std::iter::once(&route.provider).chain(route.fallback.as_ref()) {
                if !by_name.contains_key(name) {
                    tracing::warn!(model = %route.model, provider = %name, "AI route names a provider that is not configured");
                }
            }
            if let Some(earlier) = by_model.insert(route.model.clone(), route) {
                tracing::warn!(model = %earlier.model, "two AI routes for this model; the last one is used");
            }
        }
        Providers {
            providers: by_name,
            routes: by_model,
        }
    }

    /// Only the offline provider (no network): models `offline-chat` and `offline-image`.
    pub fn offline() -> Providers {
        Providers::new(Vec::new(), Vec::new())
    }

    /// Whether some provider serves `model` (for chat or images).
    /// The configured provider with this name.
    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.get(name)
    }

    pub fn serves(&self, model: &str) -> bool {
        self.routes.contains_key(model)
            || model == offline::CHAT_MODEL
            || model == offline::IMAGE_MODEL
    }

    /// Runs a chat request on the model's provider (see [`Providers`] for the routing rules).
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatReply, AiError> {
        let (route, primary) = match self.target(&req.model, offline::CHAT_MODEL)? {
            Target::Offline => return Ok(offline::chat(req)),
            Target::Remote { route, primary } => (route, primary),
        };
        let first = match primary.chat(req).await {
            Err(AiError::Retryable(message)) => message,
            done => return done,
        };
        let fallback = self.fallback(route, first)?;
        let result = fallback.provider.chat(req).await;
        fallback.finish(result)
    }

    /// Runs an image request on the model's provider (see [`Providers`] for the routing
    /// rules).
    pub async fn image(&self, req: &ImageRequest) -> Result<ImageReply, AiError> {
        let (route, primary) = match self.target(&req.model, offline::IMAGE_MODEL)? {
            Target::Offline => return offline::image(req),
            Target::Remote { route, primary } => (route, primary),
        };
        let first = match primary.image(req).await {
            Err(AiError::Retryable(message)) => message,
            done => return done,
        };
        let fallback = self.fallback(route, first)?;
        let result = fallback.provider.image(req).await;
        fallback.finish(result)
    }

    fn target(&self, model: &str, offline_model: &str) -> Result<Target<'_>, AiError> {
        match self.routes.get(model) {
            Some(route) => match self.providers.get(&route.provider) {
                Some(primary) => Ok(Target::Remote { route, primary }),
                None => Err(AiError::NoProvider(format!(
                    "model {model:?} is routed to provider {:?}, which is not configured",
                    route.provider
                ))),
            },
            None if model == offline_model => Ok(Target::Offline),
            None => Err(AiError::NoProvider(format!(
                "no provider serves model {model:?}"
            ))),
        }
    }

    /// The fallback for `route` after its primary failed with `first`; the primary's error when
    /// there is none.
    fn fallback<'a>(&'a self, route: &'a Route, first: String) -> Result<Fallback<'a>, AiError> {
        let Some(name) = route.fallback.as_deref() else {
            return Err(AiError::Retryable(first));
        };
        let Some(provider) = self.providers.get(name) else {
            return Err(AiError::Retryable(format!(
                "{first}; fallback provider {name:?} is not configured"
            )));
        };
        tracing::warn!(
            model = %route.model,
            provider = %route.provider,
            fallback = %name,
            error = %first,
            "AI provider failed; trying the fallback",
        );
        Ok(Fallback { provider, first })
    }
}

/// A fallback in use, and why.
struct Fallback<'a> {
    provider: &'a Provider,
    first: String,
}

impl Fallback<'_> {
    /// The fallback's result; when it fails retryably too, the message names both failures.
    fn finish<T>(self, result: Result<T, AiError>) -> Result<T, AiError> {
        result.map_err(|error| match error {
            AiError::Retryable(message) => {
                AiError::Retryable(format!("{}; fallback {message}", self.first))
            }
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(RETRY_AFTER, value);
        }
        headers
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        // 1994-11-06T08:49:30Z
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_770);
        assert_eq!(
            retry_after(&headers("3"), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_after(&headers(" 0 "), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&headers("1.5"), now),
            Some(Duration::from_millis(1500))
        );
        let seven = Some(Duration::from_secs(7));
        assert_eq!(
            retry_after(&headers("Sun, 06 Nov 1994 08:49:37 GMT"), now),
            seven
        );
        assert_eq!(
            retry_after(&headers("Sunday, 06-Nov-94 08:49:37 GMT"), now),
            seven
        );
        assert_eq!(
            retry_after(&headers("Sun Nov  6 08:49:37 1994"), now),
            seven
        );
        // In the past: no wait.
        assert_eq!(
            retry_after(&headers("Sun, 06 Nov 1994 08:49:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&headers("-1"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn base_urls_are_normalised() {
        for base in [
            "http://127.0.0.1:1234",
            "http://127.0.0.1:1234/",
            "http://127.0.0.1:1234/v1",
            "http://127.0.0.1:1234/v1/",
        ] {
            assert_eq!(
                api_root(base).as_deref(),
                Ok("http://127.0.0.1:1234"),
                "{base}"
            );
        }
        assert_eq!(
            api_root("http://proxy.local/openai/v1").as_deref(),
            Ok("http://proxy.local/openai")
        );
        assert_eq!(
            api_root("https://api.openai.com/v1/").as_deref(),
            Ok("https://api.openai.com")
        );
        assert!(api_root("ftp://host").is_err());
        assert!(api_root("http://host/?a=b").is_err());
        assert!(api_root("not a url").is_err());
    }

    #[test]
    fn error_details_prefer_the_openai_message() {
        assert_eq!(
            error_detail(br#"{"error":{"message":"bad model","type":"invalid_request_error"}}"#),
            ": bad model"
        );
        assert_eq!(error_detail(b"gateway exploded"), ": gateway exploded");
        assert_eq!(error_detail(b""), "");
    }

    #[test]
    fn settings_debug_hides_the_key() {
        let settings = ProviderSettings {
            name: "p".into(),
            base_url: "http://127.0.0.1:1".into(),
            api_key: Some("sk-secret".into()),
            timeout: Duration::from_secs(1),
            max_retries: 0,
            retry_base: Duration::from_millis(1),
            retry_max: Duration::from_millis(1),
            max_concurrency: 1,
        };
        let text = format!("{settings:?}");
        assert!(!text.contains("sk-secret"), "{text}");
        assert!(text.contains("redacted"), "{text}");
        let mut zero = settings.clone();
        zero.max_concurrency = 0;
        assert!(matches!(Provider::new(zero), Err(AiError::Rejected(_))));
        let mut https = settings;
        https.base_url = "https://api.openai.com/v1".into();
        assert!(
            Provider::new(https).is_ok(),
            "https providers are supported"
        );
    }
}
