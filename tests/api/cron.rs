//! Cron: `[[cron]]` schedules run by real `tally work` processes (one job per tick however many
//! run them; a missed tick runs once after a restart), the admin's view of the schedules, the
//! `cron` field of a cron job's view, and a bad schedule stopping the process at start.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_workflows::{cron::CronConfig, users::PLATFORM_USER_ID};

use crate::helpers::{
    Backend, NEVER, Options, TestApp, assert_problem, json_of, scratch_dir, signal, spawn_worker,
    tally,
};

/// A configuration file with these schedules (and the platform's expiry out of the way).
fn config_file(schedules: &[CronConfig]) -> PathBuf {
    #[derive(serde::Serialize)]
    struct File<'a> {
        cron: &'a [CronConfig],
    }
    let mut text = toml::to_string(&File { cron: schedules }).expect("toml");
    text = format!("[ledger]\nexpiry_schedule = {NEVER:?}\n\n{text}");
    let path = scratch_dir().join("tally.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn every_second(name: &str) -> CronConfig {
    CronConfig {
        name: name.into(),
        schedule: "* * * * * *".into(),
        timezone: "UTC".into(),
        kind: "echo".into(),
        input: json!({ "from": name }),
        queue: None,
    }
}

/// The stored ticks of schedule `name`, oldest first: `(tick ms, job id)`.
async fn ticks(app: &TestApp, name: &str) -> Vec<(i64, String)> {
    tally_workflows::with_pool!(&app.db, pool => {
        sqlx::query_as("SELECT tick_at, job_id FROM tally_cron_ticks WHERE name = $1 ORDER BY tick_at")
            .bind(name)
            .fetch_all(pool)
            .await
            .expect("ticks")
    })
}

/// The platform's jobs of kind `kind`: `(id, input)`.
async fn platform_jobs(app: &TestApp, kind: &str) -> Vec<(String, String)> {
    tally_workflows::with_pool!(&app.db, pool => {
        sqlx::query_as("SELECT id, input FROM tally_jobs WHERE user_id = $1 AND kind = $2")
            .bind(PLATFORM_USER_ID)
            .bind(kind)
            .fetch_all(pool)
            .await
            .expect("jobs")
    })
}

/// SIGTERM, then waits for a clean exit. The workers here hand back what still runs after
/// [`GRACE`]; under the whole suite's load an attempt's SQLite commit has been seen to take
/// longer than that, so the wait is long (these tests are about ticks, not shutdown speed;
/// `tests/api/processes.rs` covers shutdown).
async fn stop(child: &mut tokio::process::Child) {
    signal(child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(45), child.wait())
        .await
        .expect("the worker stopped in time")
        .expect("wait");
    assert!(status.success(), "worker exit: {status}");
}

/// The workers' shutdown timeout, seconds.
const GRACE: &str = "2";

fn now_ms() -> i64 {
    tally_workflows::now_ms()
}

/// Waits until `f` holds, polling; panics after `timeout`.
async fn until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three processes run one schedule every second for about 10 s: one job per tick, as many
/// ticks as seconds passed (not three times as many).
async fn one_job_per_tick_across_three_processes(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let file = config_file(&[every_second("heartbeat")]);
    let env = [
        ("TALLY_CONFIG", file.to_str().expect("path")),
        ("TALLY_WORKER__SHUTDOWN_TIMEOUT_SECS", GRACE),
    ];
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(spawn_worker(&app.url, &env).await);
    }
    let from = now_ms();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let to = now_ms();
    for (child, _) in &mut workers {
        stop(child).await;
    }
    let ticks = ticks(&app, "heartbeat").await;
    // Ticks are whole seconds, one after the other, none missing.
    for pair in ticks.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, 1000, "consecutive ticks: {ticks:?}");
    }
    // The ticks that fell while all three ran: one per whole second in (from, to].
    let seconds = to / 1000 - from / 1000;
    let seen = ticks.iter().filter(|(t, _)| *t > from && *t <= to).count() as i64;
    assert!(
        (seen - seconds).abs() <= 1,
        "{seen} ticks in {seconds} s: {ticks:?}"
    );
    // How late after its tick each job was made (printed for the record).
    let late: Vec<i64> = tally_workflows::with_pool!(&app.db, pool => {
        sqlx::query_scalar("SELECT created_at - tick_at FROM tally_cron_ticks WHERE name = $1")
            .bind("heartbeat")
            .fetch_all(pool)
            .await
            .expect("lateness")
    });
    assert!(late.iter().all(|ms| (0..5_000).contains(ms)), "{late:?}");
    eprintln!(
        "cron ({backend:?}): {seen} ticks in {seconds} s with 3 processes, {} jobs; \
         job made {}..{} ms after its tick",
        ticks.len(),
        late.iter().min().unwrap_or(&0),
        late.iter().max().unwrap_or(&0)
    );
    // Exactly one job per tick, and no other job of the schedule.
    let jobs = platform_jobs(&app, "echo").await;
    assert_eq!(jobs.len(), ticks.len(), "one job per tick: {jobs:?}");
    for (_, job_id) in &ticks {
        assert_eq!(
            jobs.iter().filter(|(id, _)| id == job_id).count(),
            1,
            "tick's job {job_id}"
        );
    }
    // Each ran (or is waiting to run) with the schedule's input.
    for (_, input) in &jobs {
        let input: Value = serde_json::from_str(input).expect("input");
        assert_eq!(input, json!({ "from": "heartbeat" }));
    }
    app.stop().await;
}

