//! Property tests of the ledger engine on a real database: random sequences of grants,
//! reservations, settlements, releases and expiries, checked after every sequence against a
//! model and against the ledger's own audit.

use std::collections::HashMap;

use proptest::{prelude::*, test_runner::TestRunner};
use tally_ledger::accounts;
use tally_workflows::{
    Db,
    ledger::{self, Done, LedgerError, Op, TransferSpec, log},
    now_ms, with_pool,
};

use crate::helpers::{Backend, fresh_database};

#[derive(Debug, Clone)]
enum Step {
    Grant {
        user: usize,
        amount: i64,
    },
    Reserve {
        user: usize,
        amount: i64,
        expired: bool,
    },
    Settle {
        pick: usize,
        amount: i64,
    },
    Release {
        pick: usize,
    },
    Expire,
    /// The same settlement delivered twice, in one batch.
    DoubleSettle {
        pick: usize,
    },
    /// One batch that grants credits and holds them at once: the log must keep that order
    /// (the hold's id sorts first, so an order by id would replay a spend before its credit).
    GrantAndHold {
        user: usize,
        amount: i64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let user = 0..3usize;
    prop_oneof![
        (user.clone(), 1..500i64).prop_map(|(user, amount)| Step::Grant { user, amount }),
        (user, 1..400i64, any::<bool>()).prop_map(|(user, amount, expired)| Step::Reserve {
            user,
            amount,
            expired
        }),
        (any::<usize>(), 0..400i64).prop_map(|(pick, amount)| Step::Settle { pick, amount }),
        any::<usize>().prop_map(|pick| Step::Release { pick }),
        Just(Step::Expire),
        any::<usize>().prop_map(|pick| Step::DoubleSettle { pick }),
        (0..3usize, 1..300i64).prop_map(|(user, amount)| Step::GrantAndHold { user, amount }),
    ]
}

/// What the ledger should hold, computed independently.
#[derive(Default)]
struct Model {
    available: HashMap<String, i64>,
    held: HashMap<String, i64>,
    /// Reservation id → (user, amount, expires in the past, still pending).
    reservations: Vec<(String, String, i64, bool, bool)>,
}

impl Model {
    fn close(&mut self, i: usize, charge: i64) {
        let (_, user, amount, _, pending) = &mut self.reservations[i];
        *pending = false;
        *self.held.entry(user.clone()).or_default() -= *amount;
        *self.available.entry(user.clone()).or_default() += *amount - charge;
    }
}

async fn run_case(db: &Db, steps: &[Step]) -> Result<(), TestCaseError> {
    let users: Vec<String> = (0..3).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let mut model = Model::default();
    for step in steps {
        match step {
            Step::Grant { user, amount } => {
                let u = &users[*user];
                let done = ledger::run_one(
                    db,
                    Op::Transfer(TransferSpec {
                        id: format!("grant/{}", uuid::Uuid::now_v7()),
                        debit: accounts::GRANTS.to_owned(),
                        credit: accounts::available(u),
                        amount: *amount,
                        kind: "grant".to_owned(),
                        user_id: Some(u.clone()),
                        reservation_id: None,
                        job_id: None,
                        memo: None,
                    }),
                )
                .await;
                prop_assert!(done.is_ok(), "{done:?}");
                *model.available.entry(u.clone()).or_default() += amount;
            }
            Step::Reserve {
                user,
                amount,
                expired,
            } => {
                let u = &users[*user];
                let id = format!("rsv:{}", uuid::Uuid::now_v7());
                let expires_at = if *expired {
                    now_ms() - 1
                } else {
                    now_ms() + 3_600_000
                };
                let done = ledger::run_one(
                    db,
                    Op::Reserve {
                        first: false,
                        id: id.clone(),
                        user_id: u.clone(),
                        amount: *amount,
                        expires_at: Some(expires_at),
                        job_id: None,
                    },
                )
                .await;
                let avail = model.available.get(u).copied().unwrap_or(0);
                if avail >= *amount {
                    prop_assert!(done.is_ok(), "{done:?}");
                    *model.available.entry(u.clone()).or_default() -= amount;
                    *model.held.entry(u.clone()).or_default() += amount;
                    model
                        .reservations
                        .push((id, u.clone(), *amount, *expired, true));
                } else {
                    prop_assert!(
                        matches!(done, Err(LedgerError::InsufficientCredits { .. })),
                        "{done:?}"
                    );
                }
            }
            Step::Settle { pick, .. } | Step::DoubleSettle { pick }
                if !model.reservations.is_empty() =>
            {
                let i = pick % model.reservations.len();
                let (id, _, reserved, _, pending) = model.reservations[i].clone();
                let charge = match step {
                    Step::Settle { amount, .. } => (*amount).min(reserved),
                    _ => reserved,
                };
                let op = Op::Settle {
                    id: id.clone(),
                    amount: Some(charge),
                    owner: None,
                    clamp: false,
                };
                let times = if matches!(step, Step::DoubleSettle { .. }) {
                    2
                } else {
                    1
                };
                let answers = ledger::run(db, vec![op; times])
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if pending {
                    prop_assert!(
                        matches!(
                            answers[0],
                            Ok(Done::Reservation {
                                replayed: false,
                                ..
                            })
                        ),
                        "{answers:?}"
                    );
                    if times == 2 {
                        prop_assert!(
                            matches!(answers[1], Ok(Done::Reservation { replayed: true, .. })),
                            "{answers:?}"
                        );
                    }
                    model.close(i, charge);
                } else {
                    // Already settled: a no-op; released or expired: refused. Never a movement.
                    for a in &answers {
                        prop_assert!(
                            matches!(
                                a,
                                Ok(Done::Reservation { replayed: true, .. })
                                    | Err(LedgerError::Closed { .. })
                            ),
                            "{a:?}"
                        );
                    }
                }
            }
            Step::Release { pick } if !model.reservations.is_empty() => {
                let i = pick % model.reservations.len();
                let (id, _, _, _, pending) = model.reservations[i].clone();
                let done = ledger::run_one(
                    db,
                    Op::Release {
                        id,
                        expired: false,
                        owner: None,
                    },
                )
                .await;
                if pending {
                    prop_assert!(
                        matches!(
                            done,
                            Ok(Done::Reservation {
                                replayed: false,
                                ..
                            })
                        ),
                        "{done:?}"
                    );
                    model.close(i, 0);
                } else {
                    prop_assert!(
                        matches!(
                            done,
                            Ok(Done::Reservation { replayed: true, .. })
                                | Err(LedgerError::Closed { .. })
                        ),
                        "{done:?}"
                    );
                }
            }
            Step::GrantAndHold { user, amount } => {
                let u = &users[*user];
                let id = format!("aa-rsv:{}", uuid::Uuid::now_v7());
                let ops = vec![
                    Op::Transfer(TransferSpec {
                        id: format!("zz-grant/{}", uuid::Uuid::now_v7()),
                        debit: accounts::GRANTS.to_owned(),
                        credit: accounts::available(u),
                        amount: *amount,
                        kind: "grant".to_owned(),
                        user_id: Some(u.clone()),
                        reservation_id: None,
                        job_id: None,
                        memo: None,
                    }),
                    Op::Reserve {
                        first: false,
                        id: id.clone(),
                        user_id: u.clone(),
                        amount: *amount,
                        expires_at: None,
                        job_id: None,
                    },
                ];
                let answers = ledger::run(db, ops)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(answers.iter().all(Result::is_ok), "{answers:?}");
                *model.held.entry(u.clone()).or_default() += amount;
                model
                    .reservations
                    .push((id, u.clone(), *amount, false, true));
            }
            Step::Expire => {
                log::expire_due(db, now_ms(), 10_000)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for i in 0..model.reservations.len() {
                    let (_, ref user, _, expired, pending) = model.reservations[i];
                    if expired && pending && users.contains(user) {
                        model.close(i, 0);
                    }
                }
            }
            _ => {}
        }
    }
    // Balances equal the model; none negative.
    for u in &users {
        let (available, held) = ledger::balance(db, u)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(available, model.available.get(u).copied().unwrap_or(0));
        prop_assert_eq!(held, model.held.get(u).copied().unwrap_or(0));
        prop_assert!(available >= 0 && held >= 0);
    }
    // The sum over all accounts is zero.
    let sum: Option<i64> = with_pool!(db, pool => {
        sqlx::query_scalar("SELECT CAST(SUM(balance) AS BIGINT) FROM ledger_accounts").fetch_one(pool).await.map_err(|e| TestCaseError::fail(e.to_string()))?
    });
    prop_assert_eq!(sum.unwrap_or(0), 0);
    Ok(())
}

fn ledger_properties(backend: Backend) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(url) = rt.block_on(fresh_database(backend)) else {
        return;
    };
    let db = rt.block_on(async {
        let db = Db::connect(&url, 4).await.expect("connect");
        db.migrate().await.expect("migrate");
        db
    });
    let signer = tally_ledger::SignerKey::generate("props").expect("key");
    let config = proptest::test_runner::Config {
        cases: 16,
        failure_persistence: None,
        ..Default::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(step(), 1..30), |steps| {
        rt.block_on(async {
            run_case(&db, &steps).await?;
            // Every sequence ends signed into the log, and the audit replays it all.
            log::integrate(&db, &signer, "props", 1_000_000)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let verdict = log::verify(&db, vec![signer.verifier()], None, &mut |_, _| {})
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(verdict.is_ok(), "{verdict:?}");
            Ok(())
        })
    });
    rt.block_on(db.close());
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn sqlite() {
    ledger_properties(Backend::Sqlite)
}

#[test]
fn postgres() {
    ledger_properties(Backend::Postgres)
}
