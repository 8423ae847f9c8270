//! `tally bench --ledger`: signed transfers per second and entries verified per second, per
//! backend. A signing task integrates and signs checkpoints while the writers run, as in
//! production; a transfer counts as signed once a checkpoint covers it.
//!
//! Scenarios:
//! - `accounts, batched`: W writers, each reservation on a different user (available → held),
//!   group-committed as the API does;
//! - `hot account, batched`: W writers, every transfer debits the same platform account;
//! - `accounts, 1 tx each`: W writers, one transaction per transfer, different users: shows
//!   that transfers on different accounts do not queue behind one lock.

use std::time::{Duration, Instant};

use tally_ledger::{SignerKey, accounts};
use tally_workflows::{
    Db,
    config::Config,
    ledger::{self, Done, LedgerError, Op, TransferSpec, log},
};
use tokio_util::sync::CancellationToken;

use crate::{bench::BenchArgs, cli::CliError};

/// Makes the operation a writer sends for a user and a sequence number.
type MakeOp = fn(&str, usize) -> Op;

/// Users whose accounts the writers spread over.
const USERS: usize = 1000;

pub async fn run(cfg: Config, args: BenchArgs) -> Result<(), CliError> {
    if args.transfers == 0 || args.writers == 0 {
        return Err(CliError::usage(
            "--transfers and --writers must be at least 1",
        ));
    }
    let out = args.out();
    out.text(format!(
        "tally bench --ledger: {} transfers per scenario, {} concurrent writers, {USERS} users, {} batch shards (Postgres)",
        args.transfers, args.writers, args.shards
    ));
    out.text(format!(
        "{:<9} {:<22} {:>12} {:>12} {:>14}",
        "backend", "scenario", "committed/s", "signed/s", "checkpoints"
    ));
    for backend in &args.backends {
        let fresh = crate::bench::fresh_database(backend, &args).await?;
        let result = bench_backend(&cfg, &args, backend, &fresh.url).await;
        fresh.drop_database(&args).await;
        result?;
    }
    Ok(())
}

