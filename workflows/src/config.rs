//! The effective configuration: defaults, then an optional TOML file (`--config` or
//! `TALLY_CONFIG`), then `TALLY_*` environment variables (`TALLY_WORKER__CONCURRENCY=8` sets
//! `worker.concurrency`; `DATABASE_URL` is read too), then command-line flags. Later wins.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// A value that never prints: `Debug`, `Display` and `tally config` show `<redacted>`.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// Folder for the embedded SQLite database and other local state.
    pub data_dir: PathBuf,
    /// `postgres://...` or `sqlite://FILE`; defaults to `sqlite://<data_dir>/tally.db`.
    pub database_url: Option<Secret>,
    /// If set, an admin user with exactly this API key exists after start.
    pub admin_key: Option<Secret>,
    /// Connections per process.
    pub max_connections: u32,
    pub api: ApiConfig,
    pub worker: WorkerConfig,
    pub jobs: JobsConfig,
    pub ledger: LedgerConfig,
    pub credits: CreditsConfig,
    /// Credits each job of a kind costs (`[pricing] echo = 2`). Kinds not listed cost 0.
    pub pricing: BTreeMap<String, i64>,
    pub ai: AiConfig,
    pub limits: LimitsConfig,
    /// Schedules (`[[cron]]`): each makes one job per tick (see `workflows::cron`).
    pub cron: Vec<crate::cron::CronConfig>,
}

/// Per-user concurrency limits, held across every process on the database (see
/// `workflows::limits`). A job over a limit waits `queued`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Jobs of one user that may run at once (default: no limit).
    pub max_running_per_user: Option<i64>,
    /// Jobs of one kind that one user may run at once (`[limits.kinds] chat = 4`).
    pub kinds: BTreeMap<String, i64>,
}

/// AI providers and the model catalog. With no provider configured (and no
/// `AI_PLATFORM_BASE_URL`), the catalog is the built-in offline models.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AiConfig {
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    /// Output tokens a chat request may produce when neither it nor the user's preferences say.
    pub default_max_tokens: u32,
    /// Where generated images are stored; defaults to `<data_dir>/images`.
    pub image_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    /// The OpenAI-compatible API's base URL (`https://host` or `https://host/v1`).
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// Read the API key from this environment variable.
    pub api_key_env: Option<String>,
    /// Read the API key from this file.
    pub api_key_file: Option<PathBuf>,
    #[serde(default = "default_provider_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_provider_retries")]
    pub max_retries: u32,
    /// First retry delay; each later one doubles, with jitter, up to 30 s. A 429's
    /// `Retry-After` wins.
    #[serde(default = "default_provider_retry_base")]
    pub retry_base_ms: u64,
    #[serde(default = "default_provider_concurrency")]
    pub max_concurrency: usize,
}

fn default_provider_timeout() -> u64 {
    60_000
}
fn default_provider_retries() -> u32 {
    3
}
fn default_provider_retry_base() -> u64 {
    500
}
fn default_provider_concurrency() -> usize {
    16
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub id: String,
    pub provider: String,
    /// `chat` or `image`.
    pub kind: String,
    /// Credits per 1,000 input tokens (chat).
    #[serde(default)]
    pub input_per_1k: i64,
    /// Credits per 1,000 output tokens (chat).
    #[serde(default)]
    pub output_per_1k: i64,
    /// Credits per image (image).
    #[serde(default)]
    pub per_image: i64,
    #[serde(default = "default_context_window")]
    pub context_window: u32,
    /// Another provider that serves this model when the first keeps failing.
    pub fallback: Option<String>,
}

fn default_context_window() -> u32 {
    8192
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The log's name, the first line of every checkpoint.
    pub origin: String,
    /// The Ed25519 key that signs checkpoints (`PRIVATE+KEY+name+id+...`, made by
    /// `tally keys generate`). A process without one commits transfers but signs nothing.
    pub signing_key: Option<Secret>,
    /// The same, read from a file.
    pub signing_key_file: Option<PathBuf>,
    /// Public keys whose old checkpoints still verify after a rotation (`name+id+...`): a
    /// list, or one comma-separated string (`TALLY_LEDGER__VERIFIER_KEYS`).
    #[serde(deserialize_with = "list_or_csv")]
    pub verifier_keys: Vec<String>,
    /// How often a signing process integrates new transfers into the log and signs a checkpoint.
    pub checkpoint_ms: u64,
    /// When pending reservations past their time are released: the platform's `ledger.expire`
    /// cron schedule (a cron expression with seconds, UTC).
    pub expiry_schedule: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsConfig {
    /// Credits the one-time welcome bonus grants (also `WELCOME_BONUS_AMOUNT`).
    pub welcome_bonus: i64,
    /// Lifetime of a reservation made through the API when the request does not say.
    pub reservation_ttl_secs: u64,
    /// Longest lifetime a reservation may ask for.
    pub max_reservation_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// How often an event stream looks at its jobs itself, in milliseconds: only the fallback
    /// for a change it was not told about (changes are pushed; see `tally_workflows::events`).
    pub events_poll_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Queues this process serves: a list, or one comma-separated string
    /// (`TALLY_WORKER__QUEUES=ai,notify`).
    #[serde(deserialize_with = "list_or_csv")]
    pub queues: Vec<String>,
    /// Jobs run at once per queue in this process.
    pub concurrency: usize,
    /// Tasks claimed per fetch.
    pub batch_size: usize,
    /// How often an idle worker looks for due tasks, in milliseconds.
    pub poll_ms: u64,
    /// A worker that has not been heard from for this many seconds loses its jobs to others.
    pub lease_secs: u64,
    /// On SIGTERM, how long in-flight jobs may run before they are handed back.
    pub shutdown_timeout_secs: u64,
    /// Worker name shown on the jobs it runs, followed by `:pid`; defaults to the host name.
    pub name: Option<String>,
    /// Fault injection for tests: pause this long inside each settlement transaction, after the
    /// ledger writes and before the commit. 0 (the default) in production.
    pub settle_pause_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Attempts a job gets when the submission does not say.
    pub default_max_attempts: u32,
    /// First retry delay; each later one doubles, with jitter, up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(v) => v,
        ListOrCsv::Csv(s) => s
            .split(',')
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect(),
    })
}

