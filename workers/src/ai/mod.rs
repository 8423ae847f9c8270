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
