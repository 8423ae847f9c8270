//! Effects of an outcome: follow-up jobs commit with the outcome they belong to, under ids
//! derived from the job, and never twice (retries, a second delivery of the outcome, a replayed
//! submission of the same derived id).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_workflows::{
    jobs::{self, NewJob, derived_id},
    kinds,
};

use crate::{
    both_backends,
    helpers::{Backend, TestApp, assert_problem},
};

both_backends!(
    follow_ups_commit_with_success_once_across_retries,
    follow_ups_of_death_commit_only_with_death,
    a_second_delivery_enqueues_no_follow_up_again,
    an_outcome_applies_only_to_its_own_attempt,
    a_derived_id_is_submitted_once,
    bad_follow_ups_are_refused_at_submission,
);

const WAIT: Duration = Duration::from_secs(20);

/// Workers in this process that retry a failed attempt within milliseconds.
fn fast_retries() -> crate::helpers::Options {
    crate::helpers::Options {
        overrides: vec![
            ("jobs.retry_base_ms", json!(1)),
            ("jobs.retry_max_ms", json!(5)),
        ],
        ..Default::default()
    }
}

/// Every job of the test user, by kind.
async fn jobs_of_kind(app: &TestApp, kind: &str) -> Vec<Value> {
    let resp = app
        .get(&app.user_key, &format!("/v1/jobs?kind={kind}&limit=200"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("json");
    v["jobs"].as_array().expect("jobs").clone()
}

/// Claims the one job due on `system` as worker `w:1`.
async fn claim_the_job(app: &TestApp) -> jobs::Claimed {
    let none = tally_workflows::limits::Limits::none();
    let claimed = jobs::claim_next(&app.db, "w:1", "system", 10, &none)
        .await
        .expect("claim");
    let [claimed] = &claimed[..] else {
        panic!("one job claimed: {claimed:?}");
    };
    claimed.clone()
}

/// The attempt's success with `result`, staging one `echo` follow-up (`then/0`) whose input is
/// `follow_up`.
fn succeeded_with_follow_up(
    claimed: &jobs::Claimed,
    result: &str,
    follow_up: &str,
) -> jobs::Finish {
    let mut f = jobs::plan(claimed, jobs::Outcome::Succeeded(json!(result)), |_| {
        Duration::from_secs(1)
    });
    f.on_success.follow_up(
        "then/0",
        NewJob::new(&claimed.user_id, &kinds::ECHO, json!(follow_up)),
    );
    f
}

async fn follow_ups_commit_with_success_once_across_retries(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, fast_retries()).await else {
        return;
    };
    let id = app
        .submit(json!({
            "kind": "chain",
            "max_attempts": 3,
            "input": {
                "fail_times": 2,
                "then": [{"kind": "echo", "input": {"n": 1}}, {"kind": "echo", "input": {"n": 2}}],
                "if_dead": [{"kind": "sleep", "input": {"ms": 0}}],
            },
        }))
        .await;
    let job = app.wait_for(&id, &["succeeded", "dead"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 3, "{job}");
    // Each failed attempt staged the follow-ups too; only the success committed them.
    let mut echoes = jobs_of_kind(&app, "echo").await;
    assert_eq!(echoes.len(), 2, "{echoes:?}");
    echoes.sort_by_key(|j| j["input"]["n"].as_i64());
    for (i, echo) in echoes.iter().enumerate() {
        assert_eq!(echo["id"], derived_id(&id, &format!("then/{i}")));
        let done = app
            .wait_for(echo["id"].as_str().expect("id"), &["succeeded"], WAIT)
            .await;
        assert_eq!(done["result"], json!({"n": i + 1}));
    }
    assert!(jobs_of_kind(&app, "sleep").await.is_empty());
    app.stop().await;
}

async fn follow_ups_of_death_commit_only_with_death(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, fast_retries()).await else {
        return;
    };
    let id = app
        .submit(json!({
            "kind": "chain",
            "max_attempts": 2,
            "input": {
                "fail_times": 5,
                "then": [{"kind": "echo", "input": "never"}],
                "if_dead": [{"kind": "echo", "input": "compensate"}],
            },
        }))
        .await;
    let job = app.wait_for(&id, &["succeeded", "dead"], WAIT).await;
    assert_eq!(job["status"], "dead", "{job}");
    let echoes = jobs_of_kind(&app, "echo").await;
    assert_eq!(echoes.len(), 1, "{echoes:?}");
    assert_eq!(echoes[0]["id"], derived_id(&id, "if_dead/0"));
    assert_eq!(echoes[0]["input"], "compensate");
    app.stop().await;
}

/// An outcome delivered twice (its batch written again after the answer to its commit was
/// lost, or a worker that outlived its lease writing after the job ran elsewhere): the job's
/// row is its queue entry, so the outcome and the end of the queue entry are one write, and the
/// second delivery finds the job no longer running under that worker: nothing is applied and
/// its follow-up is not enqueued again. A finished job is never claimed again either.
async fn a_second_delivery_enqueues_no_follow_up_again(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "chain", "input": {"then": [{"kind": "echo"}]}}))
        .await;
    let claimed = claim_the_job(&app).await;
    assert_eq!(claimed.id, id);
    let finish = || succeeded_with_follow_up(&claimed, "done", "follow-up");
    let first = jobs::finish_many(&app.db, "w:1", vec![finish()], Duration::ZERO)
        .await
        .expect("first delivery");
    assert_eq!(first, vec![jobs::Status::Succeeded]);
    let again = jobs::finish_many(&app.db, "w:1", vec![finish(), finish()], Duration::ZERO)
        .await
        .expect("second delivery");
    assert_eq!(again, vec![jobs::Status::Running; 2], "applied again");
    let echoes = jobs_of_kind(&app, "echo").await;
    assert_eq!(echoes.len(), 1, "{echoes:?}");
    assert_eq!(echoes[0]["id"], derived_id(&id, "then/0"));
    let job = app.job(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    // The finished job is not the queue's any more; the follow-up is.
    let none = tally_workflows::limits::Limits::none();
    let next = jobs::claim_next(&app.db, "w:2", "system", 10, &none)
        .await
        .expect("claim");
    let ids: Vec<&str> = next.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, vec![derived_id(&id, "then/0").as_str()]);
    app.stop().await;
}

