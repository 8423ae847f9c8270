//! Real `tally work` processes sharing one database: spreading work, SIGKILL and SIGTERM.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, signal, spawn_worker};

async fn three_workers_share_a_queue(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(
            spawn_worker(
                &app.url,
                &[
                    ("TALLY_WORKER__QUEUES", "system"),
                    ("TALLY_WORKER__BATCH_SIZE", "4"),
                    // Two jobs at a time: no one process can keep up with the submissions alone
                    // (claims got fast enough that one sometimes took all of them).
                    ("TALLY_WORKER__CONCURRENCY", "2"),
                ],
            )
            .await,
        );
    }
    let mut ids = Vec::new();
    for i in 0..150 {
        ids.push(
            app.submit(json!({"kind": "sleep", "input": {"ms": 20 + i % 3}}))
                .await,
        );
    }
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let job = app
            .wait_for(
                id,
                &["succeeded", "dead", "cancelled"],
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "each job ran once: {job}");
        *by_worker
            .entry(job["worker"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let names: Vec<&String> = workers.iter().map(|(_, n)| n).collect();
    for w in by_worker.keys() {
        assert!(names.contains(&w), "{w} is one of {names:?}");
    }
    assert!(
        by_worker.len() >= 2,
        "jobs spread over the processes: {by_worker:?}"
    );
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

async fn sigkill_job_is_rescued(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let (mut first, first_name) = spawn_worker(&app.url, &[]).await;
    let id = app
        .submit(json!({"kind": "sleep", "input": {"ms": 2000}}))
        .await;
    let job = app
        .wait_for(&id, &["running"], Duration::from_secs(15))
        .await;
    assert_eq!(job["worker"], first_name.as_str());
    signal(&first, "KILL");
    let _ = first.wait().await;
    let killed_at = Instant::now();
    let (mut second, second_name) = spawn_worker(&app.url, &[]).await;
    let job = app
        .wait_for(&id, &["succeeded"], Duration::from_secs(40))
        .await;
    assert_eq!(job["worker"], second_name.as_str(), "{job}");
    assert_eq!(job["attempts"], 2, "the killed attempt counts: {job}");
    // Lease 3 s, heartbeat 1 s: rescued within the lease plus a heartbeat or two, plus the run.
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "rescued after {:?}",
        killed_at.elapsed()
    );
    signal(&second, "TERM");
    assert!(second.wait().await.unwrap().success());
    app.stop().await;
}

async fn sigterm_finishes_or_hands_back(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    // A short job in flight finishes before the process exits.
    let (mut worker, name) =
        spawn_worker(&app.url, &[("TALLY_WORKER__SHUTDOWN_TIMEOUT_SECS", "10")]).await;
    let short = app
        .submit(json!({"kind": "sleep", "input": {"ms": 1000}}))
        .await;
    app.wait_for(&short, &["running"], Duration::from_secs(15))
        .await;
    signal(&worker, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let job = app.job(&short).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], name.as_str());
    // A long job is handed back when the shutdown timeout passes, and another process runs it.
    let (mut worker, _) =
        spawn_worker(&app.url, &[("TALLY_WORKER__SHUTDOWN_TIMEOUT_SECS", "1")]).await;
    let long = app
        .submit(json!({"kind": "sleep", "input": {"ms": 2500}}))
        .await;
    app.wait_for(&long, &["running"], Duration::from_secs(15))
        .await;
    let asked = Instant::now();
    signal(&worker, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(asked.elapsed() < Duration::from_secs(5));
    let job: Value = app.job(&long).await;
    assert_eq!(job["status"], "queued", "handed back: {job}");
    assert_eq!(
        job["attempts"], 0,
        "the interrupted attempt is not counted: {job}"
    );
    let (mut other, other_name) = spawn_worker(&app.url, &[]).await;
    let job = app
        .wait_for(&long, &["succeeded"], Duration::from_secs(15))
        .await;
    assert_eq!(job["worker"], other_name.as_str());
    assert!(
        asked.elapsed() < Duration::from_secs(12),
        "taken at once, not after a lease: {:?}",
        asked.elapsed()
    );
    signal(&other, "TERM");
    assert!(other.wait().await.unwrap().success());
    app.stop().await;
}

/// A worker killed inside the transaction that settles a job's credits: the settlement and the
/// job's success commit together or not at all, so after the rescue the job is charged once.
async fn sigkill_while_settling_charges_once(backend: Backend) {
    let opts = crate::helpers::Options {
        workers: false,
        overrides: vec![("pricing.echo", json!(5))],
        ..Default::default()
    };
    let Some(app) = TestApp::spawn_with(backend, opts).await else {
        return;
    };
    app.grant(&app.user_id, 20).await;
    let (mut first, first_name) =
        spawn_worker(&app.url, &[("TALLY_WORKER__SETTLE_PAUSE_MS", "60000")]).await;
    let id = app.submit(json!({"kind": "echo", "input": {"n": 1}})).await;
    assert_eq!(app.balance(&app.user_key).await, (15, 5));
    let job = app
        .wait_for(&id, &["running"], Duration::from_secs(15))
        .await;
    assert_eq!(job["worker"], first_name.as_str());
    // The echo is done in microseconds; the worker now sits between writing the settlement and
    // committing it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.job(&id).await["status"], "running");
    signal(&first, "KILL");
    let _ = first.wait().await;
    assert_eq!(
        app.balance(&app.user_key).await,
        (15, 5),
        "nothing was charged"
    );
    let (mut second, second_name) = spawn_worker(&app.url, &[]).await;
    let job = app
        .wait_for(&id, &["succeeded"], Duration::from_secs(40))
        .await;
    assert_eq!(job["worker"], second_name.as_str(), "{job}");
    assert_eq!(
        job["attempts"], 2,
        "the first attempt's outcome never committed: {job}"
    );
    assert_eq!(job["cost"]["settled"], 5, "{job}");
    let settles = job["cost"]["transfers"]
        .as_array()
        .expect("transfers")
        .iter()
        .filter(|t| t["kind"] == "settle")
        .count();
    assert_eq!(settles, 1, "charged exactly once: {job}");
    assert_eq!(app.balance(&app.user_key).await, (15, 0));
    app.wait_signed().await;
    let v: Value = app
        .get(&app.admin_key, "/v1/admin/ledger/verify")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["ok"], true, "{v}");
    signal(&second, "TERM");
    assert!(second.wait().await.unwrap().success());
    app.stop().await;
}

crate::both_backends!(
    three_workers_share_a_queue,
    sigkill_job_is_rescued,
    sigterm_finishes_or_hands_back,
    sigkill_while_settling_charges_once
);
