//! A worker process's pools: one apalis worker per queue, all under one [`Monitor`] and one
//! shutdown signal. Each apalis worker's backend is the queue's job rows
//! ([`crate::queue::JobQueue`]): its fetch claims jobs (`FOR UPDATE SKIP LOCKED` on Postgres,
//! one `UPDATE` on SQLite), and the handler runs one attempt of each and records its outcome.
//! The process beats in `tally_workers` and rescues the jobs of processes that stopped beating
//! (see `tally_workflows::jobs::lease`).

use std::{future::Future, sync::Arc, time::Duration};

use apalis::prelude::*;
use tally_workflows::{
    Db, DbError,
    batch::Batcher,
    config::Config,
    jobs::{self, Claimed, Finish, Outcome, Status, lease},
    outage, retry,
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
    /// Outcomes of all this process's attempts, group-committed.
    finishes: Batcher<Finish, Status>,
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

/// Most outcomes written in one statement.
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
        // Claims and heartbeats are bookkeeping: on Postgres they commit without waiting for
        // the disk, in a pool of their own (see `pg_bookkeeping_pool`).
        let w = &self.cfg.worker;
        let claims_db = match &self.db {
            Db::Postgres(_) => Db::Postgres(
                tally_workflows::db::pg_bookkeeping_pool(
                    &self.cfg.database_url(),
                    2 + w.queues.len() as u32,
                )
                .await?,
            ),
            Db::Sqlite(_) => self.db.clone(),
        };
        let limits = Arc::new(tally_workflows::limits::Limits::new(&self.cfg.limits));
        // apalis worker ids, one per queue.
        let worker_ids: Vec<String> = w
            .queues
            .iter()
            .map(|q| format!("{}/{q}", self.name))
            .collect();
        let pause = Duration::from_millis(w.settle_pause_ms);
        let finishes = Batcher::spawn_with(
            (self.db.clone(), self.name.clone()),
            MAX_BATCH,
            move |(db, name): (Db, String), items: Vec<Finish>| async move {
                jobs::finish_many(&db, &name, items, pause).await
            },
        );
        let mut ai = crate::ai::Services::from_config(&self.cfg.ai, self.cfg.image_dir())
            .map_err(|e| DbError::Queue(format!("AI providers: {e}")))?;
        ai.histories = Some(Batcher::spawn_with(
            self.db.clone(),
            MAX_BATCH,
            |db: Db, jobs: Vec<String>| async move {
                tally_workflows::chat::histories_for(&db, jobs).await
            },
        ));
        let rt = Arc::new(Runtime {
            ai,
            db: self.db.clone(),
            name: self.name.clone(),
            retry_base: Duration::from_millis(self.cfg.jobs.retry_base_ms),
            retry_max: Duration::from_millis(self.cfg.jobs.retry_max_ms),
            finishes,
            attempts: TaskTracker::new(),
            interrupt: CancellationToken::new(),
        });
        let heartbeat = Duration::from_secs((w.lease_secs / 3).max(1));
        let lease = Duration::from_secs(w.lease_secs);
        let poll = Duration::from_millis(w.poll_ms);
        // The first heartbeat before the first claim: no other process may take this one's
        // jobs for dead. Waited for while the database is away, like everything a worker does.
        match outage::retry("writing the first heartbeat", &stop, || {
            lease::beat(&claims_db, &self.name, &w.queues)
        })
        .await
        {
            Ok(()) => {}
            Err(_) if stop.is_cancelled() => return Ok(()),
            Err(e) => return Err(e),
        }
        let beats = tokio::spawn(beat_and_rescue(
            claims_db.clone(),
            self.name.clone(),
            w.queues.clone(),
            heartbeat,
            lease,
            stop.clone(),
        ));
        // Queues an admin paused: their apalis workers are paused too (see `crate::pause`).
        // Read while the database may be away (a restart as the process starts): waited for,
        // like everything a worker reads, rather than ending the process.
        let workers: Vec<(String, String)> = worker_ids
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
        // A queue's fetch rides out a database that went away by itself (see `crate::queue`);
        // a worker that fails for another reason starts again (see `restart`).
        let mut monitor = Monitor::new()
            .on_event({
                let pauses = pauses.clone();
                move |ctx, event| pauses.on_event(ctx, event)
            })
            .should_restart(crate::restart::should_restart);
        // Postgres: each queue's idle worker listens for its queue's wake-ups, on a
        // connection of its own. SQLite: they all watch for commits.
        let listeners = match &self.db {
            Db::Postgres(_) => Some(
                tally_workflows::db::pg_bookkeeping_pool(
                    &self.cfg.database_url(),
                    w.queues.len() as u32,
                )
                .await?,
            ),
            Db::Sqlite(_) => None,
        };
        let commits = match &self.db {
            Db::Sqlite(pool) => Some(crate::poll::SqliteCommits::watch(
                (*pool.connect_options()).clone(),
            )),
            Db::Postgres(_) => None,
        };
        for (queue, worker_id) in w.queues.iter().zip(worker_ids.clone()) {
            let (rt, concurrency, batch, queue) =
                (rt.clone(), w.concurrency, w.batch_size, queue.clone());
            let (db, name, limits) = (claims_db.clone(), self.name.clone(), limits.clone());
            let (listeners, commits) = (listeners.clone(), commits.clone());
            monitor = monitor.register(move |_restarts| {
                let wake = match (&listeners, &commits) {
                    (Some(pool), _) => crate::poll::Every::new(poll)
                        .with_wake(crate::poll::pg_queue_wakes(pool.clone(), queue.clone())),
                    (None, Some(commits)) => {
                        crate::poll::Every::new(poll).with_wake(commits.subscribe())
                    }
                    (None, None) => crate::poll::Every::new(poll),
                };
                let backend = crate::queue::JobQueue::new(
                    db.clone(),
                    &queue,
                    &name,
                    batch,
                    limits.clone(),
                    wake,
                );
                WorkerBuilder::new(worker_id.as_str())
                    .backend(backend)
                    .concurrency(concurrency)
                    .catch_panic()
                    .data(rt.clone())
                    .build(handle)
            });
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
        beats.abort();
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
            lease::retire(&self.db, &self.name).await?;
            Ok::<_, DbError>(jobs.len())
        })
        .await;
        timer.abort();
        match handed {
            Ok(jobs) => {
                tracing::info!(worker = %self.name, handed_back_jobs = jobs, "worker pools stopped");
            }
            Err(e) if e.is_unavailable() => {
                tracing::warn!(worker = %self.name, error = %e, "the database is away: running jobs are left to their lease");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Beats every `every` and rescues the jobs of processes silent for `lease`, until `stop`. A
/// failure is logged once per outage; the next beat tries again.
///
/// A process rescues only once its own beats have succeeded for a whole lease: then every
/// live process has had the time to beat too. Right after the database comes back from an
/// outage longer than the lease, every heartbeat is stale, and rescuing then would take the
/// running jobs of live processes for lost.
async fn beat_and_rescue(
    db: Db,
    name: String,
    queues: Vec<String>,
    every: Duration,
    lease: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    // Since when this process's beats have succeeded without a failure (its first beat was
    // written before this loop starts).
    let mut beating_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let may_rescue = beating_since.elapsed() >= lease;
        let beat = async {
            lease::beat(&db, &name, &queues).await?;
            if may_rescue {
                lease::rescue(&db, lease).await?;
            }
            Ok::<_, DbError>(())
        };
        match beat.await {
            Ok(()) if failing => {
                failing = false;
                beating_since = tokio::time::Instant::now();
                outage::back();
            }
            Ok(()) => {}
            Err(e) => {
                if e.is_unavailable() {
                    outage::lost("the worker's heartbeat", &e);
                } else {
                    tracing::error!(error = %e, "a heartbeat or rescue failed");
                }
                failing = true;
            }
        }
    }
}

/// How long a job whose attempt could not be recorded waits before it is tried again.
const RELEASE_DELAY: Duration = Duration::from_secs(5);

/// One claimed job: one attempt. The attempt runs as a task of its own, which also gives the
/// job back when the attempt could not be recorded: apalis may drop this handler while it
/// stops, and the attempt must still end.
async fn handle(job: Claimed, rt: Data<Arc<Runtime>>) -> Result<(), BoxDynError> {
    let rt: Arc<Runtime> = (*rt).clone();
    let attempt = {
        let rt = rt.clone();
        rt.attempts.clone().spawn(async move {
            let job_id = job.id.clone();
            let result = run_attempt(job, &rt).await;
            if let Err(e) = &result {
                tracing::error!(%job_id, error = %e, "attempt could not be recorded; job released for a later try");
                let released = outage::retry("releasing a job", &rt.interrupt, || {
                    jobs::release(&rt.db, &job_id, &rt.name, RELEASE_DELAY)
                })
                .await;
                if let Err(e) = released {
                    tracing::warn!(%job_id, error = %e, "job not released; the lease will free it");
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

#[tracing::instrument(skip_all, fields(worker = %rt.name, job_id = %claimed.id))]
async fn run_attempt(claimed: Claimed, rt: &Runtime) -> Result<(), DbError> {
    // While the database is away, the outcome waits for it (see `outage`): an attempt gives
    // up only at the end of a shutdown.
    let mut effects = Default::default();
    let outcome = match serde_json::from_str(&claimed.input) {
        // Asked to stop between attempts (or while it was handed back): ends here.
        _ if claimed.cancel_requested => Outcome::Cancelled,
        Err(e) => Outcome::Fatal(format!("stored input is not JSON: {e}")),
        Ok(input) => {
            let prefetched = kinds::prefetch(&claimed.kind, &claimed.id, &rt.ai).await;
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
    let status = outage::retry("recording an outcome", &rt.interrupt, || {
        rt.finishes.call(finish.clone())
    })
    .await?;
    tracing::debug!(attempt = claimed.attempts, status = ?status, "attempt finished");
    Ok(())
}
