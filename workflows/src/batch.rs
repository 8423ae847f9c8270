//! Group commit. Callers hand a request to a [`Batcher`] and await its answer; one task takes
//! every request waiting at that moment (up to a limit), runs them as one batch (one statement,
//! one transaction, one commit) and answers each. Under load, batches grow by themselves; alone,
//! a request runs at once with no added delay.

use std::{future::Future, sync::Arc};

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::DbError;

type Reply<Resp> = oneshot::Sender<Result<Resp, DbError>>;

/// A handle to a batching task. Cloning it shares the task.
pub struct Batcher<Req, Resp> {
    tx: mpsc::Sender<(Req, Reply<Resp>)>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Spawns the batching task. `run` gets a batch of requests and must return one answer per
    /// request, in order; an error fails the whole batch.
    pub fn spawn<F, Fut>(max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Resp>, DbError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(Req, Reply<Resp>)>(max_batch * 4);
        let run = Arc::new(run);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max_batch);
            while rx.recv_many(&mut batch, max_batch).await > 0 {
                let (reqs, replies): (Vec<Req>, Vec<Reply<Resp>>) =
                    std::mem::take(&mut batch).into_iter().unzip();
                let n = reqs.len();
                // A batch that panics fails its callers; the task goes on with the next one.
                let ran = std::panic::AssertUnwindSafe(run(reqs)).catch_unwind().await;
                let ran = ran.unwrap_or_else(|_| Err(DbError::Batch("the batch panicked".into())));
                match ran {
                    Ok(answers) if answers.len() == n => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Ok(answers) => {
                        let msg = format!("batch of {n} gave {} answers", answers.len());
                        for reply in replies {
                            let _ = reply.send(Err(DbError::Batch(msg.clone())));
                        }
                    }
                    Err(e) => {
                        // Each caller learns whether the database was unreachable (the API
                        // answers 503 and a worker waits for it) or the batch failed.
                        let unavailable = e.is_unavailable();
                        let msg = e.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(if unavailable {
                                DbError::Unavailable(msg.clone())
                            } else {
                                DbError::Batch(msg.clone())
                            }));
                        }
                    }
                }
            }
        });
        Batcher { tx }
    }

    /// [`Batcher::spawn`] for a batch that needs shared state (a database handle): each batch
    /// gets its own clone of `state`.
    pub fn spawn_with<S, F, Fut>(state: S, max_batch: usize, run: F) -> Self
    where
        S: Clone + Send + Sync + 'static,
        F: Fn(S, Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Resp>, DbError>> + Send,
    {
        Self::spawn(max_batch, move |reqs| run(state.clone(), reqs))
    }

    /// Queues one request and waits for its answer.
    pub async fn call(&self, req: Req) -> Result<Resp, DbError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((req, reply))
            .await
            .map_err(|_| DbError::Batch("the batching task has stopped".into()))?;
        answer
            .await
            .map_err(|_| DbError::Batch("the batching task dropped a request".into()))?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn answers_each_caller_in_order_and_groups_concurrent_calls() {
        let batches = Arc::new(AtomicUsize::new(0));
        // Each batch gets its own clone of the state (here the batch counter).
        let doubler = Batcher::spawn_with(
            batches.clone(),
            64,
            |seen: Arc<AtomicUsize>, reqs: Vec<u32>| async move {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(reqs.into_iter().map(|r| r * 2).collect())
            },
        );
        let calls = (0..200u32).map(|i| {
            let d = doubler.clone();
            async move { (i, d.call(i).await) }
        });
        for (i, answer) in futures::future::join_all(calls).await {
            assert_eq!(answer.expect("answered"), i * 2);
        }
        let n = batches.load(Ordering::SeqCst);
        assert!(
            (200 / 64..200).contains(&n),
            "200 concurrent calls ran in {n} batches"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_caller_in_it() {
        let failing = Batcher::spawn(8, |_reqs: Vec<u32>| async {
            Err::<Vec<u32>, _>(DbError::Queue("disk on fire".into()))
        });
        let err = failing.call(1).await.expect_err("fails");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        let down = Batcher::spawn(8, |_reqs: Vec<u32>| async {
            Err::<Vec<u32>, _>(DbError::Sqlx(sqlx::Error::PoolTimedOut))
        });
        let err = down.call(1).await.expect_err("fails");
        assert!(err.is_unavailable(), "stays an outage: {err}");
        let short = Batcher::spawn(8, |_reqs: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        assert!(
            short.call(1).await.is_err(),
            "a batch that answers too few fails"
        );
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_its_callers_and_the_next_batch_runs() {
        let flaky = Batcher::spawn(8, |reqs: Vec<u32>| async move {
            if reqs.contains(&0) {
                panic!("boom");
            }
            Ok(reqs)
        });
        assert!(flaky.call(0).await.is_err());
        assert_eq!(flaky.call(7).await.expect("still running"), 7);
    }
}