pub const QUEUES: [&str; 4] = ["ai", "payments", "notify", "system"];

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./tally-data"),
            database_url: None,
            admin_key: None,
            max_connections: 16,
            api: ApiConfig {
                body_limit: 1024 * 1024,
                events_poll_ms: 1000,
            },
            worker: WorkerConfig {
                queues: QUEUES.iter().map(|q| q.to_string()).collect(),
                concurrency: 16,
                batch_size: 32,
                poll_ms: 200,
                lease_secs: 30,
                shutdown_timeout_secs: 30,
                name: None,
                settle_pause_ms: 0,
            },
            jobs: JobsConfig {
                default_max_attempts: 5,
                retry_base_ms: 1000,
                retry_max_ms: 300_000,
            },
            ledger: LedgerConfig {
                origin: "tally.local/ledger".to_owned(),
                signing_key: None,
                signing_key_file: None,
                verifier_keys: Vec::new(),
                checkpoint_ms: 250,
                expiry_schedule: "*/5 * * * * *".to_owned(),
            },
            credits: CreditsConfig {
                welcome_bonus: 1000,
                reservation_ttl_secs: 300,
                max_reservation_ttl_secs: 7 * 24 * 3600,
            },
            pricing: BTreeMap::new(),
            ai: AiConfig {
                providers: Vec::new(),
                models: Vec::new(),
                default_max_tokens: 512,
                image_dir: None,
            },
            limits: LimitsConfig::default(),
            cron: Vec::new(),
        }
    }
}

/// Why the configuration was refused; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {key}: {why}")]
    Invalid { key: &'static str, why: String },
}

