//! The credit ledger in the database: accounts, transfers, two-phase reservations, and the
//! signed Merkle log over the transfers.
//!
//! - [`engine`]: the write path, a batch of [`Op`]s applied in one transaction (the caller's, so
//!   a job's state and the money it moves commit together).
//! - [`log`]: integration of committed transfers into the RFC 6962 log with signed checkpoints,
//!   proofs, the database audit and the export.
//!
//! Amounts are whole credits (`i64`). A transfer moves a positive amount from `debit` to
//! `credit`; the balances sum to zero. The pure part (entries' canonical bytes, the tree, the
//! signatures) is the `tally-ledger` crate, so an auditor can check an export without Tally.

pub mod engine;
pub mod log;
pub mod reconcile;
mod sql;

use serde::Serialize;
use serde_json::{Value, json};
use tally_ledger::{Entry, accounts};

use crate::{Db, DbError, batch::Batcher, db::Tx, now_ms, rfc3339, with_pool, with_tx};

pub use engine::{Done, execute, execute_locked};

/// A transfer as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct Transfer {
    pub id: String,
    /// Its index in the log, once integrated.
    pub seq: Option<i64>,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    pub kind: String,
    pub user_id: Option<String>,
    pub reservation_id: Option<String>,
    pub job_id: Option<String>,
    pub memo: Option<String>,
    pub created_at: i64,
}

pub(crate) const TRANSFER_COLUMNS: &str =
    "id, seq, debit, credit, amount, kind, user_id, reservation_id, job_id, memo, created_at";

impl Transfer {
    /// The log entry this transfer is (or will be) at `index`.
    pub fn entry(&self, index: u64) -> Entry {
        Entry {
            index,
            id: self.id.clone(),
            debit: self.debit.clone(),
            credit: self.credit.clone(),
            amount: self.amount,
            kind: self.kind.clone(),
            user_id: self.user_id.clone(),
            reservation_id: self.reservation_id.clone(),
            job_id: self.job_id.clone(),
            memo: self.memo.clone(),
            created_at_ms: self.created_at,
        }
    }

    /// The transfer as the API shows it.
    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "kind": self.kind,
            "amount": self.amount,
            "debit": self.debit,
            "credit": self.credit,
            "reservation_id": self.reservation_id,
            "job_id": self.job_id,
            "memo": self.memo,
            "created_at": rfc3339(self.created_at),
            "entry": self.seq.map(|i| json!({
                "index": i,
                "proof": format!("/v1/ledger/entries/{i}/proof"),
            })),
        })
    }
}

/// A transfer to make.
#[derive(Debug, Clone)]
pub struct TransferSpec {
    pub id: String,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    pub kind: String,
    pub user_id: Option<String>,
    pub reservation_id: Option<String>,
    pub job_id: Option<String>,
    pub memo: Option<String>,
}

impl TransferSpec {
    fn check(&self) -> Result<(), LedgerError> {
        if self.amount <= 0 {
            return Err(LedgerError::Invalid(
                "a transfer amount must be a positive number of credits".to_owned(),
            ));
        }
        if self.debit == self.credit {
            return Err(LedgerError::Invalid(
                "a transfer must move credits between two different accounts".to_owned(),
            ));
        }
        // A reservation's transfers are found by their ids (see `ReservationStep::ids_of`).
        if let Some(r) = &self.reservation_id
            && ReservationStep::of(&self.id, r).is_none()
        {
            return Err(LedgerError::Invalid(format!(
                "a transfer of reservation {r} must be one of its steps ({r}/hold, /settle, /refund or /release)"
            )));
        }
        Ok(())
    }

    /// Same content as a stored transfer (its id is the same by construction).
    fn same_as(&self, t: &Transfer) -> bool {
        self.debit == t.debit
            && self.credit == t.credit
            && self.amount == t.amount
            && self.kind == t.kind
            && self.user_id == t.user_id
            && self.reservation_id == t.reservation_id
            && self.job_id == t.job_id
            && self.memo == t.memo
    }

