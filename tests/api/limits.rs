//! Per-user concurrency limits (`[limits]`): checked after the fact from the jobs' own
//! `started_at` and `finished_at`, in one process and across two `tally work` processes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Backend, Options, TestApp, signal, spawn_worker, tally};

/// One finished job as stored.
#[derive(Debug, sqlx::FromRow)]
struct Run {
    status: String,
    attempts: i32,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    worker: Option<String>,
}

impl Run {
    fn span(&self) -> (i64, i64) {
        let start = self.started_at.expect("started");
        (start, self.finished_at.expect("finished"))
    }
}

/// Submits `n` jobs as the user with `key`; returns their ids.
async fn submit_as(app: &TestApp, key: &str, n: usize, body: Value) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let resp = app.post(key, "/v1/jobs", body.clone()).await;
        assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
        let job: Value = resp.json().await.expect("json");
        ids.push(job["id"].as_str().expect("id").to_owned());
    }
    ids
}

/// Waits for every job to end, then reads them from the database.
async fn finished(app: &TestApp, ids: &[String], key: &str) -> Vec<Run> {
    let mut runs = Vec::new();
    for id in ids {
        let start = std::time::Instant::now();
        loop {
            let resp = app.get(key, &format!("/v1/jobs/{id}")).await;
            let job: Value = resp.json().await.expect("json");
            if ["succeeded", "dead", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "job {id} did not end: {job}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let sql = "SELECT status, attempts, started_at, finished_at, worker \
                   FROM tally_jobs WHERE id = $1";
        let run: Run = tally_workflows::with_pool!(&app.db, pool => {
            sqlx::query_as(sql).bind(id).fetch_one(pool).await.expect("job row")
        });
        runs.push(run);
    }
    runs
}

/// The most jobs that ran at the same moment.
fn most_at_once<'a>(runs: impl IntoIterator<Item = &'a Run>) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for r in runs {
        let (start, end) = r.span();
        edges.push((start, 1));
        edges.push((end, -1));
    }
    // At equal times an end comes first: a job that ends as another starts is not overlapping.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

fn all_succeeded_once(runs: &[Run]) {
    for r in runs {
        assert_eq!(r.status, "succeeded", "{r:?}");
        assert_eq!(r.attempts, 1, "a held-back job counts no attempt: {r:?}");
    }
}

async fn a_user_limited_to_two_never_runs_more_than_two(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        Options {
            overrides: vec![("limits.max_running_per_user", json!(2))],
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let other = app.new_user("other@example.com").await;
    let sleep = json!({"kind": "sleep", "input": {"ms": 300}});
    let mine = submit_as(&app, &app.user_key, 8, sleep.clone()).await;
    let theirs = submit_as(&app, &other, 4, sleep).await;
    let mine = finished(&app, &mine, &app.user_key).await;
    let theirs = finished(&app, &theirs, &other).await;
    all_succeeded_once(&mine);
    all_succeeded_once(&theirs);
    assert_eq!(most_at_once(&mine), 2, "{mine:#?}");
    assert!(most_at_once(&theirs) <= 2, "{theirs:#?}");
    // The other user did not wait for the first one's backlog: their jobs were done before the
    // last of the first user's even started.
    let last_start = mine.iter().map(|r| r.span().0).max().unwrap();
    let their_end = theirs.iter().map(|r| r.span().1).max().unwrap();
    assert!(
        their_end < last_start,
        "the other user's jobs ended at {their_end}, the first's last started at {last_start}"
    );
    // Both users' jobs ran side by side: four at once in all.
    assert!(most_at_once(mine.iter().chain(&theirs)) > 2);
    app.stop().await;
}

async fn a_kind_limit_holds_that_kind_only(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        Options {
            overrides: vec![("limits.kinds", json!({"sleep": 1}))],
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let key = app.user_key.clone();
    let sleeps = submit_as(
        &app,
        &key,
        3,
        json!({"kind": "sleep", "input": {"ms": 300}}),
    )
    .await;
    let echoes = submit_as(&app, &key, 3, json!({"kind": "echo", "input": {"n": 1}})).await;
    let sleeps = finished(&app, &sleeps, &key).await;
    let echoes = finished(&app, &echoes, &key).await;
    all_succeeded_once(&sleeps);
    all_succeeded_once(&echoes);
    assert_eq!(most_at_once(&sleeps), 1, "{sleeps:#?}");
    let last_sleep = sleeps.iter().map(|r| r.span().0).max().unwrap();
    let echoes_end = echoes.iter().map(|r| r.span().1).max().unwrap();
    assert!(
        echoes_end < last_sleep,
        "echo jobs are not held by the sleep limit: {echoes:#?} {sleeps:#?}"
    );
    app.stop().await;
}

async fn the_limit_holds_across_two_processes(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let env = [
        ("TALLY_LIMITS__MAX_RUNNING_PER_USER", "2"),
        ("TALLY_WORKER__QUEUES", "system"),
        ("TALLY_WORKER__CONCURRENCY", "4"),
        ("TALLY_WORKER__BATCH_SIZE", "4"),
    ];
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(spawn_worker(&app.url, &env).await);
    }
    let ids = submit_as(
        &app,
        &app.user_key,
        12,
        json!({"kind": "sleep", "input": {"ms": 250}}),
    )
    .await;
    let runs = finished(&app, &ids, &app.user_key).await;
    all_succeeded_once(&runs);
    // Never more than the limit. (Whether the two processes fill both slots depends on how
    // busy the machine is: the single-process tests above check that the limit is reached.)
    let most = most_at_once(&runs);
    assert!((1..=2).contains(&most), "{most} at once: {runs:#?}");
    let names: Vec<&str> = workers.iter().map(|(_, n)| n.as_str()).collect();
    for r in &runs {
        assert!(names.contains(&r.worker.as_deref().unwrap_or("")), "{r:?}");
    }
    for (mut child, _) in workers {
        signal(&child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "SIGTERM exits 0: {status:?}");
    }
    app.stop().await;
}

crate::both_backends!(
    a_user_limited_to_two_never_runs_more_than_two,
    a_kind_limit_holds_that_kind_only,
    the_limit_holds_across_two_processes,
);

/// A limit that cannot work stops the process at start with a message that names it.
#[tokio::test]
async fn bad_limits_stop_the_process_at_start() {
    for (var, value, named) in [
        (
            "TALLY_LIMITS__MAX_RUNNING_PER_USER",
            "0",
            "limits.max_running_per_user",
        ),
        (
            "TALLY_LIMITS__MAX_RUNNING_PER_USER",
            "-2",
            "limits.max_running_per_user",
        ),
        (
            "TALLY_LIMITS__MAX_RUNNING_PER_USER",
            "many",
            "max_running_per_user",
        ),
        ("TALLY_LIMITS__KINDS__SLEEP", "0", "\"sleep\""),
        (
            "TALLY_LIMITS__KINDS__TELEPORT",
            "2",
            "unknown job kind \"teleport\"",
        ),
    ] {
        let out = tally()
            .arg("work")
            .env(var, value)
            .output()
            .await
            .expect("run tally");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {err}");
        assert!(err.contains(named), "{var}={value} names {named}: {err}");
    }
    // Good values are taken, from the environment and from the file.
    let dir = crate::helpers::scratch_dir();
    let file = dir.join("tally.toml");
    std::fs::write(
        &file,
        "[limits]\nmax_running_per_user = 3\n[limits.kinds]\nchat = 4\n",
    )
    .expect("write");
    let out = tally()
        .args(["config", "--config"])
        .arg(&file)
        .env("TALLY_LIMITS__KINDS__SLEEP", "2")
        .output()
        .await
        .expect("run tally");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains("max_running_per_user = 3"), "{shown}");
    assert!(
        shown.contains("chat = 4") && shown.contains("sleep = 2"),
        "{shown}"
    );
}