impl Config {
    /// Layers the sources in order of precedence. `overrides` are the command-line flags, as a
    /// map of dotted keys (`worker.concurrency`) to values.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: BTreeMap<String, toml::Value>,
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Parse(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        if let Ok(url) = std::env::var("DATABASE_URL") {
            fig = fig.merge(("database_url", url));
        }
        // The original product's two variables: one provider, "platform".
        if let Ok(base_url) = std::env::var("AI_PLATFORM_BASE_URL") {
            let mut provider = serde_json::json!({ "name": "platform", "base_url": base_url });
            if let Ok(key) = std::env::var("AI_PLATFORM_API_KEY") {
                provider["api_key"] = serde_json::Value::String(key);
            }
            fig = fig.merge(("ai.providers", vec![provider]));
        }
        if let Ok(amount) = std::env::var("WELCOME_BONUS_AMOUNT") {
            let amount: i64 = amount.trim().parse().map_err(|_| ConfigError::Invalid {
                key: "credits.welcome_bonus",
                why: format!("WELCOME_BONUS_AMOUNT={amount:?} is not a whole number of credits"),
            })?;
            fig = fig.merge(("credits.welcome_bonus", amount));
        }
        fig = fig.merge(
            Env::prefixed("TALLY_")
                .ignore(&["CONFIG", "LOG", "TEST_POSTGRES_URL", "BENCH_WORKER_LOG"])
                .map(|k| k.as_str().to_ascii_lowercase().replace("__", ".").into()),
        );
        for (key, value) in overrides {
            fig = fig.merge((key, value));
        }
        let config: Config = fig.extract().map_err(|e| {
            let mut msg = String::new();
            for err in e {
                if !msg.is_empty() {
                    msg.push_str("; ");
                }
                let key = err.path.join(".");
                let source = err.metadata.as_ref().map(|m| m.name.to_string());
                match (key.is_empty(), source) {
                    (true, _) => msg.push_str(&err.kind.to_string()),
                    (false, Some(src)) => {
                        msg.push_str(&format!("{key}: {} (from {src})", err.kind))
                    }
                    (false, None) => msg.push_str(&format!("{key}: {}", err.kind)),
                }
            }
            ConfigError::Parse(msg)
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| {
            Err(ConfigError::Invalid {
                key,
                why: why.to_owned(),
            })
        };
        if self.worker.concurrency == 0 || self.worker.concurrency > 10_000 {
            return invalid("worker.concurrency", "must be between 1 and 10000");
        }
        if self.worker.batch_size == 0 || self.worker.batch_size > 10_000 {
            return invalid("worker.batch_size", "must be between 1 and 10000");
        }
        if self.worker.lease_secs < 3 {
            return invalid("worker.lease_secs", "must be at least 3");
        }
        if self.worker.poll_ms == 0 {
            return invalid("worker.poll_ms", "must be at least 1");
        }
        if self.worker.queues.is_empty() {
            return invalid("worker.queues", "name at least one queue");
        }
        for q in &self.worker.queues {
            if !QUEUES.contains(&q.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "worker.queues",
                    why: format!("unknown queue {q:?}; known queues: {}", QUEUES.join(", ")),
                });
            }
        }
        if self.jobs.default_max_attempts == 0 || self.jobs.default_max_attempts > 100 {
            return invalid("jobs.default_max_attempts", "must be between 1 and 100");
        }
        if self.jobs.retry_base_ms == 0 || self.jobs.retry_max_ms < self.jobs.retry_base_ms {
            return invalid(
                "jobs.retry_base_ms",
                "must be at least 1 and not above jobs.retry_max_ms",
            );
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if self.api.body_limit < 1024 {
            return invalid("api.body_limit", "must be at least 1024 bytes");
        }
        if self.api.events_poll_ms == 0 {
            return invalid("api.events_poll_ms", "must be at least 1");
        }
        if self.credits.welcome_bonus < 0 {
            return invalid("credits.welcome_bonus", "must not be negative");
        }
        if self.credits.reservation_ttl_secs == 0
            || self.credits.reservation_ttl_secs > self.credits.max_reservation_ttl_secs
        {
            return invalid(
                "credits.reservation_ttl_secs",
                "must be at least 1 and not above credits.max_reservation_ttl_secs",
            );
        }
        if let Err(why) = crate::ai::Catalog::from_config(&self.ai) {
            return Err(ConfigError::Invalid { key: "ai", why });
        }
        if self.ledger.checkpoint_ms == 0 || self.ledger.checkpoint_ms > 1000 {
            return invalid(
                "ledger.checkpoint_ms",
                "must be between 1 and 1000 (a checkpoint at least once a second)",
            );
        }
        if self.ledger.origin.trim().is_empty() || self.ledger.origin.contains('\n') {
            return invalid("ledger.origin", "must be one non-empty line");
        }
        for (kind, price) in &self.pricing {
            if crate::kinds::lookup(kind).is_none() {
                return Err(ConfigError::Invalid {
                    key: "pricing",
                    why: format!(
                        "unknown job kind {kind:?}; known kinds: {}",
                        crate::kinds::names().join(", ")
                    ),
                });
            }
            if *price < 0 {
                return Err(ConfigError::Invalid {
                    key: "pricing",
                    why: format!("price of {kind:?} is negative"),
                });
            }
        }
        if let Err((key, why)) = crate::limits::Limits::check(&self.limits) {
            return Err(ConfigError::Invalid { key, why });
        }
        crate::cron::schedules(self)?;
        let url = self.database_url();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return invalid("database_url", "must start with postgres:// or sqlite://");
        }
        Ok(())
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.expose().to_owned(),
            None => format!("sqlite://{}", self.data_dir.join("tally.db").display()),
        }
    }

    /// The folder generated images are stored in.
    pub fn image_dir(&self) -> PathBuf {
        self.ai
            .image_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }

    /// The credits a job of `kind` costs.
    pub fn price(&self, kind: &str) -> i64 {
        self.pricing.get(kind).copied().unwrap_or(0)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.worker.lease_secs)
    }

    /// The configuration as TOML, with secrets (and a password inside the database URL) redacted.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = Some(Secret::new(redact_url(&self.database_url())));
        if shown.admin_key.is_some() {
            shown.admin_key = Some(Secret::new("<redacted>"));
        }
        for p in &mut shown.ai.providers {
            if p.api_key.is_some() {
                p.api_key = Some(Secret::new("<redacted>"));
            }
        }
        if shown.ledger.signing_key.is_some() {
            shown.ledger.signing_key = Some(Secret::new("<redacted>"));
        }
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:<redacted>@host/db`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((creds, host)) = rest.split_once('@')
        && let Some((user, _)) = creds.split_once(':')
    {
        return format!("{scheme}://{user}:<redacted>@{host}");
    }
    url.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:<redacted>@h:5432/db"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn flags_win_over_defaults_and_bad_values_are_named() {
        let mut o = BTreeMap::new();
        o.insert("worker.concurrency".into(), toml::Value::Integer(3));
        let c = Config::load(None, o).expect("valid");
        assert_eq!(c.worker.concurrency, 3);
        let mut o = BTreeMap::new();
        o.insert("worker.concurrency".into(), toml::Value::Integer(0));
        let e = Config::load(None, o).expect_err("invalid").to_string();
        assert!(e.contains("worker.concurrency"), "{e}");
    }
}