    fn into_transfer(self, now: i64) -> Transfer {
        Transfer {
            id: self.id,
            seq: None,
            debit: self.debit,
            credit: self.credit,
            amount: self.amount,
            kind: self.kind,
            user_id: self.user_id,
            reservation_id: self.reservation_id,
            job_id: self.job_id,
            memo: self.memo,
            created_at: now,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResState {
    Pending,
    Settled,
    Released,
    Expired,
}

impl ResState {
    pub fn as_str(self) -> &'static str {
        match self {
            ResState::Pending => "pending",
            ResState::Settled => "settled",
            ResState::Released => "released",
            ResState::Expired => "expired",
        }
    }
}

/// A transfer a reservation makes. Its id is the reservation's id and the step's name
/// (`<id>/hold`, `<id>/settle`, `<id>/refund`, `<id>/release`; an expiry is a release whose
/// kind is `expire`), so a reservation's transfers are found from its id alone and each is
/// made at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStep {
    /// available → held, the reserved amount (kind `reserve`).
    Hold,
    /// held → revenue, what settling charged (kind `settle`); none if it charged nothing.
    Settle,
    /// held → available, what settling did not charge (kind `refund`); none if it charged all.
    Refund,
    /// held → available, all of it (kind `release`, or `expire`).
    Release,
}

impl ReservationStep {
    pub const ALL: [ReservationStep; 4] = [
        ReservationStep::Hold,
        ReservationStep::Settle,
        ReservationStep::Refund,
        ReservationStep::Release,
    ];

    fn name(self) -> &'static str {
        match self {
            ReservationStep::Hold => "hold",
            ReservationStep::Settle => "settle",
            ReservationStep::Refund => "refund",
            ReservationStep::Release => "release",
        }
    }

    /// The id of this step's transfer for `reservation`.
    pub fn id(self, reservation: &str) -> String {
        format!("{reservation}/{}", self.name())
    }

    /// The ids every step of these reservations' transfers would have: a reservation's
    /// transfers are found by primary key (there is no index on their `reservation_id`).
    fn ids_of(reservations: &[String]) -> Vec<String> {
        reservations
            .iter()
            .flat_map(|r| ReservationStep::ALL.map(|s| s.id(r)))
            .collect()
    }

    /// Which step of `reservation` a transfer with this id is, if it is one.
    pub fn of(transfer_id: &str, reservation: &str) -> Option<ReservationStep> {
        let name = transfer_id.strip_prefix(reservation)?.strip_prefix('/')?;
        ReservationStep::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A two-phase hold on a user's credits.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Reservation {
    pub id: String,
    pub user_id: String,
    pub amount: i64,
    /// What settling charged.
    pub settled: Option<i64>,
    pub state: String,
    pub job_id: Option<String>,
    /// `None`: held until its job ends.
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub closed_at: Option<i64>,
}

pub(crate) const RESERVATION_COLUMNS: &str =
    "id, user_id, amount, settled, state, job_id, expires_at, created_at, closed_at";

impl Reservation {
    pub fn state(&self) -> ResState {
        match self.state.as_str() {
            "settled" => ResState::Settled,
            "released" => ResState::Released,
            "expired" => ResState::Expired,
            _ => ResState::Pending,
        }
    }

    /// A transfer out of this reservation's held credits.
    fn spec(&self, step: ReservationStep, kind: &str, to: String, amount: i64) -> TransferSpec {
        TransferSpec {
            id: step.id(&self.id),
            debit: accounts::held(&self.user_id),
            credit: to,
            amount,
            kind: kind.to_owned(),
            user_id: Some(self.user_id.clone()),
            reservation_id: Some(self.id.clone()),
            job_id: self.job_id.clone(),
            memo: None,
        }
    }

