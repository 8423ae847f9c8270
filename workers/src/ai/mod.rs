//! AI providers: an adapter for any OpenAI-compatible HTTP API, a router that picks the provider
//! for a model (with an optional fallback), and a built-in offline provider that never touches
//! the network.
//!
//! # Layout
//! - [`provider`]: [`Provider`] (one HTTP provider: retries, timeouts, a concurrency limit) and
//!   [`Providers`] (routes a model to its provider, falls back on retryable failures).
//! - [`offline`]: the deterministic local provider behind the models `offline-chat` and
//!   `offline-image`.
//! - [`tokens`]: the deterministic token estimate used by the offline provider and for cost
//!   estimates.
//!
//! # Errors
//! Every call returns [`AiError`]: [`AiError::Retryable`] when another try later may work (rate
//! limits, server errors, timeouts, broken replies, after the provider's own retries),
//! [`AiError::Rejected`] when the provider refused the request itself, and
//! [`AiError::NoProvider`] when no provider serves the model.

pub mod offline;
pub mod provider;
pub mod tokens;

pub use provider::{AiError, Provider, ProviderSettings, Providers, Route};

/// One message of a chat conversation, as sent on the OpenAI wire protocol.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The model to run; also picks the provider (see [`Providers`]).
    pub model: String,
    /// The conversation so far, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature; the provider's default when `None`.
    pub temperature: Option<f32>,
    /// Upper bound on generated tokens; the provider's default when `None`.
    pub max_tokens: Option<u32>,
}

/// Tokens a call consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
}

/// The answer to a [`ChatRequest`].
#[derive(Debug, Clone)]
pub struct ChatReply {
    /// The generated text (`choices[0].message.content`).
    pub content: String,
    /// As reported by the provider; estimated with [`tokens`] when the provider reports none.
    pub usage: Usage,
    /// Name of the provider that answered (the fallback's name when the fallback answered).
    pub provider: String,
    /// The model as requested (not the provider's possibly more specific model version).
    pub model: String,
}

/// An image generation request.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// The model to run; also picks the provider (see [`Providers`]).
    pub model: String,
    /// What to draw.
    pub prompt: String,
    /// `"<width>x<height>"`, e.g. `"256x256"`.
    pub size: String,
    /// How many images.
    pub n: u32,
}

/// The answer to an [`ImageRequest`].
#[derive(Debug, Clone)]
pub struct ImageReply {
    /// The images' decoded bytes, in the provider's order.
    pub images: Vec<Vec<u8>>,
    /// MIME type of the images, e.g. `"image/png"`.
    pub content_type: String,
    /// Name of the provider that answered.
    pub provider: String,
    /// The model as requested.
    pub model: String,
}

/// What AI jobs in this process use: the providers (built from the configuration) and the
/// catalog that prices their models.
pub struct Services {
    pub providers: Providers,
    pub catalog: tally_workflows::ai::Catalog,
    /// Where generated images are written.
    pub image_dir: std::path::PathBuf,
    /// Conversation histories for the chat jobs of this process, read in batches (set by the
    /// worker pool; without it each job reads its own).
    pub histories: Option<Histories>,
}

/// Reads chat jobs' histories in batches, by job id: see
/// [`tally_workflows::chat::histories_for`].
pub type Histories =
    tally_workflows::batch::Batcher<String, Option<Vec<tally_workflows::chat::Message>>>;

impl Services {
    /// The configured providers and models; with none configured, the offline provider.
    pub fn from_config(
        cfg: &tally_workflows::config::AiConfig,
        image_dir: std::path::PathBuf,
    ) -> Result<Services, String> {
        let catalog = tally_workflows::ai::Catalog::from_config(cfg)?;
        if cfg.providers.is_empty() {
            return Ok(Services {
                providers: Providers::offline(),
                catalog,
                image_dir,
                histories: None,
            });
        }
        let mut providers = Vec::with_capacity(cfg.providers.len());
        for p in &cfg.providers {
            let api_key = match (&p.api_key, &p.api_key_env, &p.api_key_file) {
                (Some(k), _, _) => Some(k.expose().to_owned()),
                (None, Some(var), _) => Some(std::env::var(var).map_err(|_| {
                    format!(
                        "provider {:?}: environment variable {var} is not set",
                        p.name
                    )
                })?),
                (None, None, Some(path)) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| format!("provider {:?}: {}: {e}", p.name, path.display()))?
                        .trim()
                        .to_owned(),
                ),
                (None, None, None) => None,
            };
            let settings = ProviderSettings {
                name: p.name.clone(),
                base_url: p.base_url.clone(),
                api_key,
                timeout: std::time::Duration::from_millis(p.timeout_ms),
                max_retries: p.max_retries,
                retry_base: std::time::Duration::from_millis(p.retry_base_ms),
                retry_max: std::time::Duration::from_secs(30),
                max_concurrency: p.max_concurrency,
            };
            providers
                .push(Provider::new(settings).map_err(|e| format!("provider {:?}: {e}", p.name))?);
        }
        let routes = catalog
            .models()
            .iter()
            .map(|m| Route {
                model: m.id.clone(),
                provider: m.provider.clone(),
                fallback: m.fallback.clone(),
            })
            .collect();
        Ok(Services {
            providers: Providers::new(providers, routes),
            catalog,
            image_dir,
            histories: None,
        })
    }
}

/// When providers are configured but no models are, each provider's `GET /v1/models` list
/// becomes the catalog, at the default prices (`tally_workflows::ai::DEFAULT_*`). A model whose
/// id names an image model (`image`, `dall-e`, `flux`, `stable-diffusion`) is an image model;
/// the rest chat. A provider that cannot be read is skipped with a warning, so an outage at
/// start does not keep the process down; its models appear at the next start.
pub async fn discover_models(cfg: &mut tally_workflows::config::AiConfig) {
    use tally_workflows::ai::{DEFAULT_IMAGE_PRICE, DEFAULT_INPUT_PER_1K, DEFAULT_OUTPUT_PER_1K};
    if cfg.providers.is_empty() || !cfg.models.is_empty() {
        return;
    }
    let services = match Services::from_config(cfg, std::path::PathBuf::new()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "AI providers could not be set up; no models discovered");
            return;
        }
    };
    for p in &cfg.providers {
        let Some(provider) = services.providers.provider(&p.name) else {
            continue;
        };
        match provider.models().await {
            Ok(ids) => {
                tracing::info!(provider = %p.name, models = ids.len(), "models discovered");
                for id in ids {
                    if cfg.models.iter().any(|m| m.id == id) {
                        continue;
                    }
                    let lower = id.to_ascii_lowercase();
                    let image = ["image", "dall-e", "flux", "stable-diffusion"]
                        .iter()
                        .any(|w| lower.contains(w));
                    cfg.models.push(tally_workflows::config::ModelConfig {
                        id,
                        provider: p.name.clone(),
                        kind: if image { "image" } else { "chat" }.to_owned(),
                        input_per_1k: if image { 0 } else { DEFAULT_INPUT_PER_1K },
                        output_per_1k: if image { 0 } else { DEFAULT_OUTPUT_PER_1K },
                        per_image: if image { DEFAULT_IMAGE_PRICE } else { 0 },
                        context_window: 8192,
                        fallback: None,
                    });
                }
            }
            Err(e) => {
                tracing::warn!(provider = %p.name, error = %e, "could not list the provider's models")
            }
        }
    }
}
