//! The binary's own commands: migrate, serve, users, config, dev.

use std::{process::Stdio, time::Duration};

use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use crate::helpers::{Backend, fresh_database, scratch_dir, signal, tally};

async fn output(cmd: &mut tokio::process::Command) -> (i32, String, String) {
    let out = cmd.output().await.expect("run tally");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Reads lines from a child's stdout until one starts with `prefix`.
async fn line_starting(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
) -> String {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read")
                .expect("process printed it");
            if line.starts_with(prefix) {
                return line;
            }
        }
    })
    .await
    .expect("in time")
}

fn address(line: &str) -> String {
    let start = line.find("http://").expect("a URL");
    line[start..].split_whitespace().next().unwrap().to_owned()
}

async fn migrate_users_and_serve(backend: Backend) {
    let Some(url) = fresh_database(backend).await else {
        return;
    };
    // Before migrating, serve and users refuse with a hint.
    let (code, _, err) = output(
        tally()
            .args(["users", "create", "--email", "a@example.com"])
            .env("DATABASE_URL", &url),
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tally migrate"), "{err}");
    let (code, out, err) = output(tally().arg("migrate").env("DATABASE_URL", &url)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("migrations applied"));
    // Migrating twice is harmless.
    assert_eq!(
        output(tally().arg("migrate").env("DATABASE_URL", &url))
            .await
            .0,
        0
    );
    let (code, out, err) = output(
        tally()
            .args([
                "users",
                "create",
                "--email",
                "ops@example.com",
                "--role",
                "admin",
            ])
            .env("DATABASE_URL", &url),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(out.trim()).expect("JSON");
    let key = created["api_key"].as_str().unwrap().to_owned();
    let (code, _, err) = output(
        tally()
            .args(["users", "create", "--email", "ops@example.com"])
            .env("DATABASE_URL", &url),
    )
    .await;
    assert_eq!(code, 2, "duplicate email is a usage error: {err}");
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = output(
        tally()
            .args([
                "users",
                "create",
                "--email",
                "x@example.com",
                "--role",
                "god",
            ])
            .env("DATABASE_URL", &url),
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("--role"), "{err}");
    // serve answers with the key the CLI made.
    let mut serve = tally()
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("DATABASE_URL", &url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(serve.stdout.take().unwrap()).lines();
    let base = address(&line_starting(&mut lines, "Tally API is listening").await);
    let client = reqwest::Client::new();
    let ready: Value = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    let resp = client
        .get(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    signal(&serve, "TERM");
    assert!(serve.wait().await.unwrap().success(), "SIGTERM exits 0");
}

async fn dev_runs_everything_with_an_admin_key(backend: Backend) {
    let dir = scratch_dir();
    let mut cmd = tally();
    cmd.args(["dev", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env("TALLY_ADMIN_KEY", "tly_from_the_environment")
        .stdout(Stdio::piped());
    if backend == Backend::Postgres {
        let Some(url) = fresh_database(backend).await else {
            return;
        };
        cmd.env("DATABASE_URL", url);
    }
    let mut dev = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(dev.stdout.take().unwrap()).lines();
    let base = address(&line_starting(&mut lines, "Tally dev is listening").await);
    let client = reqwest::Client::new();
    let job: Value = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth("tly_from_the_environment")
        .json(&serde_json::json!({"kind": "echo", "input": "hi"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().expect("submitted").to_owned();
    let mut done = Value::Null;
    for _ in 0..200 {
        done = client
            .get(format!("{base}/v1/jobs/{id}"))
            .bearer_auth("tly_from_the_environment")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        done["result"], "hi",
        "dev ran the job with its own workers: {done}"
    );
    // A client following a job that is far from done does not hold up shutdown. (The job
    // waits for its start time: a running one would hold shutdown for the grace period, which
    // is what that period is for.)
    let long: Value = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth("tly_from_the_environment")
        .json(&serde_json::json!({"kind": "sleep", "input": {"ms": 600000}, "run_at": "2099-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = client
        .get(format!(
            "{base}/v1/jobs/{}/events",
            long["id"].as_str().unwrap()
        ))
        .bearer_auth("tly_from_the_environment")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let asked = std::time::Instant::now();
    signal(&dev, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), dev.wait())
        .await
        .expect("dev exits with an event stream open")
        .unwrap();
    assert!(status.success());
    assert!(
        asked.elapsed() < Duration::from_secs(12),
        "took {:?}",
        asked.elapsed()
    );
    drop(events);
    if backend == Backend::Sqlite {
        assert!(
            dir.join("tally.db").exists(),
            "dev keeps its database in --data-dir"
        );
    }
}

crate::both_backends!(
    migrate_users_and_serve,
    dev_runs_everything_with_an_admin_key
);

#[tokio::test]
async fn dev_prints_a_new_admin_key_once() {
    let dir = scratch_dir();
    let mut dev = tally()
        .args(["dev", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(dev.stdout.take().unwrap()).lines();
    let created = line_starting(&mut lines, "created admin user").await;
    let key = created.rsplit(' ').next().unwrap().to_owned();
    let base = address(&line_starting(&mut lines, "Tally dev is listening").await);
    let resp = reqwest::Client::new()
        .get(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // dev made a checkpoint signing key in its data folder, readable by its owner only, and
    // signs the log with it.
    let key_file = dir.join("ledger.key");
    let text = std::fs::read_to_string(&key_file).expect("dev keeps a ledger key");
    assert!(text.starts_with("PRIVATE+KEY+tally-dev+"), "{text}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mut checkpoint = Value::Null;
    for _ in 0..100 {
        let resp = reqwest::Client::new()
            .get(format!("{base}/v1/ledger/checkpoint"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            checkpoint = resp.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        checkpoint["size"], 0,
        "the empty log is signed: {checkpoint}"
    );
    signal(&dev, "TERM");
    assert!(dev.wait().await.unwrap().success());
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        text,
        "the key is kept across restarts"
    );
    // A second start on the same data dir finds the admin and prints no new key.
    let (code, out, _) = output(
        tally()
            .args(["users", "create", "--email", "z@example.com"])
            .arg("--data-dir")
            .arg(&dir),
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("api_key"));
}

#[tokio::test]
async fn config_layers_and_redacts() {
    let dir = scratch_dir();
    let file = dir.join("tally.toml");
    std::fs::write(
        &file,
        "max_connections = 7\n[worker]\nconcurrency = 3\npoll_ms = 500\n",
    )
    .unwrap();
    let (code, out, err) = output(
        tally()
            .args(["config", "--config"])
            .arg(&file)
            .env("TALLY_WORKER__POLL_MS", "250")
            .env("DATABASE_URL", "postgres://tally:hunter2@db.internal/tally")
            .env("TALLY_ADMIN_KEY", "tly_supersecret"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("concurrency = 3"), "file value: {out}");
    assert!(
        out.contains("poll_ms = 250"),
        "environment beats the file: {out}"
    );
    assert!(out.contains("max_connections = 7"));
    assert!(
        !out.contains("hunter2") && !out.contains("tly_supersecret"),
        "secrets are redacted: {out}"
    );
    assert!(out.contains("<redacted>"));
    // Flags beat the environment.
    let (code, out, _) = output(
        tally()
            .args(["config", "--data-dir", "/from/flag"])
            .env("TALLY_DATA_DIR", "/from/env"),
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("data_dir = \"/from/flag\""), "{out}");
    let (code, _, err) = output(tally().args(["work", "--queues", "bogus"])).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("worker.queues") && err.contains("bogus"),
        "{err}"
    );
    // An invalid value stops the process with a message that names it.
    let (code, _, err) = output(tally().arg("config").env("TALLY_WORKER__CONCURRENCY", "0")).await;
    assert_eq!(code, 2);
    assert!(err.contains("worker.concurrency"), "{err}");
    let (code, _, err) = output(tally().arg("config").env("TALLY_API__EVENTS_POLL_MS", "0")).await;
    assert_eq!(code, 2);
    assert!(err.contains("api.events_poll_ms"), "{err}");
    let (code, _, err) = output(
        tally()
            .arg("config")
            .env("TALLY_WORKER__LEASE_SECS", "soon"),
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("lease_secs"), "{err}");
    let (code, _, err) =
        output(tally().args(["config", "--config", "/nonexistent/tally.toml"])).await;
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/tally.toml"), "{err}");
    let (code, _, err) = output(tally().arg("config").env("DATABASE_URL", "mysql://x")).await;
    assert_eq!(code, 2);
    assert!(err.contains("database_url"), "{err}");
}

#[tokio::test]
async fn keys_and_ledger_commands_explain_bad_input() {
    let dir = scratch_dir();
    let file = dir.join("signing.key");
    let (code, out, err) = output(
        tally()
            .args(["keys", "generate", "--name", "ops", "--out"])
            .arg(&file),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.is_empty(),
        "the private key goes to the file only: {out}"
    );
    let verifier = err
        .lines()
        .find_map(|l| l.strip_prefix("verifier key: "))
        .expect("prints the verifier key")
        .to_owned();
    assert!(verifier.starts_with("ops+"), "{verifier}");
    let private = std::fs::read_to_string(&file).unwrap();
    let signer = tally_ledger::SignerKey::parse(&private).expect("a valid signing key");
    assert_eq!(signer.verifier().encode(), verifier);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Never overwrites a key.
    let (code, _, err) = output(tally().args(["keys", "generate", "--out"]).arg(&file)).await;
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), private);
    let (code, out, _) = output(tally().args(["keys", "generate"])).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("PRIVATE+KEY+tally+"), "{out}");

    let db = format!("sqlite://{}", dir.join("t.db").display());
    let (code, _, err) = output(tally().arg("migrate").env("DATABASE_URL", &db)).await;
    assert_eq!(code, 0, "{err}");
    // No trusted keys: nothing to verify against.
    let (code, _, err) = output(tally().args(["ledger", "verify"]).env("DATABASE_URL", &db)).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no trusted ledger keys"), "{err}");
    // An empty ledger with a key verifies.
    let (code, out, err) = output(
        tally()
            .args(["ledger", "verify"])
            .env("DATABASE_URL", &db)
            .env("TALLY_LEDGER__SIGNING_KEY_FILE", &file),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ledger verified: 0 entries"), "{out}");
    // A malformed key in the configuration is named.
    let (code, _, err) = output(
        tally()
            .args(["ledger", "verify"])
            .env("DATABASE_URL", &db)
            .env("TALLY_LEDGER__SIGNING_KEY", "PRIVATE+KEY+nonsense"),
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ledger.signing_key"), "{err}");
    let (code, _, err) = output(
        tally()
            .args(["ledger", "verify", "--key", "not-a-key", "--export"])
            .arg(&dir),
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--key"), "{err}");
    // An export folder that is not one.
    let (code, _, err) = output(
        tally()
            .args(["ledger", "verify", "--export"])
            .arg(dir.join("missing")),
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing"), "{err}");
}

#[tokio::test]
async fn ai_platform_variables_configure_one_provider() {
    let (code, out, err) = output(
        tally()
            .arg("config")
            .env("AI_PLATFORM_BASE_URL", "https://ai.example.com/v1")
            .env("AI_PLATFORM_API_KEY", "sk-very-secret"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("base_url = \"https://ai.example.com/v1\""),
        "{out}"
    );
    assert!(out.contains("name = \"platform\""), "{out}");
    assert!(
        !out.contains("sk-very-secret"),
        "the key is redacted: {out}"
    );
    // An invalid AI setting stops the process and names it.
    let (code, _, err) = output(
        tally()
            .arg("config")
            .env("AI_PLATFORM_BASE_URL", "ftp://ai.example.com"),
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ai:") && err.contains("base_url"), "{err}");
}

#[tokio::test]
async fn the_platform_provider_lists_the_catalog() {
    use axum::{Json, Router, routing::get};
    let router = Router::new().route(
        "/v1/models",
        get(|| async {
            Json(serde_json::json!({ "object": "list", "data": [
                { "id": "llama3", "object": "model" },
                { "id": "flux-schnell", "object": "model" }
            ] }))
        }),
    );
    let provider = format!("{}/v1", crate::helpers::serve_router(router).await);
    let dir = scratch_dir();
    let db = format!("sqlite://{}", dir.join("t.db").display());
    assert_eq!(
        output(tally().arg("migrate").env("DATABASE_URL", &db))
            .await
            .0,
        0
    );
    let mut serve = tally()
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("DATABASE_URL", &db)
        .env("TALLY_ADMIN_KEY", "tly_catalog")
        .env("AI_PLATFORM_BASE_URL", &provider)
        .env("AI_PLATFORM_API_KEY", "sk-test")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(serve.stdout.take().unwrap()).lines();
    let base = address(&line_starting(&mut lines, "Tally API is listening").await);
    let list: Value = reqwest::Client::new()
        .get(format!("{base}/v1/models"))
        .bearer_auth("tly_catalog")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let models = list["models"].as_array().expect("models");
    assert_eq!(models.len(), 2, "{list}");
    assert_eq!(models[0]["id"], "llama3");
    assert_eq!(models[0]["kind"], "chat");
    assert_eq!(models[0]["provider"], "platform");
    assert_eq!(models[0]["prices"]["input_per_1k_tokens"], 1);
    assert_eq!(models[1]["id"], "flux-schnell");
    assert_eq!(models[1]["kind"], "image");
    assert_eq!(models[1]["prices"]["per_image"], 5);
    signal(&serve, "TERM");
    assert!(serve.wait().await.unwrap().success());
}

/// Runs `tally bench --json` with `args` on `backend` and parses every stdout line as a JSON
/// object; the human table goes to stderr.
async fn bench_json(backend: Backend, admin_url: &str, args: &[&str]) -> Vec<Value> {
    let name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let (code, out, err) = output(tally().arg("bench").args(args).args([
        "--backends",
        name,
        "--postgres-url",
        admin_url,
        "--json",
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("tally bench"),
        "the table goes to stderr: {err}"
    );
    let lines: Vec<Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    for line in &lines {
        assert!(line.is_object(), "{line}");
        assert_eq!(line["backend"], name, "{line}");
    }
    lines
}

async fn bench_prints_one_json_line_per_scenario(backend: Backend) {
    // The benchmark creates its own databases next to this one (on Postgres, connected
    // through it); on SQLite it is only a reachability check.
    let Some(url) = fresh_database(backend).await else {
        return;
    };
    let admin = match backend {
        Backend::Sqlite => crate::helpers::pg_admin_url(),
        Backend::Postgres => url,
    };

    // Jobs: one `echo` line per worker count, and HTTP submission once.
    let lines = bench_json(
        backend,
        &admin,
        &[
            "--jobs",
            "200",
            "--workers",
            "1,2",
            "--concurrency",
            "64",
            "--batch",
            "64",
            "--http-seconds",
            "1",
            "--http-connections",
            "4",
        ],
    )
    .await;
    let echo: Vec<&Value> = lines.iter().filter(|l| l["scenario"] == "echo").collect();
    assert_eq!(echo.len(), 2, "{lines:?}");
    for (line, workers) in echo.iter().zip([1, 2]) {
        assert_eq!(line["workers"], workers, "{line}");
        assert_eq!(line["jobs"], 200, "{line}");
        assert!(line["enqueue_per_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["drain_per_s"].as_f64().unwrap() > 0.0, "{line}");
    }
    let http: Vec<&Value> = lines
        .iter()
        .filter(|l| l["scenario"] == "http submit")
        .collect();
    assert_eq!(http.len(), 1, "{lines:?}");
    assert!(
        http[0]["submit_per_s"].as_f64().unwrap() > 0.0,
        "{}",
        http[0]
    );
    assert_eq!(http[0]["errors"], 0, "{}", http[0]);
    assert_eq!(lines.len(), 3, "{lines:?}");

    // The ledger: three transfer scenarios and the audit.
    let lines = bench_json(
        backend,
        &admin,
        &["--ledger", "--transfers", "200", "--writers", "8"],
    )
    .await;
    let scenarios: Vec<&str> = lines
        .iter()
        .map(|l| l["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        scenarios,
        [
            "accounts, batched",
            "hot account, batched",
            "accounts, 1 tx each",
            "verify"
        ]
    );
    for line in &lines[..3] {
        assert_eq!(line["transfers"], 200, "{line}");
        assert!(line["signed_per_s"].as_f64().unwrap() > 0.0, "{line}");
    }
    assert!(lines[3]["entries"].as_u64().unwrap() >= 600, "{}", lines[3]);

    // Chat jobs end to end, in two rounds and their medians.
    let lines = bench_json(
        backend,
        &admin,
        &[
            "--ai",
            "--jobs",
            "100",
            "--workers",
            "1",
            "--http-connections",
            "8",
            "--rounds",
            "2",
        ],
    )
    .await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    let figure = |line: &serde_json::Value, name: &str| {
        line[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["scenario"], "chat", "{line}");
        assert_eq!(line["jobs"], 100, "{line}");
        let round = (i < 2).then_some(i + 1);
        assert_eq!(line["round"], serde_json::json!(round), "{line}");
        assert!(figure(line, "chat_per_s") > 0.0, "{line}");
        assert!(figure(line, "overhead_p50_ms") > 0.0, "{line}");
        assert!(figure(line, "echo_drain_per_s") > 0.0, "{line}");
    }
    for line in &lines[..2] {
        let ratio = figure(line, "chat_vs_echo");
        let (chat, echo) = (figure(line, "chat_per_s"), figure(line, "echo_drain_per_s"));
        assert!((ratio - chat / echo).abs() < 0.01, "{line}");
    }
    // The medians' row: of two rounds, the mean of the two.
    // (Rounded: jobs/s to whole numbers, the ratio to three decimals.)
    for (name, rounding) in [
        ("chat_per_s", 1.0),
        ("echo_drain_per_s", 1.0),
        ("chat_vs_echo", 0.002),
    ] {
        let (a, b, m) = (
            figure(&lines[0], name),
            figure(&lines[1], name),
            figure(&lines[2], name),
        );
        assert!(
            (m - (a + b) / 2.0).abs() <= rounding,
            "{name}: median {m} of {a} and {b}"
        );
    }
}

crate::both_backends!(bench_prints_one_json_line_per_scenario);

#[tokio::test]
async fn bench_refuses_zero_rounds() {
    let (code, out, err) = output(tally().args([
        "bench",
        "--ai",
        "--rounds",
        "0",
        "--backends",
        "sqlite",
        "--json",
    ]))
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--rounds"), "{err}");
    assert!(out.is_empty(), "nothing on stdout: {out}");
}

#[tokio::test]
async fn bench_refuses_bad_worker_counts() {
    for workers in ["0", "1,0", "1,x", ""] {
        let (code, out, err) = output(tally().args([
            "bench",
            "--workers",
            workers,
            "--backends",
            "sqlite",
            "--json",
        ]))
        .await;
        assert_eq!(code, 2, "--workers {workers:?}: {err}");
        assert!(err.contains("--workers"), "--workers {workers:?}: {err}");
        assert!(out.is_empty(), "nothing on stdout: {out}");
    }
}