    pub fn view(&self, transfers: &[Transfer]) -> Value {
        json!({
            "id": self.id,
            "amount": self.amount,
            "settled": self.settled,
            "state": self.state,
            "job_id": self.job_id,
            "expires_at": self.expires_at.map(rfc3339),
            "created_at": rfc3339(self.created_at),
            "closed_at": self.closed_at.map(rfc3339),
            "transfers": transfers.iter().map(Transfer::view).collect::<Vec<_>>(),
        })
    }
}

/// One ledger operation. Reservations follow TigerBeetle's pending transfers.
#[derive(Debug, Clone)]
pub enum Op {
    /// Moves credits; idempotent by transfer id.
    Transfer(TransferSpec),
    /// Holds `amount` of the user's available credits (available → held); idempotent by id.
    Reserve {
        id: String,
        user_id: String,
        amount: i64,
        expires_at: Option<i64>,
        job_id: Option<String>,
        /// The caller derived `id` from a row it inserted in this same transaction (a new
        /// job's id): no reservation can have it yet, so the batch does not read for one.
        first: bool,
    },
    /// Charges `amount` (all of it when `None`) to revenue and returns the rest. Settling a
    /// settled reservation changes nothing. `owner`: refuse unless it is this user's.
    Settle {
        id: String,
        amount: Option<i64>,
        owner: Option<String>,
        /// Charge at most what is held (a job's actual usage may exceed its estimate: the
        /// reservation is the most it can cost). Without it, more than held is refused.
        clamp: bool,
    },
    /// Returns all held credits. Releasing a released or expired reservation changes nothing.
    Release {
        id: String,
        expired: bool,
        owner: Option<String>,
    },
}

impl Op {
    /// Returns what reservation `id` holds (no owner check: the platform's own release).
    pub fn release(id: String) -> Op {
        Op::Release {
            id,
            expired: false,
            owner: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "insufficient credits: account {account} holds {balance} credits and {needed} are needed"
    )]
    InsufficientCredits {
        account: String,
        balance: i64,
        needed: i64,
    },
    #[error("transfer {0} already exists with different content")]
    TransferConflict(String),
    #[error("reservation {0} already exists with different content")]
    ReservationConflict(String),
    #[error("reservation not found")]
    NotFound,
    #[error("reservation {id} is already {state}")]
    Closed { id: String, state: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Applies `ops` in a transaction of their own. A batch that lost a race is run again, and
/// the second run sees the winner: Postgres aborted it to break a deadlock (accounts are locked
/// in one order, so this needs two batches creating the same new accounts at once), or another
/// process inserted the same new reservation or transfer id first (the rerun answers it as a
/// replay, or as a conflict if its content differs).
pub async fn run(db: &Db, ops: Vec<Op>) -> Result<Vec<Result<Done, LedgerError>>, DbError> {
    let mut tries = 0;
    loop {
        let attempt = async {
            let mut tx = db.begin().await?;
            let answers = execute(&mut tx, &ops, now_ms()).await?;
            tx.commit().await?;
            Ok::<_, DbError>(answers)
        };
        match attempt.await {
            Err(DbError::Sqlx(sqlx::Error::Database(e)))
                if tries < 3
                    && matches!(e.code().as_deref(), Some("40P01" | "40001" | "23505")) =>
            {
                tries += 1;
                tracing::debug!(error = %e, "ledger batch retried");
            }
            other => return other,
        }
    }
}

/// Group commit for ledger operations from many concurrent callers, in shards: operations on
/// different users go to different batchers, whose transactions run side by side (each locks
/// only its own accounts), and the operations waiting for one shard share one transaction.
#[derive(Clone)]
pub struct Writer {
    shards: Vec<Batcher<Op, Result<Done, LedgerError>>>,
}

impl Writer {
    /// Must be called inside a Tokio runtime. SQLite has one writer, so it gets one shard.
    pub fn spawn(db: &Db, shards: usize, max_batch: usize) -> Writer {
        let n = match db.backend() {
            crate::db::Backend::Sqlite => 1,
            crate::db::Backend::Postgres => shards.max(1),
        };
        let shards = (0..n)
            .map(|_| {
                Batcher::spawn_with(db.clone(), max_batch, |db: Db, ops: Vec<Op>| async move {
                    run(&db, ops).await
                })
            })
            .collect();
        Writer { shards }
    }

    pub async fn call(&self, op: Op) -> Result<Result<Done, LedgerError>, DbError> {
        use std::hash::{Hash, Hasher};
        let key = match &op {
            Op::Reserve { user_id, .. } => user_id.as_str(),
            Op::Settle { id, .. } | Op::Release { id, .. } => id.as_str(),
            Op::Transfer(t) => t.user_id.as_deref().unwrap_or(&t.id),
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let shard = (h.finish() % self.shards.len() as u64) as usize;
        self.shards[shard].call(op).await
    }
}

/// Applies one operation in a transaction of its own.
pub async fn run_one(db: &Db, op: Op) -> Result<Done, LedgerError> {
    run(db, vec![op])
        .await?
        .pop()
        .unwrap_or_else(|| Err(LedgerError::Invalid("no answer".to_owned())))
}

pub(crate) async fn transfers_of_reservations(
    tx: &mut Tx,
    ids: &[String],
) -> Result<Vec<Transfer>, DbError> {
    let mut out = Vec::new();
    // Four step ids per reservation, bound one by one: SQLite allows 32,766 bound values.
    for chunk in ids.chunks(1000) {
        let steps = ReservationStep::ids_of(chunk);
        let rows: Vec<Transfer> = with_tx!(tx, conn => {
            let mut qb = sqlx::QueryBuilder::new(format!(
                "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE id IN ("
            ));
            let mut list = qb.separated(", ");
            for id in &steps {
                list.push_bind(id);
            }
            qb.push(") ORDER BY created_at, id");
            qb.build_query_as().fetch_all(&mut *conn).await?
        });
        out.extend(rows.into_iter().filter(|t| {
            t.reservation_id
                .as_deref()
                .is_some_and(|r| ReservationStep::of(&t.id, r).is_some())
        }));
    }
    Ok(out)
}

/// Every hold still pending for these jobs: each job's own, and any its steps made (an agent
/// task's) that a run which died mid-step left behind. In id order, the ledger's lock order.
pub(crate) async fn pending_of_jobs(
    tx: &mut Tx,
    job_ids: &[String],
) -> Result<Vec<String>, DbError> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = with_tx!(tx, conn => {
        let mut qb = sqlx::QueryBuilder::new(
            "SELECT id FROM ledger_reservations WHERE state = 'pending' AND job_id IN (",
        );
        let mut list = qb.separated(", ");
        for id in job_ids {
            list.push_bind(id);
        }
        qb.push(") ORDER BY id");
        qb.build_query_scalar().fetch_all(&mut *conn).await?
    });
    Ok(ids)
}

/// The holds a job has made so far (one per run) and the largest of them: what a new run of
/// the job holds again.
pub(crate) async fn holds_of_job(tx: &mut Tx, job_id: &str) -> Result<(i64, i64), DbError> {
    let sql =
        "SELECT COUNT(*), COALESCE(MAX(amount), 0) FROM ledger_reservations WHERE job_id = $1";
    let found: (i64, i64) = with_tx!(tx, conn => {
        sqlx::query_as(sql).bind(job_id).fetch_one(&mut *conn).await?
    });
    Ok(found)
}

/// Postgres: the text of a query that locks, in id order, the reservations whose ids the
/// query `ids` yields, and reads them (as [`Reservation`]s): a part of another capability's
/// statement, so that its rows and the reservations they settle are locked in one round trip.
pub(crate) fn pg_lock_reservations(ids: &str) -> String {
    format!(
        "SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE id = ANY(ARRAY({ids})) \
         ORDER BY id FOR UPDATE"
    )
}

/// A user's available and held credits.
pub async fn balance(db: &Db, user_id: &str) -> Result<(i64, i64), DbError> {
    let (available, held) = (accounts::available(user_id), accounts::held(user_id));
    let sql = "SELECT id, balance FROM ledger_accounts WHERE id IN ($1, $2)";
    let rows: Vec<(String, i64)> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(&available).bind(&held).fetch_all(pool).await?
    });
    let get = |id: &str| rows.iter().find(|(a, _)| a == id).map_or(0, |(_, b)| *b);
    Ok((get(&available), get(&held)))
}

/// A reservation, if it is this user's (`owner: None` for any).
pub async fn reservation(
    db: &Db,
    id: &str,
    owner: Option<&str>,
) -> Result<Option<(Reservation, Vec<Transfer>)>, DbError> {
    let sql = format!("SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE id = $1");
    let r: Option<Reservation> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await?
    });
    let Some(r) = r.filter(|r| owner.is_none_or(|o| o == r.user_id)) else {
        return Ok(None);
    };
    // By primary key: a reservation's transfers have its steps' ids.
    let [a, b, c, d] = ReservationStep::ALL.map(|s| s.id(id));
    let sql = format!(
        "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE id IN ($1, $2, $3, $4) \
         AND reservation_id = $5 ORDER BY created_at, id"
    );
    let transfers: Vec<Transfer> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&a)
            .bind(&b)
            .bind(&c)
            .bind(&d)
            .bind(id)
            .fetch_all(pool)
            .await?
    });
    Ok(Some((r, transfers)))
}

