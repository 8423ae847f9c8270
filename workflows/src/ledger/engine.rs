//! The write path: a batch of ledger operations applied in one transaction.
//!
//! Like TigerBeetle's batches: every account the batch touches is created if new, then locked in
//! one statement in a fixed order (so two batches never deadlock), the operations run one after
//! another against those balances in memory, and the results are written back with one
//! statement per table. Each operation is all-or-nothing: one that would overdraw an account is
//! refused and leaves no trace, and the others in the batch still apply.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tally_ledger::accounts;

use super::{LedgerError, Op, ResState, Reservation, ReservationStep, Transfer, TransferSpec, sql};
use crate::{DbError, db::Tx};

/// What an operation did.
#[derive(Debug, Clone)]
pub enum Done {
    /// A plain transfer; `replayed` when the same transfer already existed (nothing moved).
    Transfer { transfer: Transfer, replayed: bool },
    /// A reservation after the operation, and the transfers this operation made (none when it
    /// was a replay or a no-op: `replayed`).
    Reservation {
        reservation: Reservation,
        transfers: Vec<Transfer>,
        replayed: bool,
    },
}

/// Applies `ops` in order inside `tx`. Each gets its own answer; an `Err` of the outer result
/// means the database failed and the transaction must be dropped.
pub async fn execute(
    tx: &mut Tx,
    ops: &[Op],
    now: i64,
) -> Result<Vec<Result<Done, LedgerError>>, DbError> {
    execute_locked(tx, ops, now, Vec::new()).await
}

/// [`execute`], given reservations that `tx` already read and locked (`FOR UPDATE`, in id
/// order, before any account): they are not read again.
pub async fn execute_locked(
    tx: &mut Tx,
    ops: &[Op],
    now: i64,
    locked: Vec<Reservation>,
) -> Result<Vec<Result<Done, LedgerError>>, DbError> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    // 1. The reservations the batch names, locked.
    let mut res_ids: Vec<&str> = ops
        .iter()
        .map(|op| match op {
            Op::Reserve { first: true, .. } => "",
            Op::Reserve { id, .. } | Op::Settle { id, .. } | Op::Release { id, .. } => id.as_str(),
            Op::Transfer(t) => t.reservation_id.as_deref().unwrap_or(""),
        })
        .filter(|id| !id.is_empty())
        .collect();
    res_ids.retain(|id| !locked.iter().any(|r| r.id == *id));
    res_ids.sort_unstable();
    res_ids.dedup();
    let reservations: HashMap<String, Reservation> = sql::reservations_for_update(tx, &res_ids)
        .await?
        .into_iter()
        .chain(locked)
        .map(|r| (r.id.clone(), r))
        .collect();

    // 2. Every account the batch may touch: created if new, then locked in id order.
    let mut touched: BTreeSet<String> = BTreeSet::new();
    for op in ops {
        match op {
            Op::Transfer(t) => {
                touched.insert(t.debit.clone());
                touched.insert(t.credit.clone());
            }
            Op::Reserve { user_id, .. } => {
                touched.insert(accounts::available(user_id));
                touched.insert(accounts::held(user_id));
            }
            Op::Settle { id, .. } | Op::Release { id, .. } => {
                let settles = matches!(op, Op::Settle { .. });
                let user = reservations.get(id).map(|r| r.user_id.clone()).or_else(|| {
                    ops.iter().find_map(|o| match o {
                        Op::Reserve {
                            id: rid, user_id, ..
                        } if rid == id => Some(user_id.clone()),
                        _ => None,
                    })
                });
                if let Some(user) = user {
                    touched.insert(accounts::available(&user));
                    touched.insert(accounts::held(&user));
                    // Only a settlement reaches revenue: releases do not queue on that row.
                    if settles {
                        touched.insert(accounts::REVENUE.to_owned());
                    }
                }
            }
        }
    }
    let touched: Vec<String> = touched.into_iter().collect();
    let balances: HashMap<String, i64> = sql::lock_accounts(tx, &touched, now)
        .await?
        .into_iter()
        .collect();

    // 3. Plain transfers that already exist (idempotent replays).
    let mut transfer_ids: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Transfer(t) => Some(t.id.as_str()),
            _ => None,
        })
        .collect();
    transfer_ids.sort_unstable();
    transfer_ids.dedup();
    let existing: HashMap<String, Transfer> = sql::transfers_by_id(tx, &transfer_ids)
        .await?
        .into_iter()
        .map(|t| (t.id.clone(), t))
        .collect();

    // 4. Run the operations in order, in memory.
    let mut state = Batch {
        balances,
        changed_accounts: BTreeSet::new(),
        new_transfers: Vec::new(),
        reservations,
        changed_reservations: BTreeSet::new(),
        now,
    };
    let mut answers = Vec::with_capacity(ops.len());
    let mut replayed_reservations = Vec::new();
    for op in ops {
        let answer = state.run(op, &existing);
        if let Ok(Done::Reservation {
            reservation,
            replayed: true,
            ..
        }) = &answer
        {
            replayed_reservations.push(reservation.id.clone());
        }
        answers.push(answer);
    }

    // 5. Write back.
    state.write(tx).await?;

    // Replays answer with the transfers their reservation made the first time.
    if !replayed_reservations.is_empty() {
        let mut made: HashMap<String, Vec<Transfer>> = HashMap::new();
        for t in super::transfers_of_reservations(tx, &replayed_reservations).await? {
            made.entry(t.reservation_id.clone().unwrap_or_default())
                .or_default()
                .push(t);
        }
        for answer in &mut answers {
            if let Ok(Done::Reservation {
                reservation,
                transfers,
                replayed: true,
            }) = answer
            {
                *transfers = made.get(&reservation.id).cloned().unwrap_or_default();
            }
        }
    }
    Ok(answers)
}

