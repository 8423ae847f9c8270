//! `tally bench`: for each backend, enqueue N `echo` jobs (batched, one transaction per batch),
//! drain them with K `tally work` processes, then measure job submission through the HTTP API.
//! `tally bench --ledger` measures the ledger instead (see `bench_ledger`), `tally bench --ai`
//! chat jobs end to end (see `bench_ai`), `tally bench --events` live events' latency (see
//! `bench_events`).
//! `--workers 1,2,4` repeats the jobs scenario per process count, each on a fresh database.
//! Figures are printed as a table, or with `--json` as one JSON object per scenario on stdout
//! (the table then goes to stderr); nothing is asserted.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use serde_json::json;
use tally_api::AppState;
use tally_workflows::{
    Db,
    config::Config,
    jobs::{self, NewJob, Status},
    kinds,
    users::{self, Role},
};
use tokio_util::sync::CancellationToken;

use crate::cli::CliError;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Jobs to enqueue and drain per backend.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Worker processes that drain the queue; a comma-separated list (`1,2,4`) runs the
    /// scenario once per count.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub workers: Vec<usize>,
    /// Jobs run at once per worker process.
    #[arg(long, default_value_t = 2048)]
    pub concurrency: usize,
    /// Tasks each worker claims per fetch.
    #[arg(long, default_value_t = 2048)]
    pub batch: usize,
    /// Backends to measure (sqlite, postgres).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub backends: Vec<String>,
    /// Postgres server to create the benchmark database on.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub postgres_url: String,
    /// Seconds of HTTP submission load per backend (0 skips it).
    #[arg(long, default_value_t = 5)]
    pub http_seconds: u64,
    /// Concurrent HTTP connections submitting jobs.
    #[arg(long, default_value_t = 32)]
    pub http_connections: usize,
    /// Measure the ledger (signed transfers/s, entries verified/s) instead of jobs.
    #[arg(long)]
    pub ledger: bool,
    /// Measure chat jobs end to end (submit, run, store, settle) with an instant provider.
    #[arg(long, conflicts_with = "ledger")]
    pub ai: bool,
    /// Measure how soon a job's end reaches an SSE client (pushed live events).
    #[arg(long, conflicts_with_all = ["ledger", "ai"])]
    pub events: bool,
    /// With --ledger: transfers per scenario.
    #[arg(long, default_value_t = 20_000)]
    pub transfers: usize,
    /// With --ledger: concurrent writers.
    #[arg(long, default_value_t = 128)]
    pub writers: usize,
    /// With --ledger: group-commit shards (transactions in flight at once) on Postgres.
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// With --ai: rounds of chat then echo per backend and worker count, each printed; with
    /// more than one, a row of their medians follows (the machine's speed drifts from one run
    /// to the next, so one round's ratio can be off by a third).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// One JSON object per scenario on stdout (one line each); the table goes to stderr.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// Refuses an empty or zero `--workers`.
    pub(crate) fn worker_counts(&self) -> Result<&[usize], CliError> {
        if self.workers.is_empty() || self.workers.contains(&0) {
            return Err(CliError::usage("--workers must list counts of at least 1"));
        }
        Ok(&self.workers)
    }

    /// Where the benchmark's figures go: the table, and with `--json` one line per scenario.
    pub(crate) fn out(&self) -> Out {
        Out { json: self.json }
    }
}

/// Prints the benchmark's human table on stdout, or with `--json` on stderr while each
/// scenario's figures go to stdout as one JSON object per line.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    json: bool,
}

impl Out {
    /// A line of the human table (a header, a note).
    pub fn text(&self, line: impl std::fmt::Display) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// One scenario's figures: its table row, and with `--json` its object on stdout.
    pub fn scenario(&self, row: impl std::fmt::Display, figures: &impl serde::Serialize) {
        self.text(row);
        self.figures(figures);
    }

