//! Agent tasks: a goal worked through in durable steps. Each step holds its estimated credits
//! before it calls the model (reservation `agent:<task>:<step>:<run>`, where `run` is new for
//! every run of the task, expiring after an hour so a crashed run's hold comes back), and is stored together with the settlement of
//! its actual usage in one transaction: a task resumed after a crash skips every stored step,
//! so no paid step runs twice.

use crate::kinds::{Input, Kind, PriceRule};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    Db, DbError,
    jobs::{self, Job, JobError, NewJob},
    ledger::{self, LedgerError, Op},
    now_ms, rfc3339, with_pool, with_tx,
};

/// `agent`: plans and runs an agent task's steps (made by `POST /v1/agents/tasks`); each step
/// holds and settles its own usage.
pub static KIND: Kind = Kind::new::<AgentInput>("agent", "ai")
    .made_by("POST /v1/chat/agent-tasks")
    .priced(PriceRule::Usage);

/// An agent job's input.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}
impl Input for AgentInput {}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Task {
    pub id: String,
    pub user_id: String,
    pub goal: String,
    pub model: String,
    pub max_steps: i32,
    pub created_at: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Step {
    pub task_id: String,
    pub idx: i32,
    /// `plan`, `step` or `summary`.
    pub kind: String,
    pub title: String,
    pub output: String,
    pub provider: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub credits: i64,
    pub created_at: i64,
}

impl Step {
    pub fn view(&self) -> Value {
        json!({
            "index": self.idx,
            "kind": self.kind,
            "title": self.title,
            "output": self.output,
            "provider": self.provider,
            "usage": { "input_tokens": self.input_tokens, "output_tokens": self.output_tokens },
            "credits": self.credits,
            "finished_at": rfc3339(self.created_at),
        })
    }
}

/// Creates the task and submits the job that runs it, in one transaction.
pub async fn create(
    db: &Db,
    user_id: &str,
    goal: &str,
    model: &str,
    max_steps: u32,
    job: NewJob,
) -> Result<(Task, Job), JobError> {
    let mut tx = db.begin().await?;
    let (job, _) = jobs::submit_in(&mut tx, vec![job])
        .await?
        .pop()
        .unwrap_or_else(|| Err(JobError::Conflict("no job was submitted".to_owned())))?;
    let task = Task {
        id: job.id.clone(),
        user_id: user_id.to_owned(),
        goal: goal.to_owned(),
        model: model.to_owned(),
        max_steps: i32::try_from(max_steps).unwrap_or(i32::MAX),
        created_at: now_ms(),
    };
    with_tx!(&mut tx, conn => {
        sqlx::query("INSERT INTO ai_agent_tasks (id, user_id, goal, model, max_steps, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING")
            .bind(&task.id).bind(&task.user_id).bind(&task.goal).bind(&task.model)
            .bind(task.max_steps).bind(task.created_at)
            .execute(&mut *conn).await?;
    });
    tx.commit().await?;
    crate::events::publish([job.id.as_str()]);
    Ok((task, job))
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Task>, DbError> {
    let sql =
        "SELECT id, user_id, goal, model, max_steps, created_at FROM ai_agent_tasks WHERE id = $1";
    let t: Option<Task> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(id).fetch_optional(pool).await?
    });
    Ok(t)
}

pub async fn steps(db: &Db, task_id: &str) -> Result<Vec<Step>, DbError> {
    let sql = "SELECT task_id, idx, kind, title, output, provider, input_tokens, output_tokens, \
        credits, created_at FROM ai_agent_steps WHERE task_id = $1 ORDER BY idx";
    let rows: Vec<Step> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(task_id).fetch_all(pool).await?
    });
    Ok(rows)
}

fn reservation_id(task_id: &str, idx: i32, run: &str) -> String {
    format!("agent:{task_id}:{idx}:{run}")
}

/// How long a step's hold lasts if its attempt dies without settling or releasing it.
const HOLD_MS: i64 = 3_600_000;

/// Holds a step's estimated credits before it runs (again, after a crash: the same hold).
pub async fn hold(
    db: &Db,
    task: &Task,
    idx: i32,
    run: &str,
    credits: i64,
) -> Result<(), LedgerError> {
    if credits <= 0 {
        return Ok(());
    }
    ledger::run_one(
        db,
        Op::Reserve {
            first: false,
            id: reservation_id(&task.id, idx, run),
            user_id: task.user_id.clone(),
            amount: credits,
            expires_at: Some(now_ms() + HOLD_MS),
            job_id: Some(task.id.clone()),
        },
    )
    .await
    .map(|_| ())
}

/// Stores a finished step and settles what it used, in one transaction: a step whose hold
/// cannot be settled is not stored (the run fails and the step runs again, paid).
pub async fn finish_step(db: &Db, step: &Step, run: &str) -> Result<(), DbError> {
    let mut tx = db.begin().await?;
    let inserted = with_tx!(&mut tx, conn => {
        sqlx::query("INSERT INTO ai_agent_steps (task_id, idx, kind, title, output, provider, input_tokens, \
                     output_tokens, credits, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (task_id, idx) DO NOTHING")
            .bind(&step.task_id).bind(step.idx).bind(&step.kind).bind(&step.title).bind(&step.output)
            .bind(&step.provider).bind(step.input_tokens).bind(step.output_tokens).bind(step.credits)
            .bind(step.created_at)
            .execute(&mut *conn).await?.rows_affected()
    });
    if inserted > 0 {
        let settle = Op::Settle {
            id: reservation_id(&step.task_id, step.idx, run),
            amount: Some(step.credits),
            owner: None,
            clamp: true,
        };
        for answer in ledger::execute(&mut tx, &[settle], now_ms()).await? {
            match answer {
                // A free step (0 credits) held nothing.
                Err(LedgerError::NotFound) if step.credits == 0 => {}
                Ok(_) => {}
                Err(e) => {
                    return Err(DbError::Corrupt(format!(
                        "agent step {} of task {} could not be settled: {e}",
                        step.idx, step.task_id
                    )));
                }
            }
        }
    }
    tx.commit().await
}

/// Releases the hold of a step that will not run (the task was cancelled or failed).
pub async fn release(db: &Db, task_id: &str, idx: i32, run: &str) -> Result<(), DbError> {
    let op = Op::release(reservation_id(task_id, idx, run));
    match ledger::run_one(db, op).await {
        Ok(_) | Err(LedgerError::NotFound) => Ok(()),
        Err(LedgerError::Db(e)) => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "an agent step's hold was not released");
            Ok(())
        }
    }
}

/// Releases every hold of the task still pending: once the task is over, only an attempt that
/// died mid-step can have left one.
pub async fn release_pending(db: &Db, task_id: &str) -> Result<usize, DbError> {
    let ids = {
        let mut tx = db.begin().await?;
        ledger::pending_of_jobs(&mut tx, &[task_id.to_owned()]).await?
    };
    let n = ids.len();
    let ops = ids.into_iter().map(Op::release).collect();
    ledger::run(db, ops).await?;
    Ok(n)
}