/// Filters for a user's transfer history, newest first.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub kind: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// The previous page's `next_cursor`: `created_at:id` of its last transfer.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

pub async fn history(
    db: &Db,
    user_id: &str,
    f: &HistoryFilter,
) -> Result<(Vec<Transfer>, Option<String>), DbError> {
    let sql = format!(
        "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE user_id = $1 \
         AND ($2 IS NULL OR kind = $2) AND ($3 IS NULL OR created_at >= $3) \
         AND ($4 IS NULL OR created_at < $4) \
         AND ($5 IS NULL OR created_at < $5 OR (created_at = $5 AND id < $6)) \
         ORDER BY created_at DESC, id DESC LIMIT $7"
    );
    let limit = f.limit.clamp(1, 200) as i64;
    let (before_at, before_id) = match &f.before {
        Some((at, id)) => (Some(*at), Some(id.clone())),
        None => (None, None),
    };
    let mut rows: Vec<Transfer> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(&f.kind)
            .bind(f.since_ms)
            .bind(f.until_ms)
            .bind(before_at)
            .bind(before_id)
            .bind(limit + 1)
            .fetch_all(pool)
            .await?
    });
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|t| format!("{}:{}", t.created_at, t.id))
    } else {
        None
    };
    Ok((rows, next))
}