/// The batch's working state.
struct Batch {
    balances: HashMap<String, i64>,
    changed_accounts: BTreeSet<String>,
    new_transfers: Vec<Transfer>,
    reservations: HashMap<String, Reservation>,
    changed_reservations: BTreeSet<String>,
    now: i64,
}

impl Batch {
    fn run(&mut self, op: &Op, existing: &HashMap<String, Transfer>) -> Result<Done, LedgerError> {
        match op {
            Op::Transfer(spec) => {
                spec.check()?;
                let earlier = existing
                    .get(&spec.id)
                    .or_else(|| self.new_transfers.iter().find(|t| t.id == spec.id));
                if let Some(first) = earlier {
                    return if spec.same_as(first) {
                        Ok(Done::Transfer {
                            transfer: first.clone(),
                            replayed: true,
                        })
                    } else {
                        Err(LedgerError::TransferConflict(spec.id.clone()))
                    };
                }
                let mut made = self.apply(std::slice::from_ref(spec))?;
                let transfer = made.pop().ok_or_else(|| {
                    LedgerError::Invalid("a transfer made no ledger entry".to_owned())
                })?;
                Ok(Done::Transfer {
                    transfer,
                    replayed: false,
                })
            }
            Op::Reserve {
                id,
                user_id,
                amount,
                expires_at,
                job_id,
                ..
            } => {
                if *amount <= 0 {
                    return Err(LedgerError::Invalid(
                        "a reservation amount must be a positive number of credits".to_owned(),
                    ));
                }
                if let Some(first) = self.reservations.get(id) {
                    return if &first.user_id == user_id
                        && first.amount == *amount
                        && &first.job_id == job_id
                    {
                        Ok(Done::Reservation {
                            reservation: first.clone(),
                            transfers: Vec::new(),
                            replayed: true,
                        })
                    } else {
                        Err(LedgerError::ReservationConflict(id.clone()))
                    };
                }
                let hold = TransferSpec {
                    id: ReservationStep::Hold.id(id),
                    debit: accounts::available(user_id),
                    credit: accounts::held(user_id),
                    amount: *amount,
                    kind: "reserve".to_owned(),
                    user_id: Some(user_id.clone()),
                    reservation_id: Some(id.clone()),
                    job_id: job_id.clone(),
                    memo: None,
                };
                let transfers = self.apply(&[hold])?;
                let reservation = Reservation {
                    id: id.clone(),
                    user_id: user_id.clone(),
                    amount: *amount,
                    settled: None,
                    state: ResState::Pending.as_str().to_owned(),
                    job_id: job_id.clone(),
                    expires_at: *expires_at,
                    created_at: self.now,
                    closed_at: None,
                };
                self.reservations.insert(id.clone(), reservation.clone());
                self.changed_reservations.insert(id.clone());
                Ok(Done::Reservation {
                    reservation,
                    transfers,
                    replayed: false,
                })
            }
            Op::Settle {
                id,
                amount,
                owner,
                clamp,
            } => {
                let r = self.reservation(id, owner.as_deref())?;
                match r.state() {
                    // The same settlement again changes nothing; another amount is refused.
                    ResState::Settled if *clamp || amount.is_none() || *amount == r.settled => {
                        return Ok(Done::Reservation {
                            reservation: r,
                            transfers: Vec::new(),
                            replayed: true,
                        });
                    }
                    ResState::Settled | ResState::Released | ResState::Expired => {
                        let state = match r.settled {
                            Some(n) => format!("{} for {n} credits", r.state),
                            None => r.state.clone(),
                        };
                        return Err(LedgerError::Closed {
                            id: r.id.clone(),
                            state,
                        });
                    }
                    ResState::Pending => {}
                }
                let mut charge = amount.unwrap_or(r.amount);
                if *clamp {
                    charge = charge.clamp(0, r.amount);
                }
                if charge < 0 || charge > r.amount {
                    return Err(LedgerError::Invalid(format!(
                        "the settled amount must be between 0 and the reserved {} credits; got {charge}",
                        r.amount
                    )));
                }
                let mut specs = Vec::with_capacity(2);
                if charge > 0 {
                    specs.push(r.spec(
                        ReservationStep::Settle,
                        "settle",
                        accounts::REVENUE.to_owned(),
                        charge,
                    ));
                }
                if r.amount > charge {
                    let back = accounts::available(&r.user_id);
                    specs.push(r.spec(ReservationStep::Refund, "refund", back, r.amount - charge));
                }
                let transfers = self.apply(&specs)?;
                Ok(self.close(r, ResState::Settled, Some(charge), transfers))
            }
            Op::Release { id, expired, owner } => {
                let r = self.reservation(id, owner.as_deref())?;
                match r.state() {
                    ResState::Released | ResState::Expired => {
                        return Ok(Done::Reservation {
                            reservation: r,
                            transfers: Vec::new(),
                            replayed: true,
                        });
                    }
                    ResState::Settled => {
                        return Err(LedgerError::Closed {
                            id: r.id.clone(),
                            state: r.state.clone(),
                        });
                    }
                    ResState::Pending => {}
                }
                let (kind, state) = if *expired {
                    ("expire", ResState::Expired)
                } else {
                    ("release", ResState::Released)
                };
                let back = accounts::available(&r.user_id);
                let spec = r.spec(ReservationStep::Release, kind, back, r.amount);
                let transfers = self.apply(&[spec])?;
                Ok(self.close(r, state, None, transfers))
            }
        }
    }