async fn bench_backend(
    cfg: &Config,
    args: &BenchArgs,
    backend: &str,
    url: &str,
) -> Result<(), CliError> {
    let db = Db::connect(url, (args.writers as u32 + 4).min(64)).await?;
    db.migrate().await?;
    let signer = SignerKey::generate("tally-bench").map_err(|e| CliError::other(e.to_string()))?;
    let origin = cfg.ledger.origin.clone();
    let users: Vec<String> = (0..USERS)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();

    // Fund every user, signed, before the clock starts.
    let funding: Vec<Op> = users
        .iter()
        .map(|u| transfer(accounts::GRANTS, &accounts::available(u), u, 1_000_000_000))
        .collect();
    for chunk in funding.chunks(500) {
        ensure_all(ledger::run(&db, chunk.to_vec()).await?)?;
    }
    log::integrate(&db, &signer, &origin, usize::MAX >> 1).await?;

    let scenarios: [(&str, bool, MakeOp); 3] = [
        ("accounts, batched", true, reserve_one),
        ("hot account, batched", true, |user, _| {
            transfer(accounts::GRANTS, &accounts::available(user), user, 1)
        }),
        ("accounts, 1 tx each", false, reserve_one),
    ];
    for (name, batched, make) in scenarios {
        let before = log::log_size(&db).await?;
        let checkpoints_before = count_checkpoints(&db).await?;
        let stop = CancellationToken::new();
        let mut ledger_cfg = cfg.ledger.clone();
        ledger_cfg.checkpoint_ms = 100;
        let signing =
            log::spawn_maintenance(db.clone(), Some(signer.clone()), ledger_cfg, stop.clone());
        let batcher = batched.then(|| ledger::Writer::spawn(&db, args.shards, 1024));
        let n = args.transfers;
        let started = Instant::now();
        let mut writers = Vec::new();
        for w in 0..args.writers {
            let (db, batcher, users) = (db.clone(), batcher.clone(), users.clone());
            let writers_n = args.writers;
            writers.push(tokio::spawn(async move {
                let mut i = w;
                while i < n {
                    let op = make(&users[i % USERS], i);
                    let answer = match &batcher {
                        Some(b) => b.call(op).await?,
                        None => ledger::run_one(&db, op).await,
                    };
                    answer.map_err(|e| CliError::other(format!("transfer {i}: {e}")))?;
                    i += writers_n;
                }
                Ok::<_, CliError>(())
            }));
        }
        for w in writers {
            w.await
                .map_err(|e| CliError::other(format!("writer failed: {e}")))??;
        }
        let committed = started.elapsed().as_secs_f64();
        let target = before + n as u64;
        loop {
            let signed = log::latest_checkpoint(&db).await?.map_or(0, |c| c.size);
            if signed >= target {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(CliError::other(format!(
                    "signing stalled at {signed} of {target} entries"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let signed = started.elapsed().as_secs_f64();
        stop.cancel();
        let _ = signing.await;
        let checkpoints = count_checkpoints(&db).await? - checkpoints_before;
        let figures = TransferFigures {
            backend: backend.to_owned(),
            scenario: name,
            transfers: n,
            writers: args.writers,
            shards: args.shards,
            committed_per_s: (n as f64 / committed).round(),
            signed_per_s: (n as f64 / signed).round(),
            checkpoints,
        };
        args.out().scenario(
            format!(
                "{:<9} {:<22} {:>12.0} {:>12.0} {:>14}",
                backend, name, figures.committed_per_s, figures.signed_per_s, checkpoints
            ),
            &figures,
        );
    }

    // The audit: every entry, the tree, every checkpoint and every balance.
    let started = Instant::now();
    let verdict = log::verify(&db, vec![signer.verifier()], Some(origin), &mut |_, _| {}).await?;
    let secs = started.elapsed().as_secs_f64();
    match verdict {
        Ok(report) => {
            let figures = VerifyFigures {
                backend: backend.to_owned(),
                scenario: "verify",
                entries: report.entries,
                checkpoints: report.checkpoints,
                seconds: (secs * 1000.0).round() / 1000.0,
                entries_per_s: (report.entries as f64 / secs).round(),
            };
            args.out().scenario(
                format!(
                    "{:<9} {:<22} {:>12.0} entries/s ({} entries, {} checkpoints, {:.2} s)",
                    backend,
                    "verify",
                    figures.entries_per_s,
                    report.entries,
                    report.checkpoints,
                    secs
                ),
                &figures,
            );
        }
        Err(f) => {
            return Err(CliError::other(format!(
                "the benchmark ledger failed verification: {f}"
            )));
        }
    }
    db.close().await;
    Ok(())
}

/// One transfer scenario's figures.
#[derive(serde::Serialize)]
struct TransferFigures {
    backend: String,
    scenario: &'static str,
    transfers: usize,
    writers: usize,
    shards: usize,
    committed_per_s: f64,
    signed_per_s: f64,
    checkpoints: i64,
}

/// The audit's figures.
#[derive(serde::Serialize)]
struct VerifyFigures {
    backend: String,
    scenario: &'static str,
    entries: u64,
    checkpoints: u64,
    seconds: f64,
    entries_per_s: f64,
}

/// Holds one credit of `user`'s: touches only that user's two accounts.
fn reserve_one(user: &str, i: usize) -> Op {
    Op::Reserve {
        first: false,
        id: format!("bench:{i}:{}", uuid::Uuid::now_v7()),
        user_id: user.to_owned(),
        amount: 1,
        expires_at: None,
        job_id: None,
    }
}

fn transfer(from: &str, to: &str, user: &str, amount: i64) -> Op {
    Op::Transfer(TransferSpec {
        id: format!("bench/{}", uuid::Uuid::now_v7()),
        debit: from.to_owned(),
        credit: to.to_owned(),
        amount,
        kind: "grant".to_owned(),
        user_id: Some(user.to_owned()),
        reservation_id: None,
        job_id: None,
        memo: None,
    })
}

fn ensure_all(answers: Vec<Result<Done, LedgerError>>) -> Result<(), CliError> {
    for a in answers {
        a.map_err(|e| CliError::other(e.to_string()))?;
    }
    Ok(())
}

async fn count_checkpoints(db: &Db) -> Result<i64, CliError> {
    let n: i64 = tally_workflows::with_pool!(db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM ledger_checkpoints")
            .fetch_one(pool)
            .await
            .map_err(|e| CliError::other(e.to_string()))?
    });
    Ok(n)
}