    /// One scenario's JSON line (with `--json`; nothing otherwise).
    pub fn figures(&self, figures: &impl serde::Serialize) {
        if self.json {
            match serde_json::to_string(figures) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("cannot print the figures as JSON: {e}"),
            }
        }
    }
}

pub(crate) struct Fresh {
    pub url: String,
    /// Postgres database to drop afterwards.
    drop: Option<String>,
}

impl Fresh {
    /// Drops the benchmark's Postgres database (SQLite files stay in the temp folder).
    pub async fn drop_database(&self, args: &BenchArgs) {
        if let Some(name) = &self.drop
            && let Ok(admin) = Db::connect(&args.postgres_url, 1).await
        {
            if let Db::Postgres(pool) = &admin {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(pool)
                .await;
            }
            admin.close().await;
        }
    }
}

pub(crate) async fn fresh_database(backend: &str, args: &BenchArgs) -> Result<Fresh, CliError> {
    let stamp = uuid::Uuid::now_v7().simple().to_string();
    match backend {
        "sqlite" => {
            let dir = std::env::temp_dir().join(format!("tally-bench-{stamp}"));
            Ok(Fresh {
                url: format!("sqlite://{}", dir.join("bench.db").display()),
                drop: None,
            })
        }
        "postgres" => {
            let admin = Db::connect(&args.postgres_url, 1).await?;
            let name = format!("tally_bench_{stamp}");
            if let Db::Postgres(pool) = &admin {
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(pool)
                    .await
                    .map_err(|e| {
                        CliError::other(format!("cannot create the benchmark database: {e}"))
                    })?;
            }
            admin.close().await;
            // The server's URL with the new database in place of the named one; its
            // parameters (`?sslmode=...`) are kept.
            let (url, params) = match args.postgres_url.split_once('?') {
                Some((url, params)) => (url, format!("?{params}")),
                None => (args.postgres_url.as_str(), String::new()),
            };
            let (base, _) = url
                .rsplit_once('/')
                .ok_or_else(|| CliError::usage("--postgres-url must name a database"))?;
            Ok(Fresh {
                url: format!("{base}/{name}{params}"),
                drop: Some(name),
            })
        }
        other => Err(CliError::usage(format!(
            "unknown backend {other:?}; use sqlite or postgres"
        ))),
    }
}

pub async fn run(cfg: Config, args: BenchArgs) -> Result<(), CliError> {
    if args.ledger {
        return crate::bench_ledger::run(cfg, args).await;
    }
    if args.ai {
        return crate::bench_ai::run(cfg, args).await;
    }
    if args.events {
        return crate::bench_events::run(cfg, args).await;
    }
    let counts = args.worker_counts()?;
    if args.jobs == 0 {
        return Err(CliError::usage("--jobs must be at least 1"));
    }
    let out = args.out();
    out.text(format!(
        "tally bench: {} echo jobs, {} worker processes x concurrency {}, batch {}; HTTP {} s x {} connections",
        args.jobs,
        list(counts),
        args.concurrency,
        args.batch,
        args.http_seconds,
        args.http_connections
    ));
    out.text(format!(
        "{:<9} {:>7} {:>14} {:>14} {:>14} {:>12} {:>12}",
        "backend", "workers", "enqueue/s", "drain/s", "http submit/s", "http p50 ms", "http p99 ms"
    ));
    for backend in &args.backends {
        for (i, &workers) in counts.iter().enumerate() {
            // HTTP submission does not depend on the worker count: measured once per backend.
            let http = i == 0 && args.http_seconds > 0;
            let fresh = fresh_database(backend, &args).await?;
            let result = bench_backend(&cfg, &args, backend, &fresh.url, workers, http).await;
            fresh.drop_database(&args).await;
            let (echo, http) = result?;
            let echo = EchoFigures {
                backend: backend.clone(),
                scenario: "echo",
                jobs: args.jobs,
                workers,
                concurrency: args.concurrency,
                batch: args.batch,
                enqueue_per_s: echo.0.round(),
                drain_per_s: echo.1.round(),
            };
            let http_columns = match &http {
                Some(h) => format!(
                    "{:>14.0} {:>12.2} {:>12.2}",
                    h.submit_per_s, h.p50_ms, h.p99_ms
                ),
                None => format!("{:>14} {:>12} {:>12}", "-", "-", "-"),
            };
            out.scenario(
                format!(
                    "{:<9} {:>7} {:>14.0} {:>14.0} {http_columns}",
                    backend, workers, echo.enqueue_per_s, echo.drain_per_s
                ),
                &echo,
            );
            if let Some(h) = http {
                // Its figures are in the row above; only the JSON line is separate.
                out.figures(&h);
            }
        }
    }
    Ok(())
}

