//! The AI model catalog, its prices and the one rule that turns usage into credits (the same
//! rule estimates a request before it runs and reserves that much), and users' model
//! preferences. The HTTP adapters that call providers live in `tally-workers`.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    Db, DbError,
    config::{AiConfig, ModelConfig},
    now_ms, with_pool,
};

/// The provider name of the built-in offline models.
pub const OFFLINE: &str = "offline";

/// Prices of models discovered from a provider's `GET /v1/models` (the offline models' too):
/// credits per 1,000 input and output tokens, and per image.
pub const DEFAULT_INPUT_PER_1K: i64 = 1;
pub const DEFAULT_OUTPUT_PER_1K: i64 = 2;
pub const DEFAULT_IMAGE_PRICE: i64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Chat,
    Image,
}

/// A model users can pick, with its prices in credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Model {
    pub id: String,
    pub provider: String,
    pub kind: ModelKind,
    pub input_per_1k: i64,
    pub output_per_1k: i64,
    pub per_image: i64,
    pub context_window: u32,
    pub fallback: Option<String>,
}

impl Model {
    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "provider": self.provider,
            "kind": self.kind,
            "prices": {
                "input_per_1k_tokens": self.input_per_1k,
                "output_per_1k_tokens": self.output_per_1k,
                "per_image": self.per_image,
                "unit": "credit",
            },
            "context_window": self.context_window,
            "fallback": self.fallback,
            "offline": self.provider == OFFLINE,
        })
    }

    /// Credits for a chat exchange: each side rounded up to a whole credit.
    pub fn chat_cost(&self, input_tokens: u64, output_tokens: u64) -> i64 {
        per_1k(input_tokens, self.input_per_1k) + per_1k(output_tokens, self.output_per_1k)
    }

    /// Credits for `n` images.
    pub fn image_cost(&self, n: u32) -> i64 {
        self.per_image.saturating_mul(i64::from(n))
    }
}

fn per_1k(tokens: u64, price: i64) -> i64 {
    let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
    tokens.saturating_mul(price).saturating_add(999) / 1000
}

/// Every model Tally can route to.
#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<Model>,
}

/// Where the catalog's prices are capped: far above any real price, far below overflow.
const MAX_PRICE: i64 = 1_000_000_000;

impl Catalog {
    /// The configured models; with no provider configured, the offline models.
    pub fn from_config(cfg: &AiConfig) -> Result<Catalog, String> {
        let mut names = std::collections::BTreeSet::new();
        for p in &cfg.providers {
            if p.name.trim().is_empty() || p.name == OFFLINE {
                return Err(format!(
                    "provider names must be non-empty and not {OFFLINE:?}"
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(format!("provider {:?} is configured twice", p.name));
            }
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(format!(
                    "provider {:?}: base_url must start with http:// or https://",
                    p.name
                ));
            }
            if p.max_concurrency == 0 || p.timeout_ms == 0 {
                return Err(format!(
                    "provider {:?}: max_concurrency and timeout_ms must be at least 1",
                    p.name
                ));
            }
            let keys = [
                p.api_key.is_some(),
                p.api_key_env.is_some(),
                p.api_key_file.is_some(),
            ];
            if keys.iter().filter(|k| **k).count() > 1 {
                return Err(format!(
                    "provider {:?}: set one of api_key, api_key_env, api_key_file",
                    p.name
                ));
            }
        }
        if cfg.default_max_tokens == 0 {
            return Err("default_max_tokens must be at least 1".to_owned());
        }
        if cfg.providers.is_empty() && cfg.models.is_empty() {
            return Ok(Catalog::offline());
        }
        let mut models = Vec::with_capacity(cfg.models.len());
        for m in &cfg.models {
            models.push(model_of(m, &names)?);
        }
        if models
            .iter()
            .enumerate()
            .any(|(i, m)| models[..i].iter().any(|o| o.id == m.id))
        {
            return Err("a model id is configured twice".to_owned());
        }
        Ok(Catalog { models })
    }

    /// The built-in models of the offline provider.
    pub fn offline() -> Catalog {
        Catalog {
            models: vec![
                Model {
                    id: "offline-chat".to_owned(),
                    provider: OFFLINE.to_owned(),
                    kind: ModelKind::Chat,
                    input_per_1k: DEFAULT_INPUT_PER_1K,
                    output_per_1k: DEFAULT_OUTPUT_PER_1K,
                    per_image: 0,
                    context_window: 8192,
                    fallback: None,
                },
                Model {
                    id: "offline-image".to_owned(),
                    provider: OFFLINE.to_owned(),
                    kind: ModelKind::Image,
                    input_per_1k: 0,
                    output_per_1k: 0,
                    per_image: DEFAULT_IMAGE_PRICE,
                    context_window: 0,
                    fallback: None,
                },
            ],
        }
    }

    pub fn models(&self) -> &[Model] {
        &self.models
    }

    pub fn get(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    /// The first model of a kind: the default when neither request nor preferences name one.
    pub fn first(&self, kind: ModelKind) -> Option<&Model> {
        self.models.iter().find(|m| m.kind == kind)
    }
}

fn model_of(
    m: &ModelConfig,
    providers: &std::collections::BTreeSet<&str>,
) -> Result<Model, String> {
    let kind = match m.kind.as_str() {
        "chat" => ModelKind::Chat,
        "image" => ModelKind::Image,
        other => {
            return Err(format!(
                "model {:?}: kind must be chat or image, not {other:?}",
                m.id
            ));
        }
    };
    if m.id.trim().is_empty() {
        return Err("a model has an empty id".to_owned());
    }
    if !providers.contains(m.provider.as_str()) {
        return Err(format!(
            "model {:?}: no provider named {:?}",
            m.id, m.provider
        ));
    }
    if let Some(f) = &m.fallback
        && (!providers.contains(f.as_str()) || f == &m.provider)
    {
        return Err(format!(
            "model {:?}: fallback {f:?} must be another configured provider",
            m.id
        ));
    }
    for (name, price) in [
        ("input_per_1k", m.input_per_1k),
        ("output_per_1k", m.output_per_1k),
        ("per_image", m.per_image),
    ] {
        if !(0..=MAX_PRICE).contains(&price) {
            return Err(format!(
                "model {:?}: {name} must be between 0 and {MAX_PRICE}",
                m.id
            ));
        }
    }
    Ok(Model {
        id: m.id.clone(),
        provider: m.provider.clone(),
        kind,
        input_per_1k: m.input_per_1k,
        output_per_1k: m.output_per_1k,
        per_image: m.per_image,
        context_window: m.context_window,
        fallback: m.fallback.clone(),
    })
}

/// The token estimate Tally uses wherever a provider does not report usage, and for every
/// estimate before a request runs: a quarter of the characters, rounded up, plus 4 tokens of
/// framing per message (the ratio OpenAI documents for English text).
pub mod tokens {
    /// Tokens in a piece of text.
    pub fn count(text: &str) -> u64 {
        u64::try_from(text.chars().count())
            .unwrap_or(u64::MAX)
            .div_ceil(4)
    }

    /// Tokens of a conversation sent to a model: each message's text plus 4 for its framing.
    pub fn count_messages<'a>(contents: impl IntoIterator<Item = &'a str>) -> u64 {
        contents.into_iter().fold(0u64, |total, c| {
            total.saturating_add(count(c)).saturating_add(4)
        })
    }
}

/// A user's model preferences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    pub chat_model: Option<String>,
    pub image_model: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
}

