//! Tally's domain and storage.
//!
//! # Layout
//! - [`agents`]: agent tasks and their durable, individually paid steps.
//! - [`ai`]: the model catalog, prices, token estimates and users' model preferences.
//! - [`batch`]: group commit: many callers' writes in one statement and one transaction.
//! - [`chat`]: conversations and their messages; a question and its job commit together.
//! - [`cron`]: schedules from the configuration and the platform's own; one job per tick,
//!   claimed by a unique row written with the job.
//! - [`config`]: the effective configuration (defaults, TOML file, `TALLY_*` environment, flags).
//! - [`db`]: one connection pool on SQLite or Postgres, migrations, readiness; dialect
//!   differences live here and nowhere else.
//! - [`events`]: live events: which jobs changed, pushed after each commit (in-process
//!   broadcast; Postgres LISTEN/NOTIFY across processes).
//! - [`images`]: generated images: rows here, bytes in the image folder.
//! - [`jobs`]: job records and their states; a job's row is its queue entry, claimed by workers
//!   and leased to them.
//! - [`kinds`]: the job kinds the platform knows, their queues and input validation.
//! - [`ledger`]: the signed credit ledger: accounts, transfers, reservations, the Merkle log.
//! - [`limits`]: per-user concurrency limits, enforced by the claim across processes.
//! - [`outage`]: riding out a database outage: retry with backoff, logged once per outage.
//! - [`queues`]: the queues as an admin sees them (depth, running, paused); pause and resume.
//! - [`retry`]: the backoff rule that decides when a failed attempt runs again.
//! - [`users`]: users, roles and hashed API keys.

pub mod agents;
pub mod ai;
pub mod batch;
pub mod chat;
pub mod config;
pub mod cron;
pub mod db;
pub mod effects;
pub mod events;
pub mod images;
pub mod jobs;
pub mod kinds;
pub mod ledger;
pub mod limits;
pub mod outage;
pub mod queues;
pub mod retry;
pub mod users;

pub use db::{Db, DbError};

/// Milliseconds since the Unix epoch: the one time unit stored in the database.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Formats a stored millisecond timestamp as RFC 3339 (UTC) for the API.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}