/// A schedule's own queue holds its jobs' retries too: a worker that serves only that queue
/// runs a job that fails once to its success.
async fn a_retry_stays_on_the_schedules_queue(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let schedule = CronConfig {
        kind: "fail".into(),
        input: json!({ "times": 1 }),
        queue: Some("notify".into()),
        ..every_second("flaky")
    };
    let file = config_file(&[schedule]);
    let env = [
        ("TALLY_CONFIG", file.to_str().expect("path")),
        ("TALLY_WORKER__QUEUES", "notify"),
        ("TALLY_JOBS__DEFAULT_MAX_ATTEMPTS", "3"),
        ("TALLY_JOBS__RETRY_BASE_MS", "1"),
        ("TALLY_JOBS__RETRY_MAX_MS", "5"),
    ];
    let (mut worker, _) = spawn_worker(&app.url, &env).await;
    until("a flaky job that succeeded", Duration::from_secs(15), || async {
        let jobs: Vec<(String, i32)> = tally_workflows::with_pool!(&app.db, pool => {
            sqlx::query_as("SELECT queue, attempts FROM tally_jobs WHERE kind = 'fail' AND status = 'succeeded'")
                .fetch_all(pool).await.expect("jobs")
        });
        jobs.iter().any(|(queue, attempts)| queue == "notify" && *attempts == 2)
    })
    .await;
    stop(&mut worker).await;
    app.stop().await;
}

/// A schedule whose ticks fall at three chosen seconds of each minute: the first runs, the
/// other two pass while no process runs, and the restarted process runs the latest of them
/// once (not both).
async fn a_missed_tick_runs_once_after_a_restart(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    // Seconds of the minute: `first` soon, `missed_1` and `missed_2` while nothing runs.
    let sec = |ms: i64| (ms / 1000).rem_euclid(60);
    let base = now_ms() / 1000 * 1000 + 4000;
    let (first, missed_1, missed_2) = (base, base + 3000, base + 4000);
    let mut entry = every_second("sparse");
    entry.schedule = format!(
        "{},{},{} * * * * *",
        sec(first),
        sec(missed_1),
        sec(missed_2)
    );
    let file = config_file(&[entry]);
    let env = [
        ("TALLY_CONFIG", file.to_str().expect("path")),
        ("TALLY_WORKER__SHUTDOWN_TIMEOUT_SECS", GRACE),
    ];
    let (mut worker, _) = spawn_worker(&app.url, &env).await;
    until("the first tick", Duration::from_secs(10), || async {
        !ticks(&app, "sparse").await.is_empty()
    })
    .await;
    stop(&mut worker).await;
    assert!(
        now_ms() < missed_1,
        "the first process stopped before the next tick (the test's timing)"
    );
    // Both later ticks pass with no process running.
    let wait = missed_2 + 300 - now_ms();
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    let (mut worker, _) = spawn_worker(&app.url, &env).await;
    until("the missed tick", Duration::from_secs(10), || async {
        ticks(&app, "sparse").await.len() >= 2
    })
    .await;
    // Time for a wrong second catch-up to show.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop(&mut worker).await;
    let stored: Vec<i64> = ticks(&app, "sparse")
        .await
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(
        stored,
        vec![first, missed_2],
        "the first tick and the latest missed one, once"
    );
    assert_eq!(platform_jobs(&app, "echo").await.len(), 2);
    app.stop().await;
}

