//! A worker process's pools: one apalis worker per queue, all under one [`Monitor`] and one
//! shutdown signal. apalis claims tasks (`FOR UPDATE SKIP LOCKED` on Postgres, one `UPDATE` on
//! SQLite), keeps the worker's heartbeat and re-enqueues the tasks of workers that stopped
//! beating; Tally's handler turns each task into one attempt of a job and records its outcome.

use std::{future::Future, sync::Arc, time::Duration};

use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use tally_workflows::{
    Db, DbError,
    config::Config,
    jobs::{self, Outcome},
    queue::{self, JobRef},
    retry,
};

use crate::{
    context::{JobContext, JobFailure},
    kinds,
};

/// This process's name on the jobs it runs: `host:pid`, or `worker.name` from the config.
pub fn worker_name(cfg: &Config) -> String {
    if let Some(name) = &cfg.worker.name {
        return name.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tally".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Shared by every task this process runs.
struct Runtime {
    db: Db,
    name: String,
    retry_base: Duration,
    retry_max: Duration,
}

/// The worker pools of one process.
pub struct WorkerPool {
    db: Db,
    cfg: Config,
    name: String,
}

impl WorkerPool {
    pub fn new(db: Db, cfg: Config) -> Self {
        let name = worker_name(&cfg);
        WorkerPool { db, cfg, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs until `shutdown` resolves, then stops fetching, lets in-flight jobs finish within
    /// `worker.shutdown_timeout_secs` and hands back whatever is left.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DbError> {
        let rt = Arc::new(Runtime {
            db: self.db.clone(),
            name: self.name.clone(),
            retry_base: Duration::from_millis(self.cfg.jobs.retry_base_ms),
            retry_max: Duration::from_millis(self.cfg.jobs.retry_max_ms),
        });
        let w = &self.cfg.worker;
        let heartbeat = Duration::from_secs((w.lease_secs / 3).max(1));
        let missed = (w.lease_secs / heartbeat.as_secs()).max(1) as usize;
        let poll = Duration::from_millis(w.poll_ms);
        let mut monitor = Monitor::new();
        let mut apalis_names = Vec::new();
        for queue in &w.queues {
            let worker_id = format!("{}/{}", self.name, queue);
            apalis_names.push(worker_id.clone());
            let (rt, concurrency, batch, queue) =
                (rt.clone(), w.concurrency, w.batch_size, queue.clone());
            monitor = match &self.db {
                Db::Postgres(pool) => {
                    let pool = pool.clone();
                    monitor.register(move |_restarts| {
                        let config = apalis_postgres::Config::default()
                            .queue(&queue)
                            .batch_size(batch)
                            .heartbeat_interval(heartbeat)
                            .missed_heartbeats(missed);
                        let storage = PostgresStorage::<JobRef>::new(&pool)
                            .with_config(config)
                            .poll_with_interval(poll);
                        WorkerBuilder::new(worker_id.as_str())
                            .backend(storage)
                            .concurrency(concurrency)
                            .catch_panic()
                            .data(rt.clone())
                            .build(handle)
                    })
                }
                Db::Sqlite(pool) => {
                    let pool = pool.clone();
                    monitor.register(move |_restarts| {
                        let config = apalis_sqlite::Config::default()
                            .queue(&queue)
                            .batch_size(batch)
                            .heartbeat_interval(heartbeat)
                            .missed_heartbeats(missed);
                        let storage = SqliteStorage::<JobRef>::new(&pool)
                            .with_config(config)
                            .poll_with_interval(poll);
                        WorkerBuilder::new(worker_id.as_str())
                            .backend(storage)
                            .concurrency(concurrency)
                            .catch_panic()
                            .data(rt.clone())
                            .build(handle)
                    })
                }
            };
        }
        tracing::info!(worker = %self.name, queues = ?w.queues, concurrency = w.concurrency, "worker pools started");
        let result = monitor
            .shutdown_timeout(Duration::from_secs(w.shutdown_timeout_secs))
            .run_with_signal(async move {
                shutdown.await;
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "worker monitor stopped with an error");
        }
        let jobs = jobs::hand_back(&self.db, &self.name).await?;
        let tasks = queue::hand_back(&self.db, &apalis_names).await?;
        tracing::info!(worker = %self.name, handed_back_jobs = jobs.len(), handed_back_tasks = tasks, "worker pools stopped");
        Ok(())
    }
}

/// One queue task: one attempt of one job.
async fn handle(task: JobRef, rt: Data<Arc<Runtime>>) -> Result<(), BoxDynError> {
    run_attempt(&task.job_id, &rt)
        .await
        .map_err(|e| Box::new(e) as BoxDynError)
}

#[tracing::instrument(skip(rt), fields(worker = %rt.name))]
async fn run_attempt(job_id: &str, rt: &Runtime) -> Result<(), DbError> {
    let Some(claimed) = jobs::claim(&rt.db, job_id, &rt.name).await? else {
        tracing::debug!("job is not runnable (cancelled, finished or unknown); task dropped");
        return Ok(());
    };
    let outcome = match serde_json::from_str(&claimed.input) {
        Err(e) => Outcome::Fatal(format!("stored input is not JSON: {e}")),
        Ok(input) => {
            let mut ctx = JobContext::new(
                rt.db.clone(),
                claimed.id.clone(),
                rt.name.clone(),
                claimed.attempts.max(1) as u32,
            );
            match kinds::run(&claimed.kind, input, &mut ctx).await {
                Ok(v) => Outcome::Succeeded(v),
                Err(JobFailure::Retryable(e)) => Outcome::Failed(e),
                Err(JobFailure::Fatal(e)) => Outcome::Fatal(e),
                Err(JobFailure::Cancelled) => Outcome::Cancelled,
                Err(JobFailure::Db(e)) => Outcome::Failed(format!("worker lost the database: {e}")),
            }
        }
    };
    let status = jobs::finish(&rt.db, &claimed, &rt.name, outcome, |n| {
        retry::delay(n, rt.retry_base, rt.retry_max)
    })
    .await?;
    tracing::debug!(
        attempt = claimed.attempts,
        status = status.as_str(),
        "attempt finished"
    );
    Ok(())
}
