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
    batch::Batcher,
    config::Config,
    jobs::{self, Claim, Completion, Outcome, Status},
    outage,
    queue::{self, JobRef},
    retry,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    context::{JobContext, JobFailure},
    kinds::{self, Ran},
};

/// This process's name on the jobs it runs: `host:pid`, or `<worker.name>:pid`. The pid is
/// always there: a stopping process hands back the jobs running under its name, so two live
/// processes must never share one.
pub fn worker_name(cfg: &Config) -> String {
    if let Some(name) = &cfg.worker.name {
        return format!("{name}:{}", std::process::id());
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
    /// Claims of all this process's running handlers, group-committed.
    claims: Batcher<String, Claim>,
    /// Queue tasks whose jobs a per-user limit held back, put back in batches.
    holds: Batcher<String, ()>,
    /// Outcomes of all this process's attempts, group-committed with the retries they schedule
    /// and the completion of their queue tasks.
    finishes: Batcher<Completion, Option<Status>>,
    /// Every attempt runs as its own task, so it makes progress whether or not apalis is
    /// still polling its handler (it stops doing so while shutting down); shutdown waits here.
    attempts: TaskTracker,
    /// Cancelled when the shutdown timeout passes: attempts still running stop writing.
    interrupt: CancellationToken,
    /// AI providers and the model catalog.
    ai: crate::ai::Services,
}

/// How long interrupted attempts get to notice before the worker hands their jobs back anyway.
const INTERRUPT_WAIT: Duration = Duration::from_secs(2);
/// How long a stopping worker waits for an absent database to hand its jobs back.
const HAND_BACK_WAIT: Duration = Duration::from_secs(5);

/// Most claims or outcomes written in one statement.
const MAX_BATCH: usize = 512;

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
        // One stop for every part; a shutdown that comes while the pools start stops the start
        // too (a start waits out a database that is away, see below).
        let stop = CancellationToken::new();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.cancel();
            }
        });
        // Claims are bookkeeping: on Postgres they commit without waiting for the disk, in a
        // pool of their own (see `pg_bookkeeping_pool`).
        let claims_db = match &self.db {
            Db::Postgres(_) => Db::Postgres(
                tally_workflows::db::pg_bookkeeping_pool(&self.cfg.database_url(), 4).await?,
            ),
            Db::Sqlite(_) => self.db.clone(),
        };
        let claims = {
            let (db, name) = (claims_db.clone(), self.name.clone());
            let limits = Arc::new(tally_workflows::limits::Limits::new(&self.cfg.limits));
            Batcher::spawn(MAX_BATCH, move |ids: Vec<String>| {
                let (db, name, limits) = (db.clone(), name.clone(), limits.clone());
                async move { jobs::claim_many(&db, &name, &ids, &limits).await }
            })
        };
        let holds = {
            let db = claims_db.clone();
            Batcher::spawn(MAX_BATCH, move |tasks: Vec<String>| {
                let db = db.clone();
                async move {
                    queue::hold_back(&db, &tasks, tally_workflows::limits::HOLD_BACK).await?;
                    Ok(vec![(); tasks.len()])
                }
            })
        };
        // apalis worker ids, one per queue: the lock holder on this process's queue tasks.
        let holders: Vec<String> = self
            .cfg
            .worker
            .queues
            .iter()
            .map(|q| format!("{}/{q}", self.name))
            .collect();
        let finishes = {
            let (db, name, holders) = (self.db.clone(), self.name.clone(), holders.clone());
            let pause = Duration::from_millis(self.cfg.worker.settle_pause_ms);
            Batcher::spawn(MAX_BATCH, move |items: Vec<Completion>| {
                let (db, name, holders) = (db.clone(), name.clone(), holders.clone());
                async move { jobs::finish_many(&db, &name, &holders, items, pause).await }
            })
        };
        let mut ai = crate::ai::Services::from_config(&self.cfg.ai, self.cfg.image_dir())
            .map_err(|e| DbError::Queue(format!("AI providers: {e}")))?;
        ai.histories = Some({
            let db = self.db.clone();
            Batcher::spawn(MAX_BATCH, move |jobs: Vec<String>| {
                let db = db.clone();
                async move { tally_workflows::chat::histories_for(&db, jobs).await }
            })
        });
        let rt = Arc::new(Runtime {
            ai,
            db: self.db.clone(),
            name: self.name.clone(),
            retry_base: Duration::from_millis(self.cfg.jobs.retry_base_ms),
            retry_max: Duration::from_millis(self.cfg.jobs.retry_max_ms),
            claims,
            holds,
            finishes,
            attempts: TaskTracker::new(),
            interrupt: CancellationToken::new(),
        });
        let w = &self.cfg.worker;
        let heartbeat = Duration::from_secs((w.lease_secs / 3).max(1));
        let missed = (w.lease_secs / heartbeat.as_secs()).max(1) as usize;
        let poll = Duration::from_millis(w.poll_ms);
        // Queues an admin paused: their apalis workers are paused too (see `crate::pause`).
        // Read while the database may be away (a restart as the process starts): waited for,
        // like everything a worker reads, rather than ending the process.
        let workers: Vec<(String, String)> = holders
            .iter()
            .cloned()
            .zip(w.queues.iter().cloned())
            .collect();
        let pauses = match outage::retry("reading the paused queues", &stop, || {
            crate::pause::QueuePauses::load(&self.db, workers.clone())
        })
        .await
        {
            Ok(pauses) => pauses,
            Err(_) if stop.is_cancelled() => return Ok(()),
            Err(e) => return Err(e),
        };
        // A worker whose fetch or heartbeat failed (the database went away) starts again,
        // after a pause that grows while it keeps failing (see `restart`).
        let mut monitor = Monitor::new()
            .on_event({
                let pauses = pauses.clone();
                move |ctx, event| pauses.on_event(ctx, event)
            })
            .should_restart(crate::restart::should_restart);
        // apalis gets a pool of its own on Postgres. On shutdown it may drop one of its
        // transactions (a heartbeat) after BEGIN was sent, and sqlx then returns that
        // connection still inside the transaction (see `Db::begin`); in its own pool, that
        // connection only ever runs apalis' statements, and never Tally's autocommit ones.
        // What apalis writes there (task locks, heartbeats) is bookkeeping: it commits without
        // waiting for the disk (see `pg_bookkeeping_pool`). Its fetch is one statement
        // outside any transaction (vendor/apalis-postgres).
        let apalis_pool = match &self.db {
            Db::Postgres(_) => Some(
                tally_workflows::db::pg_bookkeeping_pool(
                    &self.cfg.database_url(),
                    2 + 2 * w.queues.len() as u32,
                )
                .await?,
            ),
            Db::Sqlite(_) => None,
        };
        let mut sqlite_commits = None;
        for (queue, worker_id) in w.queues.iter().zip(holders.clone()) {
            let (rt, concurrency, batch, queue) =
                (rt.clone(), w.concurrency, w.batch_size, queue.clone());
            let failures = crate::restart::Failures::default();
            // The same worker on either backend; only apalis' storage type differs.
            macro_rules! register {
                ($storage:ident, $config:path, $pool:expr, $wake:expr) => {{
                    let pool = $pool;
                    monitor.register(move |restarts| {
                        // Tally marks tasks running and done itself, in its own transactions.
                        let config = <$config>::default()
                            .queue(&queue)
                            .lock_tasks(false)
                            .persist_results(false)
                            .batch_size(batch)
                            .heartbeat_interval(heartbeat)
                            .missed_heartbeats(missed);
                        let storage = $storage::<JobRef>::new(&pool)
                            .with_config(config)
                            .poll_with_strategy($wake(&pool, &queue));
                        let storage = crate::restart::AfterPause::new(storage, restarts, &failures);
                        WorkerBuilder::new(worker_id.as_str())
                            .backend(storage)
                            .concurrency(concurrency)
                            .catch_panic()
                            .data(rt.clone())
                            .build(handle)
                    })
                }};
            }
            monitor = match &self.db {
                // Postgres: woken by apalis' notification of each new task on this queue.
                Db::Postgres(_) => register!(
                    PostgresStorage,
                    apalis_postgres::Config,
                    apalis_pool
                        .clone()
                        .ok_or_else(|| DbError::Queue("no queue pool".into()))?,
                    |pool: &sqlx::PgPool, queue: &str| {
                        crate::poll::Every::new(poll)
                            .with_wake(crate::poll::pg_task_inserts(pool.clone(), queue.to_owned()))
                    }
                ),
                // SQLite: woken by the commits of other connections.
                Db::Sqlite(pool) => {
                    let commits = sqlite_commits
                        .get_or_insert_with(|| {
                            crate::poll::SqliteCommits::watch((*pool.connect_options()).clone())
                        })
                        .clone();
                    register!(
                        SqliteStorage,
                        apalis_sqlite::Config,
                        pool.clone(),
                        |_: &sqlx::SqlitePool, _: &str| {
                            crate::poll::Every::new(poll).with_wake(commits.subscribe())
                        }
                    )
                }
            };
        }
        tracing::info!(worker = %self.name, queues = ?w.queues, concurrency = w.concurrency, "worker pools started");
        // Shutdown: apalis stops fetching at once; the attempts in flight get the grace period;
        // then whatever still runs is interrupted and handed back. Tally waits on its own
        // attempts rather than on the monitor, which may not drive a stopping worker's handlers.
        let grace = Duration::from_secs(w.shutdown_timeout_secs);
        pauses.watch(self.db.clone(), stop.clone());
        // The cron schedules whose jobs this process runs (see `crate::cron`).
        let schedules: Vec<_> = tally_workflows::cron::schedules(&self.cfg)
            .map_err(|e| DbError::Queue(e.to_string()))?
            .into_iter()
            .filter(|s| w.queues.iter().any(|q| q == s.queue))
            .collect();
        let mut cron = tokio::spawn(crate::cron::run(
            self.db.clone(),
            schedules,
            self.cfg.jobs.default_max_attempts,
            stop.clone(),
        ));
        let monitor = monitor.shutdown_timeout(grace).run_with_signal({
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                Ok(())
            }
        });
        let drained = {
            let (stop, rt) = (stop.clone(), rt.clone());
            async move {
                stop.cancelled().await;
                rt.attempts.close();
                tracing::info!(
                    running = rt.attempts.len(),
                    "stopping: no more fetching; waiting for running attempts"
                );
                if tokio::time::timeout(grace, rt.attempts.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        running = rt.attempts.len(),
                        "attempts still running at the shutdown timeout; handing them back"
                    );
                    rt.interrupt.cancel();
                    // Kinds stop at their next check; one that never checks is left behind.
                    let _ = tokio::time::timeout(INTERRUPT_WAIT, rt.attempts.wait()).await;
                }
            }
        };
        tokio::select! {
            result = monitor => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "worker monitor stopped with an error");
                }
                // The monitor may end on its own (every worker failed): stop the attempts too.
                stop.cancel();
                rt.attempts.close();
                if tokio::time::timeout(grace, rt.attempts.wait()).await.is_err() {
                    rt.interrupt.cancel();
                    let _ = tokio::time::timeout(INTERRUPT_WAIT, rt.attempts.wait()).await;
                }
            }
            () = drained => {}
        }
        stop.cancel();
        // The loop stops at its next await; a statement it has in flight is not waited for long.
        if tokio::time::timeout(INTERRUPT_WAIT, &mut cron)
            .await
            .is_err()
        {
            cron.abort();
            tracing::warn!("cron still enqueueing a tick at shutdown; left to the database");
        }
        tracing::info!("attempts finished; handing back what this worker still holds");
        // The database may be away as the process stops: the hand-back waits for it a little,
        // then leaves the jobs to their lease (another worker takes them when it runs out).
        let given_up = CancellationToken::new();
        let timer = tokio::spawn({
            let given_up = given_up.clone();
            async move {
                tokio::time::sleep(HAND_BACK_WAIT).await;
                given_up.cancel();
            }
        });
        let handed = outage::retry("handing back running jobs", &given_up, || async {
            let jobs = jobs::hand_back(&self.db, &self.name).await?;
            let tasks = queue::hand_back(&self.db, &holders).await?;
            Ok::<_, DbError>((jobs.len(), tasks))
        })
        .await;
        timer.abort();
        match handed {
            Ok((jobs, tasks)) => {
                tracing::info!(worker = %self.name, handed_back_jobs = jobs, handed_back_tasks = tasks, "worker pools stopped");
            }
            Err(e) if e.is_unavailable() => {
                tracing::warn!(worker = %self.name, error = %e, "the database is away: running jobs are left to their lease");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Seconds before a task whose handler hit an infrastructure error is tried again.
const RELEASE_DELAY_SECS: i64 = 5;

/// One queue task: one attempt of one job. The attempt runs as a task of its own, which also
/// gives the queue task back when the attempt could not be recorded: apalis drops this
/// handler when its worker fails (the database went away), and the attempt must still end.
async fn handle(task: JobRef, task_id: TaskId, rt: Data<Arc<Runtime>>) -> Result<(), BoxDynError> {
    let task_id = task_id.to_string();
    let rt: Arc<Runtime> = (*rt).clone();
    let attempt = {
        let (rt, job_id, task_id) = (rt.clone(), task.job_id.clone(), task_id.clone());
        let kind = task.kind.clone();
        rt.attempts.clone().spawn(async move {
            let result = run_attempt(&job_id, kind.as_deref(), &task_id, &rt).await;
            if let Err(e) = &result {
                tracing::error!(%job_id, error = %e, "attempt could not be recorded; task released for a later try");
                let released = outage::retry("releasing a task", &rt.interrupt, || {
                    queue::release(&rt.db, &task_id, RELEASE_DELAY_SECS)
                })
                .await;
                if let Err(e) = released {
                    tracing::warn!(%job_id, error = %e, "task not released; the lease will free it");
                }
            }
            result
        })
    };
    attempt
        .await
        .unwrap_or_else(|e| Err(DbError::Batch(format!("attempt task failed: {e}"))))?;
    Ok(())
}

/// `kind` is the job's kind as its task names it: what the kind reads first is read while the
/// job is claimed (and dropped if the claim refuses it).
#[tracing::instrument(skip(rt), fields(worker = %rt.name))]
async fn run_attempt(
    job_id: &str,
    kind: Option<&str>,
    task_id: &str,
    rt: &Runtime,
) -> Result<(), DbError> {
    // While the database is away, the claim and the outcome wait for it (see `outage`): an
    // attempt gives up only at the end of a shutdown.
    let (claimed, prefetched) = tokio::join!(
        outage::retry("claiming a job", &rt.interrupt, || rt
            .claims
            .call(job_id.to_owned())),
        kinds::prefetch(kind, job_id, &rt.ai)
    );
    let claimed = match claimed? {
        Claim::Run(claimed) => claimed,
        Claim::Drop => {
            tracing::debug!("job is not runnable (cancelled, finished or unknown); task dropped");
            let completion = Completion {
                task_id: task_id.to_owned(),
                finish: None,
            };
            outage::retry("recording an outcome", &rt.interrupt, || {
                rt.finishes.call(completion.clone())
            })
            .await?;
            return Ok(());
        }
        Claim::Wait => {
            tracing::debug!("job is over a per-user limit; task put back for later");
            rt.holds.call(task_id.to_owned()).await?;
            return Ok(());
        }
    };
    let mut effects = Default::default();
    let outcome = match serde_json::from_str(&claimed.input) {
        Err(e) => Outcome::Fatal(format!("stored input is not JSON: {e}")),
        Ok(input) => {
            let mut ctx = JobContext::new(
                rt.db.clone(),
                claimed.id.clone(),
                claimed.user_id.clone(),
                rt.name.clone(),
                claimed.attempts.max(1) as u32,
                rt.interrupt.clone(),
            );
            let ran = kinds::run(&claimed.kind, input, &mut ctx, &rt.ai, prefetched).await;
            effects = ctx.take_effects();
            match ran {
                Ok(Ran {
                    result,
                    credits: None,
                }) => Outcome::Succeeded(result),
                Ok(Ran {
                    result,
                    credits: Some(credits),
                }) => Outcome::Charged(result, credits),
                Err(JobFailure::Retryable(e)) => Outcome::Failed(e),
                Err(JobFailure::Fatal(e)) => Outcome::Fatal(e),
                Err(JobFailure::Cancelled) => Outcome::Cancelled,
                // Shutdown ran out of time: write nothing; the job is handed back.
                Err(JobFailure::Interrupted) => return Ok(()),
                Err(JobFailure::Db(e)) => Outcome::Failed(format!("worker lost the database: {e}")),
            }
        }
    };
    let mut finish = jobs::plan(&claimed, outcome, |n| {
        retry::delay(n, rt.retry_base, rt.retry_max)
    });
    // Applied only with the outcome they belong to (see `Finish::on_success`).
    (finish.on_success, finish.on_dead) = effects;
    let completion = Completion {
        task_id: task_id.to_owned(),
        finish: Some(finish),
    };
    let status = outage::retry("recording an outcome", &rt.interrupt, || {
        rt.finishes.call(completion.clone())
    })
    .await?;
    tracing::debug!(attempt = claimed.attempts, status = ?status, "attempt finished");
    Ok(())
}