fn app_schedules() -> Value {
    json!([
        { "name": "nightly", "schedule": "0 30 2 * * *", "timezone": "Europe/Paris",
          "kind": "sleep", "input": { "ms": 1 } },
        { "name": "heartbeat", "schedule": "* * * * * *", "kind": "echo", "input": { "n": 1 } },
    ])
}

/// `GET /v1/admin/cron`: exactly the promised shape, the platform's schedule first; a cron
/// job's view has `cron`; only admins may look.
async fn admins_see_the_schedules_and_cron_jobs_say_their_tick(backend: Backend) {
    let opts = Options {
        overrides: vec![("cron", app_schedules())],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let get = || async {
        json_of(
            app.get(&app.admin_key, "/v1/admin/cron").await,
            StatusCode::OK,
        )
        .await
    };
    let heartbeat = |v: &Value| v["schedules"][2].clone();
    until(
        "a heartbeat job that succeeded",
        Duration::from_secs(10),
        || async { heartbeat(&get().await)["last_tick"]["status"] == "succeeded" },
    )
    .await;
    let v = get().await;
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&v), ["schedules"]);
    let all = v["schedules"].as_array().expect("schedules");
    let names: Vec<&str> = all.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ledger.expire", "nightly", "heartbeat"]);
    for s in all {
        assert_eq!(
            keys(s),
            ["last_tick", "name", "next_tick", "schedule", "timezone"],
            "{s}"
        );
        let next = s["next_tick"].as_str().expect("next tick");
        let next = chrono::DateTime::parse_from_rfc3339(next).expect("RFC 3339");
        assert!(next > chrono::Utc::now(), "{s}");
    }
    assert_eq!(all[0]["schedule"], NEVER);
    assert_eq!(all[0]["timezone"], "UTC");
    assert_eq!(all[0]["last_tick"], Value::Null);
    let nightly = &all[1];
    assert_eq!(nightly["schedule"], "0 30 2 * * *");
    assert_eq!(nightly["timezone"], "Europe/Paris");
    assert_eq!(nightly["last_tick"], Value::Null);
    // 02:30 in Paris is 01:30 UTC in winter, 00:30 UTC in summer.
    let next = chrono::DateTime::parse_from_rfc3339(nightly["next_tick"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert!(matches!(chrono::Timelike::hour(&next), 0 | 1), "{nightly}");
    let last = &heartbeat(&v)["last_tick"];
    assert_eq!(keys(last), ["at", "job_id", "status"], "{last}");
    let at = last["at"].as_str().expect("at");
    chrono::DateTime::parse_from_rfc3339(at).expect("RFC 3339");

    // The tick's job: the platform's, with its schedule and tick.
    let job_id = last["job_id"].as_str().expect("job id");
    let job = json_of(
        app.get(&app.admin_key, &format!("/v1/jobs/{job_id}")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        job["cron"],
        json!({ "name": "heartbeat", "tick": at }),
        "{job}"
    );
    assert_eq!(job["kind"], "echo");
    until("the tick's job ran", Duration::from_secs(10), || async {
        let job = json_of(
            app.get(&app.admin_key, &format!("/v1/jobs/{job_id}")).await,
            StatusCode::OK,
        )
        .await;
        job["status"] == "succeeded" && job["result"] == json!({ "n": 1 })
    })
    .await;
    // Another user's job is not the ordinary user's to see.
    assert_problem(
        app.get(&app.user_key, &format!("/v1/jobs/{job_id}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    // A job nobody scheduled has no `cron`.
    let own = app.submit(json!({ "kind": "echo", "input": 2 })).await;
    assert!(app.job(&own).await.get("cron").is_none());

    // Admins only.
    assert_problem(
        app.get(&app.user_key, "/v1/admin/cron").await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let anonymous = app
        .client
        .get(app.url("/v1/admin/cron"))
        .send()
        .await
        .expect("request");
    assert_problem(anonymous, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

/// An admin's `GET /v1/jobs?kind=` lists every user's jobs, the platform's cron jobs among
/// them; an ordinary user's lists their own.
async fn an_admin_lists_every_users_jobs(backend: Backend) {
    let opts = Options {
        overrides: vec![("cron", app_schedules())],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    let mine = app.submit(json!({ "kind": "echo", "input": "mine" })).await;
    until("a cron job", Duration::from_secs(10), || async {
        !platform_jobs(&app, "echo").await.is_empty()
    })
    .await;
    let list = |key: String| {
        let app = &app;
        async move {
            let v = json_of(
                app.get(&key, "/v1/jobs?kind=echo&limit=200").await,
                StatusCode::OK,
            )
            .await;
            v["jobs"].as_array().expect("jobs").clone()
        }
    };
    let admin = list(app.admin_key.clone()).await;
    assert!(
        admin.iter().any(|j| j["id"] == mine.as_str()),
        "the user's job"
    );
    let cron_jobs: Vec<&Value> = admin.iter().filter(|j| !j["cron"].is_null()).collect();
    assert!(!cron_jobs.is_empty(), "the platform's jobs: {admin:?}");
    assert!(cron_jobs.iter().all(|j| j["cron"]["name"] == "heartbeat"));
    assert!(admin.iter().all(|j| j["kind"] == "echo"));
    let user = list(app.user_key.clone()).await;
    let ids: Vec<&str> = user.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [mine.as_str()], "the user sees their own job only");
    app.stop().await;
}

/// An invalid expression, time zone, kind or input stops `tally work` (and `tally serve`) at
/// start: exit 2, and the message names the schedule.
async fn a_bad_schedule_stops_the_process_at_start(backend: Backend) {
    let Some(url) = crate::helpers::fresh_database(backend).await else {
        return;
    };
    let good = every_second("fine");
    let bad = |name: &str, f: &dyn Fn(&mut CronConfig)| {
        let mut c = every_second(name);
        f(&mut c);
        c
    };
    let cases = [
        (
            bad("five-fields", &|c| c.schedule = "*/5 * * * *".into()),
            "seconds",
        ),
        (
            bad("bad-expression", &|c| c.schedule = "0 99 * * * *".into()),
            "not a cron expression",
        ),
        (
            bad("bad-zone", &|c| c.timezone = "Mars/Olympus_Mons".into()),
            "IANA",
        ),
        (
            bad("bad-kind", &|c| c.kind = "teleport".into()),
            "unknown job kind",
        ),
        (
            bad("private-kind", &|c| c.kind = "chat".into()),
            "not by cron",
        ),
        (
            bad("bad-input", &|c| {
                c.kind = "sleep".into();
                c.input = json!({ "ms": "soon" });
            }),
            "input.ms",
        ),
        (good.clone(), "two schedules share this name"),
    ];
    for (entry, why) in cases {
        let name = entry.name.clone();
        let file = config_file(&[good.clone(), entry]);
        for mode in ["work", "serve"] {
            let out = tally()
                .arg(mode)
                .env("DATABASE_URL", &url)
                .env("TALLY_CONFIG", &file)
                .output()
                .await
                .expect("run tally");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name} ({mode}): {err}");
            assert!(
                err.contains(&format!("schedule {name:?}")) && err.contains(why),
                "{name} ({mode}) names the schedule and says {why:?}: {err}"
            );
        }
    }
    // The platform's own schedule is checked the same way.
    let out = tally()
        .arg("work")
        .env("DATABASE_URL", &url)
        .env("TALLY_LEDGER__EXPIRY_SCHEDULE", "every now and then")
        .output()
        .await
        .expect("run tally");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ledger.expiry_schedule") && err.contains("\"ledger.expire\""),
        "{err}"
    );
}

crate::both_backends!(
    one_job_per_tick_across_three_processes,
    a_missed_tick_runs_once_after_a_restart,
    admins_see_the_schedules_and_cron_jobs_say_their_tick,
    an_admin_lists_every_users_jobs,
    a_bad_schedule_stops_the_process_at_start,
    a_retry_stays_on_the_schedules_queue,
);
