//! A Postgres restart under load: the test's own Postgres server (never the shared one) is
//! stopped for a few seconds while three `tally work` processes run priced jobs and
//! `tally serve` takes submissions, then started again.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::events::read_events;
use crate::helpers::{
    Options, TestApp, assert_problem, json_of, scratch_dir, signal, spawn_serve, spawn_worker,
};

/// A Postgres server of the test's own: a fresh cluster in a temporary folder, on a free
/// loopback port, run as the `postgres` OS user. Dropping it stops the server and deletes
/// the folder.
struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl PgCluster {
    /// `None` (outside CI) when no Postgres server binaries can run here.
    fn start() -> Option<PgCluster> {
        match Self::try_start() {
            Ok(c) => Some(c),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("CI=true and a private Postgres cluster cannot start: {e}")
            }
            Err(e) => {
                eprintln!("skipping: a private Postgres cluster cannot start ({e})");
                None
            }
        }
    }

    fn try_start() -> Result<PgCluster, String> {
        let bin = newest_postgres_bin().ok_or("no /usr/lib/postgresql/<version>/bin/initdb")?;
        let dir = scratch_dir();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        run(Command::new("chown").arg("postgres:postgres").arg(&dir))?;
        let cluster = PgCluster { bin, dir, port };
        cluster.as_postgres(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             max_connections = 300\nfsync = off\nsynchronous_commit = off\n",
            cluster.dir.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(Path::new(&cluster.data()).join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        cluster.start_server()?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args))
    }

    fn start_server(&self) -> Result<(), String> {
        let log = self.dir.join("server.log").display().to_string();
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-w", "-t", "30", "start"],
        )
    }

    /// Stops the server at once: `fast` ends every session (clients see their connections
    /// dropped) and refuses new ones.
    fn stop_server(&self, mode: &str) -> Result<(), String> {
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", mode, "-w", "-t", "30", "stop"],
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_server("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn newest_postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `GET /readyz` on `base`: its status and how long it took to answer.
async fn readyz(client: &reqwest::Client, base: &str) -> (StatusCode, Duration, Value) {
    let asked = Instant::now();
    let resp = client
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("readyz answers");
    let status = resp.status();
    let body = resp.json().await.unwrap_or_default();
    (status, asked.elapsed(), body)
}

/// Polls `/readyz` on `base` until it answers `want`; returns how long that took.
async fn wait_ready(client: &reqwest::Client, base: &str, want: StatusCode) -> Duration {
    let started = Instant::now();
    loop {
        let (status, took, body) = readyz(client, base).await;
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "/readyz did not answer {want} in time: {status} {body}"
        );
        assert!(took < Duration::from_secs(3), "/readyz took {took:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/readyz` answers 503 while the database is down, within a couple of seconds, and 200
/// again once it is back; a submission meanwhile is refused with 503 problem+json, and one
/// after succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let app = TestApp::spawn_at(cluster.url(), Options::default()).await;
    let (status, _, _) = readyz(&app.client, &app.base).await;
    assert_eq!(status, StatusCode::OK);
    cluster.stop_server("fast").expect("stop");
    let (status, took, body) = readyz(&app.client, &app.base).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(took < Duration::from_millis(2500), "/readyz took {took:?}");
    let asked = Instant::now();
    let resp = app
        .post(
            &app.user_key,
            "/v1/jobs",
            json!({"kind": "echo", "input": {}}),
        )
        .await;
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let problem = assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        problem["type"], "https://tally.dev/problems/database-unavailable",
        "{problem}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    cluster.start_server().expect("start");
    let back = wait_ready(&app.client, &app.base, StatusCode::OK).await;
    assert!(
        back < Duration::from_secs(5),
        "ready {back:?} after the start"
    );
    let id = app.submit(json!({"kind": "echo", "input": {}})).await;
    let job = app
        .wait_for(&id, &["succeeded"], Duration::from_secs(10))
        .await;
    assert_eq!(job["status"], "succeeded");
    app.stop().await;
}

/// The test: three worker processes and `tally serve` ride out a Postgres restart
/// under load. Every job succeeds, once, and is charged once; every process is still running;
/// `/readyz` answered 503 during the outage and 200 after; new jobs run within 5 s of the
/// server's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load() {
    /// How long the server stays down.
    const OUTAGE: Duration = Duration::from_secs(5);
    const PRICE: i64 = 5;
    const GRANT: i64 = 100_000;
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let opts = Options {
        workers: false,
        overrides: vec![("pricing.sleep", json!(PRICE))],
        ..Default::default()
    };
    let app = TestApp::spawn_at(cluster.url(), opts).await;
    app.grant(&app.user_id, GRANT).await;
    // Its event streams' fallback poll is a minute: an event within seconds after the restart
    // came through its listener, which had to reconnect.
    let (mut serve, serve_url) = spawn_serve(
        &app.url,
        &[
            ("TALLY_PRICING__SLEEP", "5"),
            ("TALLY_API__EVENTS_POLL_MS", "60000"),
        ],
    )
    .await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(
            spawn_worker(
                &app.url,
                &[
                    ("TALLY_PRICING__SLEEP", "5"),
                    ("TALLY_WORKER__CONCURRENCY", "4"),
                ],
            )
            .await,
        );
    }
    // The load: a stream of priced jobs submitted to `tally serve` until told to stop. Each
    // answer is 202 or, while the database is down, 503 problem+json within a few seconds.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn({
        let (client, base, key, stop) = (
            app.client.clone(),
            serve_url.clone(),
            app.user_key.clone(),
            stop.clone(),
        );
        async move {
            let (mut accepted, mut refused) = (Vec::new(), 0usize);
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let asked = Instant::now();
                let resp = client
                    .post(format!("{base}/v1/jobs"))
                    .bearer_auth(&key)
                    .json(&json!({"kind": "sleep", "input": {"ms": 100 + i % 200}}))
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await
                    .expect("tally serve answers");
                let took = asked.elapsed();
                match resp.status() {
                    StatusCode::ACCEPTED => {
                        let job: Value = resp.json().await.expect("json");
                        accepted.push(job["id"].as_str().expect("id").to_owned());
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        let p = assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE).await;
                        assert_eq!(p["type"], "https://tally.dev/problems/database-unavailable");
                        assert!(took < Duration::from_secs(5), "refused after {took:?}");
                        refused += 1;
                    }
                    other => panic!(
                        "a submission got {other}: {}",
                        resp.text().await.unwrap_or_default()
                    ),
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            (accepted, refused)
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let running: i64 = tally_workflows::with_pool!(&app.db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM tally_jobs WHERE status = 'running'")
            .fetch_one(pool).await.expect("count")
    });
    assert!(running > 0, "jobs are running when the server stops");

    cluster.stop_server("fast").expect("stop the server");
    let stopped = Instant::now();
    // While it is down, `tally serve`'s /readyz answers 503 within a couple of seconds.
    let mut probes = 0;
    while stopped.elapsed() < OUTAGE {
        let (status, took, body) = readyz(&app.client, &serve_url).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(took < Duration::from_millis(2500), "/readyz took {took:?}");
        probes += 1;
    }
    assert!(probes >= 2);

    cluster.start_server().expect("start the server again");
    let started = Instant::now();
    let ready_after = wait_ready(&app.client, &serve_url, StatusCode::OK).await;
    // A new job, submitted as soon as the API takes it, runs within 5 s of the start.
    let probe = loop {
        let resp = app
            .post(
                &app.user_key,
                "/v1/jobs",
                json!({"kind": "echo", "input": {}}),
            )
            .await;
        if resp.status() == StatusCode::ACCEPTED {
            let job: Value = resp.json().await.expect("json");
            break job["id"].as_str().expect("id").to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "submissions refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    app.wait_for(&probe, &["succeeded"], Duration::from_secs(5))
        .await;
    let new_job_after = started.elapsed();
    eprintln!(
        "postgres restart: /readyz 200 {ready_after:?} and a new job succeeded {new_job_after:?} after the server started"
    );
    assert!(new_job_after < Duration::from_secs(5), "{new_job_after:?}");

    // `tally serve` hears of a job a worker process ran after the restart: its listener is
    // back (the stream's own poll would take a minute).
    let resp = app
        .client
        .post(format!("{serve_url}/v1/jobs"))
        .bearer_auth(&app.user_key)
        .json(&json!({"kind": "sleep", "input": {"ms": 500}}))
        .send()
        .await
        .expect("tally serve answers");
    let job: Value = json_of(resp, StatusCode::ACCEPTED).await;
    let id = job["id"].as_str().expect("id");
    let followed = Instant::now();
    let resp = app
        .client
        .get(format!("{serve_url}/v1/jobs/{id}/events"))
        .bearer_auth(&app.user_key)
        .send()
        .await
        .expect("the event stream opens");
    let (events, ended) = read_events(resp, Duration::from_secs(15), |_| false).await;
    assert!(ended, "the stream ends after the job's end: {events:?}");
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(json!("succeeded"))
    );
    eprintln!(
        "postgres restart: a worker's job end reached tally serve's stream {:?} after it opened",
        followed.elapsed()
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (accepted, refused) = load.await.expect("load");
    assert!(refused > 0, "some submissions met the outage");
    assert!(accepted.len() > 20, "{} accepted", accepted.len());
    for id in &accepted {
        let job = app
            .wait_for(
                id,
                &["succeeded", "dead", "cancelled"],
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // Every job stored (a submission whose answer was lost to the outage may still have
    // committed) succeeded and was charged exactly once.
    let jobs: Vec<(String, String, String)> = tally_workflows::with_pool!(&app.db, pool => {
        sqlx::query_as("SELECT id, kind, status FROM tally_jobs")
            .fetch_all(pool).await.expect("jobs")
    });
    let priced: Vec<&(String, String, String)> =
        jobs.iter().filter(|(_, kind, _)| kind == "sleep").collect();
    assert!(priced.len() >= accepted.len());
    for (id, _, status) in &priced {
        let job = if status == "succeeded" {
            app.job(id).await
        } else {
            app.wait_for(
                id,
                &["succeeded", "dead", "cancelled"],
                Duration::from_secs(30),
            )
            .await
        };
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["cost"]["settled"], PRICE, "{job}");
        let settles = job["cost"]["transfers"]
            .as_array()
            .expect("transfers")
            .iter()
            .filter(|t| t["kind"] == "settle")
            .count();
        assert_eq!(settles, 1, "charged exactly once: {job}");
    }
    assert_eq!(
        app.balance(&app.user_key).await,
        (GRANT - PRICE * priced.len() as i64, 0),
        "{} priced jobs",
        priced.len()
    );
    assert_eq!(app.queue_size().await, 0, "no queue task left behind");

    // Every process rode it out.
    for (child, name) in &mut workers {
        assert!(
            child.try_wait().expect("status").is_none(),
            "worker {name} is still running"
        );
    }
    assert!(
        serve.try_wait().expect("status").is_none(),
        "tally serve is still running"
    );
    app.wait_signed().await;
    let v: Value = app
        .get(&app.admin_key, "/v1/admin/ledger/verify")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["ok"], true, "{v}");
    for (mut child, _) in workers {
        signal(&child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "SIGTERM exits 0: {status:?}");
    }
    signal(&serve, "TERM");
    assert!(serve.wait().await.expect("status").success());
    app.stop().await;
    drop(cluster);
}