/// A user's `ai_preferences` row (all `NULL` when the user has none).
#[derive(sqlx::FromRow)]
pub(crate) struct PreferencesRow {
    chat_model: Option<String>,
    image_model: Option<String>,
    temperature: Option<f64>,
    max_tokens: Option<i64>,
}

impl From<PreferencesRow> for Preferences {
    fn from(r: PreferencesRow) -> Preferences {
        Preferences {
            chat_model: r.chat_model,
            image_model: r.image_model,
            temperature: r.temperature,
            max_tokens: r.max_tokens.and_then(|n| u32::try_from(n).ok()),
        }
    }
}

pub async fn preferences(db: &Db, user_id: &str) -> Result<Preferences, DbError> {
    let sql = "SELECT chat_model, image_model, temperature, max_tokens FROM ai_preferences WHERE user_id = $1";
    let row: Option<PreferencesRow> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(user_id).fetch_optional(pool).await?
    });
    Ok(match row {
        Some(r) => r.into(),
        None => Preferences {
            chat_model: None,
            image_model: None,
            temperature: None,
            max_tokens: None,
        },
    })
}

pub async fn set_preferences(db: &Db, user_id: &str, p: &Preferences) -> Result<(), DbError> {
    let sql = "INSERT INTO ai_preferences (user_id, chat_model, image_model, temperature, max_tokens, updated_at) \
        VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id) DO UPDATE SET chat_model = excluded.chat_model, \
        image_model = excluded.image_model, temperature = excluded.temperature, \
        max_tokens = excluded.max_tokens, updated_at = excluded.updated_at";
    with_pool!(db, pool => {
        sqlx::query(sql)
            .bind(user_id)
            .bind(&p.chat_model)
            .bind(&p.image_model)
            .bind(p.temperature)
            .bind(p.max_tokens.map(i64::from))
            .bind(now_ms())
            .execute(pool)
            .await?;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_round_up_per_side() {
        let m = &Catalog::offline().models[0];
        assert_eq!(m.chat_cost(0, 0), 0);
        assert_eq!(m.chat_cost(1, 0), 1);
        assert_eq!(m.chat_cost(1000, 1000), 1 + 2);
        assert_eq!(m.chat_cost(1001, 1), 2 + 1);
        assert!(
            m.chat_cost(u64::MAX, u64::MAX) > 0,
            "saturates instead of overflowing"
        );
        assert_eq!(tokens::count("abcde"), 2);
        assert_eq!(tokens::count_messages(["abcd", ""]), 1 + 4 + 4);
    }
}