/// What a job cost: its reservations and every transfer it made.
pub async fn job_cost(db: &Db, job_id: &str) -> Result<Value, DbError> {
    let sql = format!(
        "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE job_id = $1 ORDER BY created_at, id"
    );
    let transfers: Vec<Transfer> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(job_id).fetch_all(pool).await?
    });
    let sql = "SELECT amount, state, settled FROM ledger_reservations WHERE job_id = $1";
    let holds: Vec<(i64, String, Option<i64>)> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(job_id).fetch_all(pool).await?
    });
    let cost = reconcile::JobCost::of_reservations(
        holds.iter().map(|(a, s, n)| (*a, s.as_str(), *n)),
        transfers.len(),
    );
    Ok(json!({
        "reserved": cost.reserved,
        "settled": cost.settled,
        "transfers": transfers.iter().map(Transfer::view).collect::<Vec<_>>(),
    }))
}

/// Usage (credits settled) by UTC day and by job kind, since `since_ms`.
pub async fn analytics(db: &Db, user_id: &str, since_ms: i64) -> Result<Value, DbError> {
    let sql = "SELECT t.created_at, t.amount, j.kind FROM ledger_transfers t \
        LEFT JOIN tally_jobs j ON j.id = t.job_id \
        WHERE t.user_id = $1 AND t.kind = 'settle' AND t.created_at >= $2";
    let rows: Vec<(i64, i64, Option<String>)> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(user_id).bind(since_ms).fetch_all(pool).await?
    });
    let mut by_day: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
    let mut by_kind: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
    let mut total = 0i64;
    for (at, amount, kind) in rows {
        let day = rfc3339(at).get(..10).unwrap_or_default().to_owned();
        let d = by_day.entry(day).or_default();
        d.0 += amount;
        d.1 += 1;
        let k = by_kind
            .entry(kind.unwrap_or_else(|| "reservation".to_owned()))
            .or_default();
        k.0 += amount;
        k.1 += 1;
        total += amount;
    }
    let rows = |m: std::collections::BTreeMap<String, (i64, i64)>, key: &str| {
        m.into_iter()
            .map(
                |(k, (credits, charges))| json!({ key: k, "credits": credits, "charges": charges }),
            )
            .collect::<Vec<_>>()
    };
    Ok(json!({
        "since": rfc3339(since_ms),
        "total": total,
        "by_day": rows(by_day, "day"),
        "by_kind": rows(by_kind, "kind"),
    }))
}