/// `1,2,4`.
pub(crate) fn list(counts: &[usize]) -> String {
    counts
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The `echo` scenario's figures for one backend and one worker count.
#[derive(serde::Serialize)]
struct EchoFigures {
    backend: String,
    scenario: &'static str,
    jobs: usize,
    workers: usize,
    concurrency: usize,
    batch: usize,
    enqueue_per_s: f64,
    drain_per_s: f64,
}

/// HTTP submission's figures for one backend (`POST /v1/jobs` on the real router).
#[derive(serde::Serialize)]
pub(crate) struct HttpFigures {
    backend: String,
    scenario: &'static str,
    connections: usize,
    seconds: u64,
    submitted: usize,
    errors: u64,
    submit_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Enqueues and drains `args.jobs` echo jobs with `workers` processes; then, if `http`, the
/// HTTP submission load. Answers (enqueue/s, drain/s) and the HTTP figures.
pub(crate) async fn bench_backend(
    cfg: &Config,
    args: &BenchArgs,
    backend: &str,
    url: &str,
    workers: usize,
    http: bool,
) -> Result<((f64, f64), Option<HttpFigures>), CliError> {
    let db = Db::connect(url, 16).await?;
    db.migrate().await?;
    let user = users::create(&db, "bench@tally.local", Role::User, None).await?;

    // Enqueue: one transaction per 1,000 jobs.
    let started = Instant::now();
    let mut left = args.jobs;
    while left > 0 {
        let n = left.min(1000);
        let batch = (0..n)
            .map(|i| NewJob {
                max_attempts: 3,
                ..NewJob::new(&user.id, &kinds::ECHO, json!({ "i": i }))
            })
            .collect();
        for answer in jobs::submit_many(&db, batch).await? {
            answer.map_err(|e| CliError::other(e.to_string()))?;
        }
        left -= n;
    }
    let enqueue_per_s = args.jobs as f64 / started.elapsed().as_secs_f64();

    // Drain with K worker processes.
    let started = Instant::now();
    let children = spawn_workers(args, workers, url, "system", &[])?;
    loop {
        let done = jobs::count_by_status(&db, Status::Succeeded).await?;
        if done as usize >= args.jobs {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(CliError::other(format!(
                "drain stalled at {done} of {} jobs",
                args.jobs
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_per_s = args.jobs as f64 / started.elapsed().as_secs_f64();
    stop_workers(children).await;

    // HTTP submission against the real router on loopback (no workers running).
    let http = if http {
        Some(http_load(cfg, args, backend, db.clone(), &user.api_key).await?)
    } else {
        None
    };
    db.close().await;
    Ok(((enqueue_per_s, drain_per_s), http))
}

async fn http_load(
    cfg: &Config,
    args: &BenchArgs,
    backend: &str,
    db: Db,
    key: &str,
) -> Result<HttpFigures, CliError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop_server = CancellationToken::new();
    let state = AppState::new(
        db,
        cfg.clone(),
        tally_workflows::ledger::log::Keys::load(&cfg.ledger, None).map_err(CliError::usage)?,
    );
    let server = tokio::spawn(tally_api::serve(
        listener,
        state,
        stop_server.clone().cancelled_owned(),
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.http_connections)
        .build()
        .map_err(|e| CliError::other(e.to_string()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for c in 0..args.http_connections {
        let (client, stop, url, key) = (
            client.clone(),
            stop.clone(),
            format!("{base}/v1/jobs"),
            key.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let resp = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"kind": "echo", "input": {"c": c, "i": i}}))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().as_u16() == 202 => {
                        latencies.push(t.elapsed().as_micros() as u32)
                    }
                    _ => errors += 1,
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.http_seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop_server.cancel();
    let _ = server.await;
    if errors > 0 {
        eprintln!("warning: {errors} HTTP submissions failed");
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|&us| us as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    Ok(HttpFigures {
        backend: backend.to_owned(),
        scenario: "http submit",
        connections: args.http_connections,
        seconds: args.http_seconds,
        submitted: all.len(),
        errors,
        submit_per_s: (all.len() as f64 / elapsed).round(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}

/// Keeps Postgres' planner statistics current while a benchmark runs, by autovacuum's own rule
/// without its wait: every second, each table with more rows changed since its last `ANALYZE`
/// than 50 + 10% of its rows (`autovacuum_analyze_threshold`, `_scale_factor`) is analysed.
/// Autovacuum looks at most once a minute (`autovacuum_naptime`), so a benchmark of a few
/// seconds on a fresh database would otherwise run on the plans Postgres made for empty tables
/// (sequential scans) while the tables grow by tens of thousands of rows: not the steady state
/// of a running deployment. (Analysing the whole database every second took a sixth of a core
/// from the benchmark.) SQLite plans without statistics; nothing is done there.
pub(crate) fn keep_statistics_fresh(db: &Db) -> Option<tokio::task::JoinHandle<()>> {
    let Db::Postgres(pool) = db else {
        return None;
    };
    let pool = pool.clone();
    Some(tokio::spawn(async move {
        let due = "SELECT quote_ident(schemaname) || '.' || quote_ident(relname) \
            FROM pg_stat_user_tables WHERE n_mod_since_analyze > 50 + 0.1 * n_live_tup";
        loop {
            let tables: Result<Vec<String>, _> = sqlx::query_scalar(due).fetch_all(&pool).await;
            match tables {
                Ok(tables) if !tables.is_empty() => {
                    // A small sample: enough for the planner to see how big the tables have
                    // grown, cheap enough not to take much of the database's time.
                    let analyze = format!(
                        "SET default_statistics_target = 10; ANALYZE {}",
                        tables.join(", ")
                    );
                    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(analyze))
                        .execute(&pool)
                        .await
                    {
                        tracing::warn!(error = %e, "ANALYZE failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the tables' changes failed"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }))
}

/// Starts `workers` `tally work` processes on `queue`, with the bench's batch, concurrency and
/// the default poll (an idle worker wakes on new jobs: `LISTEN` on Postgres, the commit watch
/// on SQLite); `env` adds to their environment.
pub(crate) fn spawn_workers(
    args: &BenchArgs,
    workers: usize,
    url: &str,
    queue: &str,
    env: &[(&str, &std::path::Path)],
) -> Result<Vec<tokio::process::Child>, CliError> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "work",
            "--queues",
            queue,
            "--concurrency",
            &args.concurrency.to_string(),
        ])
        .env("DATABASE_URL", url)
        .env("TALLY_WORKER__BATCH_SIZE", args.batch.to_string())
        .env(
            "TALLY_LOG",
            std::env::var("TALLY_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        children.push(cmd.spawn()?);
    }
    Ok(children)
}

/// SIGTERM to every worker process, then waits for them (30 s each at most).
pub(crate) async fn stop_workers(children: Vec<tokio::process::Child>) {
    for child in &children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
    for mut child in children {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
}
