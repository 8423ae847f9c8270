//! `tally bench --ai`: chat jobs end to end with a provider that answers at once (an
//! OpenAI-compatible server on loopback): submitted over HTTP, run by `tally work` processes,
//! the reply stored and the usage settled. Prints chat jobs completed per second under load,
//! and the platform's own time per job (submit to succeeded, one job at a time) at the median.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Json, Router, routing::post};
use serde_json::{Value, json};
use tally_api::AppState;
use tally_workflows::{
    Db, chat,
    config::{Config, ModelConfig, ProviderConfig},
    jobs::{self, Status},
    ledger::{self, Op, TransferSpec, log::Keys},
    users::{self, Role},
};
use tokio_util::sync::CancellationToken;

use crate::{bench::BenchArgs, cli::CliError};

/// Questions asked in one conversation (its history grows with each).
const PER_CONVERSATION: usize = 10;

pub async fn run(cfg: Config, args: BenchArgs) -> Result<(), CliError> {
    let counts = args.worker_counts()?;
    if args.jobs == 0 || args.http_connections == 0 || args.rounds == 0 {
        return Err(CliError::usage(
            "--jobs, --http-connections and --rounds must be at least 1",
        ));
    }
    let out = args.out();
    out.text(format!(
        "tally bench --ai: {} chat jobs over HTTP from {} connections, {} worker processes; provider on loopback answers at once",
        args.jobs,
        args.http_connections,
        crate::bench::list(counts)
    ));
    out.text(format!(
        "{:<9} {:>7} {:>14} {:>20} {:>20} {:>14} {:>13}",
        "backend",
        "workers",
        "chat jobs/s",
        "overhead p50 ms",
        "overhead p99 ms",
        "echo drain/s",
        "chat / echo"
    ));
    let provider = instant_provider().await?;
    let row = |f: &ChatFigures| {
        format!(
            "{:<9} {:>7} {:>14.0} {:>20.2} {:>20.2} {:>14.0} {:>12.3}x",
            f.backend,
            f.workers,
            f.chat_per_s,
            f.overhead_p50_ms,
            f.overhead_p99_ms,
            f.echo_drain_per_s,
            f.chat_vs_echo
        )
    };
    for backend in &args.backends {
        for &workers in counts {
            let mut rounds = Vec::with_capacity(args.rounds);
            for round in 1..=args.rounds {
                let fresh = crate::bench::fresh_database(backend, &args).await?;
                let result = bench_backend(&cfg, &args, workers, &fresh.url, &provider).await;
                fresh.drop_database(&args).await;
                let mut figures = result?;
                figures.backend = backend.clone();
                figures.round = Some(round);
                // The echo drain of the same round, same jobs and worker processes: what a
                // chat job costs against the engine's bare round trip.
                let fresh = crate::bench::fresh_database(backend, &args).await?;
                let echo =
                    crate::bench::bench_backend(&cfg, &args, backend, &fresh.url, workers, false)
                        .await;
                fresh.drop_database(&args).await;
                let ((_, drain_per_s), _) = echo?;
                figures.echo_drain_per_s = drain_per_s.round();
                figures.chat_vs_echo = ratio(figures.chat_per_s, drain_per_s);
                out.scenario(row(&figures), &figures);
                rounds.push(figures);
            }
            if rounds.len() > 1 {
                let median = ChatFigures::median(rounds);
                out.scenario(format!("{} (median)", row(&median)), &median);
            }
        }
    }
    Ok(())
}

