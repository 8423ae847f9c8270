//! `TestApp`: a fresh database, the API on port 0 and (optionally) in-process worker pools,
//! with typed request helpers. Logs show only when `TEST_LOG` is set.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    sync::Once,
    time::{Duration, Instant},
};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use tally_api::AppState;
use tally_workers::WorkerPool;
use tally_workflows::{
    Db,
    config::{Config, Secret},
    ledger::log::Keys,
    users::{self, Role},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates `sqlite` and `postgres` tests from `async fn name(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    )*};
}

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,tally_workers=debug")
                .with_test_writer()
                .try_init();
        }
    });
}

/// The server tests create their Postgres databases on.
pub fn pg_admin_url() -> String {
    std::env::var("TALLY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-test-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A URL to a database nobody else uses, or `None` when Postgres is unreachable outside CI.
pub async fn fresh_database(backend: Backend) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!(
            "sqlite://{}",
            scratch_dir().join("tally.db").display()
        )),
        Backend::Postgres => {
            let admin = pg_admin_url();
            let conn = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&admin)
                .await;
            let pool = match conn {
                Ok(p) => p,
                Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                    panic!("CI=true and Postgres at {admin} is unreachable: {e}")
                }
                Err(e) => {
                    eprintln!(
                        "skipping: Postgres at {admin} is unreachable ({e}); set CI=true to fail instead"
                    );
                    return None;
                }
            };
            let name = format!("tally_t_{}", uuid::Uuid::now_v7().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await
                .expect("create test database");
            pool.close().await;
            let (base, _) = admin
                .rsplit_once('/')
                .expect("postgres URL has a database name");
            Some(format!("{base}/{name}"))
        }
    }
}

/// A cron expression with no tick during any test: the platform's reservation expiry
/// schedule in tests, so its jobs never mix with a test's own (a test about expiry sets
/// `ledger.expiry_schedule` itself).
pub const NEVER: &str = "0 0 0 1 1 * 2099";

/// Configuration for tests: fast polling, a short lease and short retry delays.
pub fn test_config(url: &str, overrides: &[(&str, Value)]) -> Config {
    let mut o: BTreeMap<String, toml::Value> = BTreeMap::new();
    o.insert("database_url".into(), toml::Value::String(url.to_owned()));
    o.insert("worker.poll_ms".into(), toml::Value::Integer(25));
    o.insert(
        "data_dir".into(),
        toml::Value::String(scratch_dir().display().to_string()),
    );
    o.insert("worker.lease_secs".into(), toml::Value::Integer(3));
    o.insert(
        "worker.shutdown_timeout_secs".into(),
        toml::Value::Integer(5),
    );
    o.insert("jobs.retry_base_ms".into(), toml::Value::Integer(100));
    o.insert("max_connections".into(), toml::Value::Integer(8));
    o.insert(
        "ledger.expiry_schedule".into(),
        toml::Value::String(NEVER.into()),
    );
    for (k, v) in overrides {
        let v: toml::Value =
            serde_json::from_value(v.clone()).expect("override is TOML-compatible");
        o.insert((*k).to_owned(), v);
    }
    Config::load(None, o).expect("test config is valid")
}

pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub db: Db,
    pub url: String,
    pub admin_key: String,
    pub user_key: String,
    pub user_id: String,
    /// The checkpoint signing key this app's processes use (`PRIVATE+KEY+...`).
    pub signing_key: String,
    pub keys: Keys,
    pub cfg: Config,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

pub struct Options {
    /// Run worker pools inside the test process.
    pub workers: bool,
    pub overrides: Vec<(&'static str, Value)>,
    /// Run the ledger's background work (integration, signing, expiry) in this process.
    pub maintenance: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: true,
            overrides: vec![],
            maintenance: true,
        }
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Option<TestApp> {
        Self::spawn_with(backend, Options::default()).await
    }

    /// The API alone: no worker pools in this process (tests start their own, or none).
    pub async fn spawn_api_only(backend: Backend) -> Option<TestApp> {
        Self::spawn_with(
            backend,
            Options {
                workers: false,
                ..Default::default()
            },
        )
        .await
    }

    pub async fn spawn_with(backend: Backend, opts: Options) -> Option<TestApp> {
        init_logs();
        let url = fresh_database(backend).await?;
        Some(Self::spawn_at(url, opts).await)
    }

    /// The app on the empty database at `url` (a server of the test's own).
    pub async fn spawn_at(url: String, opts: Options) -> TestApp {
        init_logs();
        let mut cfg = test_config(&url, &opts.overrides);
        let signer = tally_ledger::SignerKey::generate("tally-test").expect("key");
        let signing_key = signer.encode();
        cfg.ledger.signing_key = Some(Secret::new(signing_key.clone()));
        let keys = Keys::load(&cfg.ledger, None).expect("ledger keys");
        let db = Db::connect(&url, cfg.max_connections)
            .await
            .expect("connect");
        db.migrate().await.expect("migrate");
        let admin = users::create(&db, "admin@example.com", Role::Admin, None)
            .await
            .expect("admin");
        let user = users::create(&db, "user@example.com", Role::User, None)
            .await
            .expect("user");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let state = AppState::new(db.clone(), cfg.clone(), keys.clone());
        let mut tasks = Vec::new();
        if opts.maintenance {
            let ledger = tally_workflows::ledger::log::spawn_maintenance(
                db.clone(),
                keys.signer.clone(),
                cfg.ledger.clone(),
                shutdown.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _ = ledger.await;
            }));
        }
        tasks.push(tokio::spawn({
            let s = shutdown.clone();
            async move {
                tally_api::serve(listener, state, s.cancelled_owned())
                    .await
                    .expect("serve");
            }
        }));
        if opts.workers {
            let pool = WorkerPool::new(db.clone(), cfg.clone());
            let s = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                pool.run(s.cancelled_owned()).await.expect("worker pool");
            }));
        }
        TestApp {
            base,
            client: Client::new(),
            db,
            url,
            admin_key: admin.api_key,
            user_key: user.api_key,
            user_id: user.id,
            signing_key,
            keys,
            cfg,
            shutdown,
            tasks,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.db.close().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, key: &str, path: &str, body: Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, key: &str, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request")
    }

    /// Submits as the ordinary user and returns the job id.
    pub async fn submit(&self, body: Value) -> String {
        let resp = self.post(&self.user_key, "/v1/jobs", body).await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let job: Value = resp.json().await.expect("json");
        job["id"].as_str().expect("id").to_owned()
    }

    pub async fn job(&self, id: &str) -> Value {
        let resp = self.get(&self.user_key, &format!("/v1/jobs/{id}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "GET job {id}");
        resp.json().await.expect("json")
    }

    /// Polls until the job's status is one of `statuses`; panics after `timeout`.
    pub async fn wait_for(&self, id: &str, statuses: &[&str], timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let job = self.job(id).await;
            if statuses.contains(&job["status"].as_str().unwrap_or_default()) {
                return job;
            }
            assert!(
                start.elapsed() < timeout,
                "job {id} did not reach {statuses:?} in {timeout:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Grants `amount` credits to the user behind `user_id` (as the admin).
    pub async fn grant(&self, user_id: &str, amount: i64) {
        let resp = self
            .post(
                &self.admin_key,
                "/v1/admin/credits/grant",
                json!({ "user_id": user_id, "amount": amount }),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED, "grant");
    }

    /// The admin's ledger audit passes: entries, checkpoints, balances, every reservation
    /// against its transfers and every job's shown cost.
    pub async fn assert_ledger_verifies(&self) {
        let resp = self.get(&self.admin_key, "/v1/admin/ledger/verify").await;
        assert_eq!(resp.status(), StatusCode::OK, "ledger verify");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["ok"], true, "ledger verify: {v}");
    }

    /// The user's `(available, held)` credits.
    pub async fn balance(&self, key: &str) -> (i64, i64) {
        let resp = self.get(key, "/v1/credits/balance").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let v: Value = resp.json().await.expect("json");
        (
            v["available"].as_i64().expect("available"),
            v["held"].as_i64().expect("held"),
        )
    }

    /// Waits until a signed checkpoint covers every committed transfer; returns its size.
    pub async fn wait_signed(&self) -> u64 {
        let start = Instant::now();
        loop {
            let total = tally_workflows::ledger::log::log_size(&self.db)
                .await
                .expect("log size");
            let pending: i64 = tally_workflows::with_pool!(&self.db, pool => {
                sqlx::query_scalar("SELECT COUNT(*) FROM ledger_transfers WHERE seq IS NULL")
                    .fetch_one(pool).await.expect("count")
            });
            let signed = tally_workflows::ledger::log::latest_checkpoint(&self.db)
                .await
                .expect("checkpoint")
                .map(|c| c.size);
            if pending == 0 && signed == Some(total) {
                return total;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the ledger was not signed in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether job `id` is in its queue (1) or not (0): a job's row is its queue entry while
    /// it is `queued`, or `failed` awaiting its retry.
    pub async fn tasks_of(&self, id: &str) -> i64 {
        self.count_waiting(
            "SELECT COUNT(*) FROM tally_jobs WHERE id = $1 AND status IN ('queued', 'failed')",
            Some(id),
        )
        .await
    }

    /// All the jobs waiting in a queue.
    pub async fn queue_size(&self) -> i64 {
        self.count_waiting(
            "SELECT COUNT(*) FROM tally_jobs WHERE status IN ('queued', 'failed')",
            None,
        )
        .await
    }

    async fn count_waiting(&self, sql: &'static str, id: Option<&str>) -> i64 {
        tally_workflows::with_pool!(&self.db, pool => {
            let mut q = sqlx::query_scalar(sql);
            if let Some(id) = id {
                q = q.bind(id);
            }
            q.fetch_one(pool).await.expect("count waiting jobs")
        })
    }

    /// Creates another ordinary user and returns their key.
    pub async fn new_user(&self, email: &str) -> String {
        let resp = self
            .post(&self.admin_key, "/v1/users", json!({ "email": email }))
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let v: Value = resp.json().await.expect("json");
        v["api_key"].as_str().expect("key").to_owned()
    }
}

/// Asserts the response's status and returns its JSON body.
pub async fn json_of(resp: Response, status: StatusCode) -> Value {
    let got = resp.status();
    let body = resp.text().await.expect("body");
    assert_eq!(got, status, "body: {body}");
    serde_json::from_str(&body).expect("JSON body")
}

/// Asserts a problem+json response with `status`, and returns its body.
pub async fn assert_problem(resp: Response, status: StatusCode) -> Value {
    let got = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.text().await.expect("body");
    assert_eq!(got, status, "body: {body}");
    assert_eq!(ct, "application/problem+json", "body: {body}");
    let v: Value = serde_json::from_str(&body).expect("problem body is JSON");
    assert_eq!(v["status"], status.as_u16());
    assert!(
        v["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "problem has a detail: {v}"
    );
    assert!(v["type"].as_str().is_some(), "problem has a type: {v}");
    v
}

/// Sends `sig` (`TERM`, `KILL`) to a child process.
pub fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("child is running");
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The `tally` binary.
pub fn tally() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("TALLY_CONFIG")
        .env_remove("TALLY_ADMIN_KEY")
        .env_remove("AI_PLATFORM_BASE_URL")
        .env_remove("AI_PLATFORM_API_KEY")
        .env_remove("WELCOME_BONUS_AMOUNT")
        .env(
            "TALLY_LOG",
            std::env::var("TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true);
    cmd
}

/// Starts `tally work` on `url` with test timings; stdout is piped so the caller can read the
/// worker's name from its first line.
pub async fn spawn_worker(
    url: &str,
    extra_env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tally();
    cmd.arg("work")
        .env("DATABASE_URL", url)
        .env("TALLY_WORKER__POLL_MS", "25")
        .env("TALLY_WORKER__LEASE_SECS", "3")
        .env("TALLY_JOBS__RETRY_BASE_MS", "100")
        .env("TALLY_LEDGER__EXPIRY_SCHEDULE", NEVER)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tally work");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("worker printed its name in time")
        .expect("read stdout")
        .expect("a line");
    let name = first
        .strip_prefix("Tally worker ")
        .and_then(|r| r.strip_suffix(" started"))
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_owned();
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, name)
}

/// Starts `tally serve` on `url` on a free loopback port; returns it and its base URL.
pub async fn spawn_serve(url: &str, extra_env: &[(&str, &str)]) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tally();
    cmd.args(["serve", "--addr", "127.0.0.1:0"])
        .env("DATABASE_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tally serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the API printed its address in time")
        .expect("read stdout")
        .expect("a line");
    let base = first
        .strip_prefix("Tally API is listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, base)
}

/// Serves `router` on a fresh loopback port (a stand-in for an outside service); returns its
/// base URL.
pub async fn serve_router(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    url
}