    fn reservation(&self, id: &str, owner: Option<&str>) -> Result<Reservation, LedgerError> {
        match self.reservations.get(id) {
            Some(r) if owner.is_none_or(|o| o == r.user_id) => Ok(r.clone()),
            _ => Err(LedgerError::NotFound),
        }
    }

    fn close(
        &mut self,
        mut r: Reservation,
        state: ResState,
        settled: Option<i64>,
        transfers: Vec<Transfer>,
    ) -> Done {
        r.state = state.as_str().to_owned();
        r.settled = settled;
        r.closed_at = Some(self.now);
        self.changed_reservations.insert(r.id.clone());
        self.reservations.insert(r.id.clone(), r.clone());
        Done::Reservation {
            reservation: r,
            transfers,
            replayed: false,
        }
    }

    /// Moves the amounts of `specs`, all or none: refused if any account that may not go below
    /// zero would.
    fn apply(&mut self, specs: &[TransferSpec]) -> Result<Vec<Transfer>, LedgerError> {
        let mut next: BTreeMap<&str, i64> = BTreeMap::new();
        for spec in specs {
            spec.check()?;
            for (account, delta) in [(&spec.debit, -spec.amount), (&spec.credit, spec.amount)] {
                let current = match next.get(account.as_str()) {
                    Some(v) => *v,
                    None => *self.balances.get(account).ok_or_else(|| {
                        LedgerError::Invalid(format!("account {account} was not locked"))
                    })?,
                };
                let updated = current.checked_add(delta).ok_or_else(|| {
                    LedgerError::Invalid(format!("balance of {account} would overflow"))
                })?;
                if updated < 0 && accounts::no_overdraft(account) {
                    return Err(LedgerError::InsufficientCredits {
                        account: account.clone(),
                        balance: current,
                        needed: spec.amount,
                    });
                }
                next.insert(account.as_str(), updated);
            }
        }
        for (account, balance) in next {
            self.balances.insert(account.to_owned(), balance);
            self.changed_accounts.insert(account.to_owned());
        }
        let made: Vec<Transfer> = specs
            .iter()
            .map(|s| s.clone().into_transfer(self.now))
            .collect();
        self.new_transfers.extend(made.iter().cloned());
        Ok(made)
    }

    async fn write(self, tx: &mut Tx) -> Result<(), DbError> {
        let changed: Vec<&Reservation> = self
            .changed_reservations
            .iter()
            .filter_map(|id| self.reservations.get(id))
            .collect();
        let balances: Vec<(&String, i64)> = self
            .changed_accounts
            .iter()
            .filter_map(|id| self.balances.get(id).map(|b| (id, *b)))
            .collect();
        sql::write_batch(tx, &self.new_transfers, &changed, &balances, self.now).await
    }
}