/// `a / b` to three decimals.
fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
fn median<T: Copy + Into<f64>>(values: impl Iterator<Item = T>) -> f64 {
    let mut v: Vec<f64> = values.map(Into::into).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The chat scenario's figures for one backend and one worker count.
#[derive(serde::Serialize)]
struct ChatFigures {
    backend: String,
    scenario: &'static str,
    jobs: usize,
    workers: usize,
    connections: usize,
    chat_per_s: f64,
    /// One job at a time, submit to seen succeeded.
    overhead_p50_ms: f64,
    overhead_p99_ms: f64,
    /// Medians of the one-at-a-time jobs' phases, from their stored timestamps.
    submit_to_stored_ms: i64,
    stored_to_claimed_ms: i64,
    claimed_to_finished_ms: i64,
    /// `echo` jobs drained per second by as many worker processes, in the same run.
    echo_drain_per_s: f64,
    /// `chat_per_s` over `echo_drain_per_s`; in the medians' row, the median of the rounds'
    /// ratios.
    chat_vs_echo: f64,
    /// Which of `--rounds` this is (from 1); none in the row of the rounds' medians.
    round: Option<usize>,
}

impl ChatFigures {
    /// Each figure's median over the rounds (of one backend and worker count).
    fn median(rounds: Vec<ChatFigures>) -> ChatFigures {
        let of = |f: fn(&ChatFigures) -> f64| median(rounds.iter().map(f));
        let ms = |f: fn(&ChatFigures) -> i64| median(rounds.iter().map(|r| f(r) as f64)) as i64;
        ChatFigures {
            backend: rounds
                .first()
                .map(|r| r.backend.clone())
                .unwrap_or_default(),
            scenario: "chat",
            jobs: rounds.first().map_or(0, |r| r.jobs),
            workers: rounds.first().map_or(0, |r| r.workers),
            connections: rounds.first().map_or(0, |r| r.connections),
            chat_per_s: of(|r| r.chat_per_s).round(),
            overhead_p50_ms: of(|r| r.overhead_p50_ms),
            overhead_p99_ms: of(|r| r.overhead_p99_ms),
            submit_to_stored_ms: ms(|r| r.submit_to_stored_ms),
            stored_to_claimed_ms: ms(|r| r.stored_to_claimed_ms),
            claimed_to_finished_ms: ms(|r| r.claimed_to_finished_ms),
            echo_drain_per_s: of(|r| r.echo_drain_per_s).round(),
            chat_vs_echo: (of(|r| r.chat_vs_echo) * 1000.0).round() / 1000.0,
            round: None,
        }
    }
}

/// An OpenAI-compatible chat endpoint that answers at once.
async fn instant_provider() -> Result<String, CliError> {
    let reply = Arc::new(json!({
        "id": "bench", "object": "chat.completion", "model": "bench-chat",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": "ok" }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22 },
    }));
    let router = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(_): Json<Value>| {
            let reply = reply.clone();
            async move { Json((*reply).clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(url)
}

async fn bench_backend(
    base_cfg: &Config,
    args: &BenchArgs,
    workers: usize,
    url: &str,
    provider: &str,
) -> Result<ChatFigures, CliError> {
    let mut cfg = base_cfg.clone();
    cfg.ai.providers = vec![ProviderConfig {
        name: "bench".to_owned(),
        base_url: provider.to_owned(),
        api_key: None,
        api_key_env: None,
        api_key_file: None,
        timeout_ms: 10_000,
        max_retries: 2,
        retry_base_ms: 50,
        max_concurrency: 512,
    }];
    cfg.ai.models = vec![ModelConfig {
        id: "bench-chat".to_owned(),
        provider: "bench".to_owned(),
        kind: "chat".to_owned(),
        input_per_1k: 1,
        output_per_1k: 1,
        per_image: 0,
        context_window: 1_000_000,
        fallback: None,
    }];
    let db = Db::connect(url, 32).await?;
    db.migrate().await?;
    let user = users::create(&db, "bench@tally.local", Role::User, None).await?;
    let grant = Op::Transfer(TransferSpec {
        id: "bench/grant".to_owned(),
        debit: tally_ledger::accounts::GRANTS.to_owned(),
        credit: tally_ledger::accounts::available(&user.id),
        amount: 1_000_000_000,
        kind: "grant".to_owned(),
        user_id: Some(user.id.clone()),
        reservation_id: None,
        job_id: None,
        memo: None,
    });
    ledger::run_one(&db, grant)
        .await
        .map_err(|e| CliError::other(e.to_string()))?;
    let conversations = args.jobs.div_ceil(PER_CONVERSATION) + 200 / PER_CONVERSATION + 1;
    let mut ids = Vec::with_capacity(conversations);
    for _ in 0..conversations {
        ids.push(chat::create(&db, &user.id, "bench", "bench-chat").await?.id);
    }

    // The worker processes read the provider from a config file.
    let dir =
        std::env::temp_dir().join(format!("tally-bench-ai-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("tally.toml");
    #[derive(serde::Serialize)]
    struct File<'a> {
        ai: &'a tally_workflows::config::AiConfig,
    }
    let ai = toml::to_string(&File { ai: &cfg.ai }).map_err(|e| CliError::other(e.to_string()))?;
    std::fs::write(&file, ai)?;
    let children =
        crate::bench::spawn_workers(args, workers, url, "ai", &[("TALLY_CONFIG", &file)])?;

    // The API in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let keys = Keys::load(&cfg.ledger, None).map_err(CliError::usage)?;
    let state = AppState::new(db.clone(), cfg.clone(), keys);
    let server = tokio::spawn(tally_api::serve(
        listener,
        state,
        stop.clone().cancelled_owned(),
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.http_connections)
        .build()
        .map_err(|e| CliError::other(e.to_string()))?;

    let analyze = crate::bench::keep_statistics_fresh(&db);

    // The platform's own time per job: one at a time, submit to succeeded.
    let owner = users::User {
        id: user.id.clone(),
        email: user.email.clone(),
        role: Role::User,
    };
    let mut latencies = Vec::new();
    // Where the time went, from the timestamps the platform stores: submit to stored, stored
    // to claimed by a worker, claimed to finished (provider call, reply, settlement).
    let mut phases: [Vec<i64>; 3] = Default::default();
    for i in 0..200 {
        let conversation = &ids[args.jobs.div_ceil(PER_CONVERSATION) + i / PER_CONVERSATION];
        let started = Instant::now();
        let submitted_ms = tally_workflows::now_ms();
        let id = ask(&client, &base, &user.api_key, conversation).await?;
        let job = loop {
            let job = jobs::get(&db, &id, &owner)
                .await
                .map_err(|e| CliError::other(e.to_string()))?;
            if job.status() == Status::Succeeded {
                break job;
            }
            if job.status().is_terminal() || started.elapsed() > Duration::from_secs(30) {
                return Err(CliError::other(format!(
                    "bench chat job {id} ended {}",
                    job.status
                )));
            }
            // Tokio's timers tick in whole milliseconds: a thread sleep is finer, so the
            // moment the job succeeded is seen within a fraction of a millisecond.
            let _ = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_micros(200)))
                .await;
        };
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        let (claimed, finished) = (
            job.started_at.unwrap_or(job.created_at),
            job.finished_at.unwrap_or(job.updated_at),
        );
        phases[0].push(job.created_at - submitted_ms);
        phases[1].push(claimed - job.created_at);
        phases[2].push(finished - claimed);
    }
    latencies.sort_by(f64::total_cmp);
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let [stored, claimed, ran] = phases.map(|mut v| {
        v.sort_unstable();
        v[v.len() / 2]
    });
    args.out().text(format!(
        "  one job at a time, median ms: submit to stored {stored}, stored to claimed {claimed}, claimed to finished {ran}"
    ));

    // Throughput: N questions from C connections, until every job has succeeded.
    let before = jobs::count_by_status(&db, Status::Succeeded).await? as usize;
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.http_connections {
        let (client, base, key, ids, next) = (
            client.clone(),
            base.clone(),
            user.api_key.clone(),
            ids.clone(),
            next.clone(),
        );
        let n = args.jobs;
        tasks.push(tokio::spawn(async move {
            let mut last = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, CliError>(last);
                }
                last = Some(ask(&client, &base, &key, &ids[i / PER_CONVERSATION]).await?);
            }
        }));
    }
    // Each connection's last job; counting every job is left for the end, as it reads the
    // whole table and would take the database's time from the jobs being measured.
    let mut waiting = Vec::new();
    for t in tasks {
        waiting.extend(t.await.map_err(|e| CliError::other(e.to_string()))??);
    }
    loop {
        let mut still = Vec::new();
        for id in waiting {
            let job = jobs::get(&db, &id, &owner)
                .await
                .map_err(|e| CliError::other(e.to_string()))?;
            if job.status().is_terminal() && job.status() != Status::Succeeded {
                return Err(CliError::other(format!(
                    "bench chat job {id} ended {}",
                    job.status
                )));
            }
            if job.status() != Status::Succeeded {
                still.push(id);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            let done = jobs::count_by_status(&db, Status::Succeeded).await? as usize - before;
            if done >= args.jobs {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(CliError::other(format!(
                "stalled: {} chat jobs not done after 600 s",
                args.jobs
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let per_s = args.jobs as f64 / started.elapsed().as_secs_f64();
    if let Some(task) = analyze {
        task.abort();
    }
    stop.cancel();
    let _ = server.await;
    crate::bench::stop_workers(children).await;
    db.close().await;
    Ok(ChatFigures {
        backend: String::new(),
        scenario: "chat",
        jobs: args.jobs,
        workers,
        connections: args.http_connections,
        chat_per_s: per_s.round(),
        overhead_p50_ms: (p50 * 100.0).round() / 100.0,
        overhead_p99_ms: (p99 * 100.0).round() / 100.0,
        submit_to_stored_ms: stored,
        stored_to_claimed_ms: claimed,
        claimed_to_finished_ms: ran,
        echo_drain_per_s: 0.0,
        chat_vs_echo: 0.0,
        round: None,
    })
}

async fn ask(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    conversation: &str,
) -> Result<String, CliError> {
    let resp = client
        .post(format!(
            "{base}/v1/chat/conversations/{conversation}/messages"
        ))
        .bearer_auth(key)
        .json(&json!({ "content": "Say ok.", "max_tokens": 5 }))
        .send()
        .await
        .map_err(|e| CliError::other(format!("submit failed: {e}")))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| CliError::other(format!("submit answered {status}: {e}")))?;
    body["job_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::other(format!("submit answered {status}: {body}")))
}
