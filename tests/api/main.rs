//! Black-box tests: the real router and worker pools, or the real `tally` binary, on port 0
//! against a fresh SQLite file and a fresh Postgres database. Every behaviour test runs on both.
//! Under `CI=true` a Postgres test that cannot reach Postgres fails instead of skipping.

mod helpers;

mod agents;
mod auth;
mod chat;
mod cli;
mod cron;
mod effects;
mod events;
mod images;
mod inputs;
mod jobs;
mod ledger;
mod ledger_props;
mod limits;
mod models;
mod outage;
mod processes;
mod queues;