/// A process whose job was rescued (its heartbeat went stale) and that then claimed the same
/// job again holds it under the same worker name: the late outcome of its first attempt must
/// not end the second. Outcomes are fenced by attempt, not by worker name alone.
async fn an_outcome_applies_only_to_its_own_attempt(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let id = app
        .submit(json!({"kind": "chain", "input": {"then": [{"kind": "echo"}]}}))
        .await;
    let first = claim_the_job(&app).await;
    assert_eq!((first.id.as_str(), first.attempts), (id.as_str(), 1));
    // "w:1" never beat: its running job is rescued, and "w:1" claims it again.
    let rescued = jobs::lease::rescue(&app.db, Duration::from_secs(60))
        .await
        .expect("rescue");
    assert_eq!(rescued, vec![id.clone()]);
    let second = claim_the_job(&app).await;
    assert_eq!(second.attempts, 2);
    let finish =
        |claimed: &jobs::Claimed, result: &str| succeeded_with_follow_up(claimed, result, result);
    let late = jobs::finish_many(&app.db, "w:1", vec![finish(&first, "late")], Duration::ZERO)
        .await
        .expect("late outcome");
    assert_eq!(
        late,
        vec![jobs::Status::Running],
        "the first attempt's outcome applied"
    );
    let job = app.job(&id).await;
    assert_eq!(job["status"], "running", "{job}");
    assert!(jobs_of_kind(&app, "echo").await.is_empty());
    let own = jobs::finish_many(&app.db, "w:1", vec![finish(&second, "own")], Duration::ZERO)
        .await
        .expect("own outcome");
    assert_eq!(own, vec![jobs::Status::Succeeded]);
    let job = app.job(&id).await;
    assert_eq!(
        (job["result"].clone(), job["attempts"].clone()),
        (json!("own"), json!(2))
    );
    let echoes = jobs_of_kind(&app, "echo").await;
    assert_eq!(echoes.len(), 1, "{echoes:?}");
    assert_eq!(echoes[0]["input"], json!("own"));
    app.stop().await;
}

/// A job submitted twice under one derived id (an outcome applied twice would do that) is
/// stored once: the second submission answers with the first job.
async fn a_derived_id_is_submitted_once(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    let cause = app.submit(json!({"kind": "echo", "input": 1})).await;
    let user = app.job(&cause).await;
    let user_id: String = tally_workflows::with_pool!(&app.db, pool => {
        sqlx::query_scalar("SELECT user_id FROM tally_jobs WHERE id = $1")
            .bind(&cause).fetch_one(pool).await.expect("owner")
    });
    assert_eq!(user["id"], cause);
    let fid = derived_id(&cause, "next");
    let make = || NewJob {
        id: Some(fid.clone()),
        request_hash: fid.clone(),
        ..NewJob::new(&user_id, &kinds::ECHO, json!("follow-up"))
    };
    let first = jobs::submit_many(&app.db, vec![make()])
        .await
        .expect("submit");
    let (job, created) = first.into_iter().next().expect("answer").expect("kept");
    assert!(created);
    assert_eq!(job.id, fid);
    let again = jobs::submit_many(&app.db, vec![make(), make()])
        .await
        .expect("submit");
    for answer in again {
        let (job, created) = answer.expect("kept");
        assert!(!created, "a derived id was stored twice");
        assert_eq!(job.id, fid);
    }
    assert_eq!(jobs_of_kind(&app, "echo").await.len(), 2);
    assert_eq!(
        app.tasks_of(&fid).await,
        1,
        "one queue entry for the derived job"
    );
    app.stop().await;
}

async fn bad_follow_ups_are_refused_at_submission(backend: Backend) {
    let Some(app) = TestApp::spawn_api_only(backend).await else {
        return;
    };
    for (input, says) in [
        (json!({"then": [{"kind": "chat"}]}), "input.then[0].kind"),
        (json!({"then": [{"kind": "nope"}]}), "input.then[0].kind"),
        (
            json!({"if_dead": [{"kind": "sleep", "input": {"ms": "x"}}]}),
            "input.if_dead[0].input.ms",
        ),
        (
            json!({"then": [{"kind": "echo", "extra": 1}]}),
            "input.then[0]",
        ),
        (json!({"fail_times": -1}), "input.fail_times"),
        (json!({"later": []}), "unknown field `later`"),
    ] {
        let resp = app
            .post(
                &app.user_key,
                "/v1/jobs",
                json!({"kind": "chain", "input": input}),
            )
            .await;
        let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(says), "{input}: {detail}");
    }
    assert!(jobs_of_kind(&app, "chain").await.is_empty());
    app.stop().await;
}
