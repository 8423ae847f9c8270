//! `tally bench --events`: how soon a job's end reaches a client following it over SSE. For each
//! sample a client opens `GET /v1/jobs/{id}/events` on a queued job (and reads its first event),
//! then the job is cancelled (a terminal state) and the time from the commit's return to the
//! terminal event arriving is recorded. Two writers: this process (`jobs::cancel`: the
//! in-process broadcast) and, on Postgres, another connection (a plain `UPDATE`, as another
//! process would write: only the `NOTIFY` triggers and the API's listener carry it). The
//! fallback poll is set to a minute, so every event counted was pushed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tally_api::AppState;
use tally_workflows::{
    Db,
    config::Config,
    jobs::{self, NewJob},
    kinds,
    users::{self, Role, User},
};
use tokio_util::sync::CancellationToken;

use crate::{bench::BenchArgs, cli::CliError};

/// Samples per writer and backend.
const SAMPLES: usize = 300;

pub async fn run(cfg: Config, args: BenchArgs) -> Result<(), CliError> {
    println!(
        "tally bench --events: {SAMPLES} jobs per writer, commit of the end to the SSE event at the client (fallback poll 60 s)"
    );
    println!(
        "{:<9} {:<14} {:>10} {:>10} {:>10}",
        "backend", "writer", "p50 ms", "p99 ms", "max ms"
    );
    for backend in &args.backends {
        let fresh = crate::bench::fresh_database(backend, &args).await?;
        let result = bench_backend(&cfg, &fresh.url, backend).await;
        fresh.drop_database(&args).await;
        result?;
    }
    Ok(())
}

async fn bench_backend(base: &Config, url: &str, backend: &str) -> Result<(), CliError> {
    let db = Db::connect(url, 8).await?;
    db.migrate().await?;
    let created = users::create(&db, "events@tally.local", Role::User, None).await?;
    let user = User {
        id: created.id.clone(),
        email: created.email.clone(),
        role: created.role,
    };
    let mut cfg = base.clone();
    cfg.api.events_poll_ms = 60_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base_url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let keys =
        tally_workflows::ledger::log::Keys::load(&cfg.ledger, None).map_err(CliError::usage)?;
    let state = AppState::new(db.clone(), cfg, keys);
    let server = tokio::spawn(tally_api::serve(
        listener,
        state,
        stop.clone().cancelled_owned(),
    ));
    // Let the Postgres listener connect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = reqwest::Client::new();
    let mut writers = vec!["this process"];
    if backend == "postgres" {
        writers.push("other conn");
    }
    let other = match &db {
        Db::Postgres(pool) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_with((*pool.connect_options()).clone())
                .await
                .map_err(|e| CliError::other(e.to_string()))?,
        ),
        Db::Sqlite(_) => None,
    };
    for writer in writers {
        let mut latencies = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let job = NewJob::new(&user.id, &kinds::ECHO, json!({ "i": i }));
            let (job, _) = jobs::submit_many(&db, vec![job])
                .await?
                .pop()
                .ok_or_else(|| CliError::other("no job submitted"))?
                .map_err(|e| CliError::other(e.to_string()))?;
            let resp = client
                .get(format!("{base_url}/v1/jobs/{}/events", job.id))
                .bearer_auth(&created.api_key)
                .send()
                .await
                .map_err(|e| CliError::other(e.to_string()))?;
            let mut body = resp.bytes_stream();
            let mut text = String::new();
            // The first event: the job as it is (queued).
            while !text.contains("\n\n") {
                match body.next().await {
                    Some(Ok(b)) => text.push_str(&String::from_utf8_lossy(&b)),
                    _ => return Err(CliError::other("the event stream ended early")),
                }
            }
            text.clear();
            let committed = match (writer, &other) {
                ("other conn", Some(pool)) => {
                    sqlx::query(
                        "UPDATE tally_jobs SET status = 'cancelled', cancel_requested = TRUE, \
                         finished_at = updated_at, updated_at = updated_at + 1 WHERE id = $1",
                    )
                    .bind(&job.id)
                    .execute(pool)
                    .await
                    .map_err(|e| CliError::other(e.to_string()))?;
                    Instant::now()
                }
                _ => {
                    jobs::cancel(&db, &job.id, &user)
                        .await
                        .map_err(|e| CliError::other(e.to_string()))?;
                    Instant::now()
                }
            };
            let arrived = tokio::time::timeout(Duration::from_secs(30), async {
                while !text.contains("cancelled") {
                    match body.next().await {
                        Some(Ok(b)) => text.push_str(&String::from_utf8_lossy(&b)),
                        _ => break,
                    }
                }
                Instant::now()
            })
            .await
            .map_err(|_| CliError::other("no terminal event within 30 s"))?;
            latencies.push(arrived.saturating_duration_since(committed));
        }
        latencies.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let pct = |p: f64| {
            ms(latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)])
        };
        println!(
            "{:<9} {:<14} {:>10.2} {:>10.2} {:>10.2}",
            backend,
            writer,
            pct(0.5),
            pct(0.99),
            latencies.last().map(|d| ms(*d)).unwrap_or(0.0)
        );
    }
    if let Some(pool) = other {
        pool.close().await;
    }
    stop.cancel();
    let _ = server.await;
    db.close().await;
    Ok(())
}
