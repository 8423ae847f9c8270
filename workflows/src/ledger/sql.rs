//! The ledger's batch statements, per dialect. On Postgres each statement binds whole arrays
//! (`= ANY($1)`, `UNNEST`), so its text never changes with the batch size; SQLite prepares
//! statements cheaply and gets multi-row `VALUES` lists.
//!
//! Some Postgres statements that find rows by key are planned at each batch
//! (`persistent(false)`), not once per connection: a connection's cached generic plan, made
//! while a table was new and small, goes on scanning the whole table (comparing every row with
//! every key, or hashing it for a join) as the table grows, until autovacuum next analyzes it.
//! On a new database that was half of `tally bench --ledger`'s time, and the signer's
//! `set_seqs` read every transfer ever made. An unnamed statement costs a second round trip
//! (sqlx describes it before it binds) and its planning, so only the statements whose cached
//! plan went wrong are planned each time: the reservations' lock and `set_seqs`. The accounts' lock (its generic plan kept the primary key) and the batch's
//! write (planning its three writes cost about 10%) stay prepared.

use tally_ledger::{Hash, NodeId, accounts};

use super::{RESERVATION_COLUMNS, Reservation, TRANSFER_COLUMNS, Transfer};
use crate::{
    DbError,
    db::{Tx, sqlite_select_in},
};

/// Rows per multi-row SQLite statement (SQLite allows 32,766 bound values).
const CHUNK: usize = 1000;

/// The reservations with these ids, locked until the transaction ends.
pub(super) async fn reservations_for_update(
    tx: &mut Tx,
    ids: &[&str],
) -> Result<Vec<Reservation>, DbError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    match tx {
        Tx::Postgres(tx) => {
            let sql = format!(
                "SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            );
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .persistent(false)
                .bind(ids)
                .fetch_all(&mut **tx)
                .await?)
        }
        Tx::Sqlite(tx) => {
            let head =
                format!("SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE id IN (");
            sqlite_select_in(tx, &head, ids).await
        }
    }
}

/// Creates the accounts that do not exist yet, then locks all of them in id order (`ids` is
/// sorted) and returns their balances. Accounts known to exist are only locked: that saves a
/// statement (on Postgres, a round trip) in nearly every batch.
pub(super) async fn lock_accounts(
    tx: &mut Tx,
    ids: &[String],
    now: i64,
) -> Result<Vec<(String, i64)>, DbError> {
    if known::all(ids) {
        let rows = lock_existing(tx, ids).await?;
        if rows.len() == ids.len() {
            return Ok(rows);
        }
        // Only if the database was replaced under this process (accounts are never deleted,
        // and only committed ones are remembered): create what is missing and lock it too.
    }
    let created = create_missing(tx, ids, now).await?;
    let rows = lock_existing(tx, ids).await?;
    // Only accounts some other transaction committed: one created here exists only if this
    // transaction commits (a later batch that finds it remembers it).
    let existed: Vec<String> = ids
        .iter()
        .filter(|id| !created.contains(id))
        .cloned()
        .collect();
    known::remember(&existed);
    Ok(rows)
}

/// Creates the accounts among `ids` (sorted) that do not exist yet; returns those it created.
async fn create_missing(tx: &mut Tx, ids: &[String], now: i64) -> Result<Vec<String>, DbError> {
    let mut created = Vec::new();
    match tx {
        Tx::Postgres(tx) => {
            let floors: Vec<bool> = ids.iter().map(|a| accounts::no_overdraft(a)).collect();
            created = sqlx::query_scalar(
                "INSERT INTO ledger_accounts (id, balance, no_overdraft, updated_at) \
                 SELECT id, 0, floor, $3 FROM UNNEST($1::text[], $2::bool[]) AS v (id, floor) \
                 ORDER BY id ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .bind(ids)
            .bind(&floors)
            .bind(now)
            .fetch_all(&mut **tx)
            .await?;
        }
        Tx::Sqlite(tx) => {
            for chunk in ids.chunks(CHUNK) {
                let mut qb = sqlx::QueryBuilder::new(
                    "INSERT INTO ledger_accounts (id, balance, no_overdraft, updated_at) ",
                );
                qb.push_values(chunk, |mut b, id| {
                    b.push_bind(id)
                        .push_bind(0i64)
                        .push_bind(accounts::no_overdraft(id))
                        .push_bind(now);
                });
                qb.push(" ON CONFLICT (id) DO NOTHING RETURNING id");
                let ids: Vec<String> = qb.build_query_scalar().fetch_all(&mut **tx).await?;
                created.extend(ids);
            }
        }
    }
    Ok(created)
}

/// The existing accounts among `ids` (sorted), locked in id order, with their balances.
async fn lock_existing(tx: &mut Tx, ids: &[String]) -> Result<Vec<(String, i64)>, DbError> {
    match tx {
        Tx::Postgres(tx) => Ok(sqlx::query_as(
            "SELECT id, balance FROM ledger_accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?),
        Tx::Sqlite(tx) => {
            // SQLite has one writer at a time: the transaction already excludes the others.
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let head = "SELECT id, balance FROM ledger_accounts WHERE id IN (";
            sqlite_select_in(tx, head, &ids).await
        }
    }
}

/// The users' accounts this process has seen exist, and the platform's (a migration makes
/// them). Accounts are never deleted, and a user's account names the user's id (a UUID), so
/// one set serves every database the process talks to. Other accounts (a payment rail's
/// clearing account) are not remembered. A wrong answer costs only a statement:
/// [`lock_accounts`] finds the account missing and creates it.
mod known {
    use std::{
        collections::HashSet,
        sync::{LazyLock, Mutex},
    };

    use tally_ledger::accounts;

    /// Past this many, the set starts again (a few dozen bytes each).
    const MAX: usize = 200_000;

    static SEEN: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Mutex::default);

    pub(super) fn all(ids: &[String]) -> bool {
        let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .all(|id| accounts::PLATFORM.contains(&id.as_str()) || seen.contains(id))
    }

    pub(super) fn remember(ids: &[String]) {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() + ids.len() > MAX {
            seen.clear();
        }
        seen.extend(ids.iter().filter(|id| id.starts_with("user:")).cloned());
    }
}

/// The stored transfers with these ids.
pub(super) async fn transfers_by_id(tx: &mut Tx, ids: &[&str]) -> Result<Vec<Transfer>, DbError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    match tx {
        Tx::Postgres(tx) => {
            // A join, not `id = ANY($1)`: the generic plan of the latter may leave the
            // primary key for a scan once the table grew.
            let sql = format!(
                "SELECT {TRANSFER_COLUMNS} FROM UNNEST($1::text[]) AS v (vid) JOIN ledger_transfers ON id = vid"
            );
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(ids)
                .fetch_all(&mut **tx)
                .await?)
        }
        Tx::Sqlite(tx) => {
            let head = format!("SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE id IN (");
            sqlite_select_in(tx, &head, ids).await
        }
    }
}

/// Writes a batch: its new transfers (in the order they were made, under one new place in the
/// order of transfers), its new and changed reservations and the new balances of its accounts.
/// On Postgres this is one statement: a batch's writes make one round trip, not four.
pub(super) async fn write_batch(
    tx: &mut Tx,
    ts: &[Transfer],
    rs: &[&Reservation],
    balances: &[(&String, i64)],
    now: i64,
) -> Result<(), DbError> {
    let pg = match tx {
        Tx::Postgres(pg) => pg,
        Tx::Sqlite(lite) => return sqlite_write_batch(lite, ts, rs, balances, now).await,
    };
    let col = |f: fn(&Transfer) -> &str| ts.iter().map(f).collect::<Vec<&str>>();
    let opt = |f: fn(&Transfer) -> Option<&str>| ts.iter().map(f).collect::<Vec<_>>();
    let text = |f: fn(&Reservation) -> &str| rs.iter().map(|r| f(r)).collect::<Vec<_>>();
    let int = |f: fn(&Reservation) -> Option<i64>| rs.iter().map(|r| f(r)).collect::<Vec<_>>();
    // The order number is drawn only if there are transfers (the subquery runs for the first
    // row), while this transaction holds every account the batch touches.
    // Prepared (see the module's note): planning it at every batch cost about 10%.
    sqlx::query(
        "WITH t AS (INSERT INTO ledger_transfers (id, debit, credit, amount, kind, user_id, \
         reservation_id, job_id, memo, created_at, ord, pos) \
         SELECT id, debit, credit, amount, kind, user_id, reservation_id, job_id, memo, \
         created_at, (SELECT nextval('ledger_order')), (pos - 1)::int FROM UNNEST($1::text[], \
         $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], \
         $9::text[], $10::bigint[]) WITH ORDINALITY AS v (id, debit, credit, amount, kind, \
         user_id, reservation_id, job_id, memo, created_at, pos)), \
         r AS (INSERT INTO ledger_reservations (id, user_id, amount, settled, state, job_id, \
         expires_at, created_at, closed_at) \
         SELECT * FROM UNNEST($11::text[], $12::text[], $13::bigint[], $14::bigint[], \
         $15::text[], $16::text[], $17::bigint[], $18::bigint[], $19::bigint[]) \
         ON CONFLICT (id) DO UPDATE SET settled = excluded.settled, state = excluded.state, \
         closed_at = excluded.closed_at) \
         UPDATE ledger_accounts SET balance = v.balance, updated_at = $22 \
         FROM UNNEST($20::text[], $21::bigint[]) AS v (id, balance) WHERE ledger_accounts.id = v.id",
    )
    .bind(col(|t| &t.id))
    .bind(col(|t| &t.debit))
    .bind(col(|t| &t.credit))
    .bind(ts.iter().map(|t| t.amount).collect::<Vec<i64>>())
    .bind(col(|t| &t.kind))
    .bind(opt(|t| t.user_id.as_deref()))
    .bind(opt(|t| t.reservation_id.as_deref()))
    .bind(opt(|t| t.job_id.as_deref()))
    .bind(opt(|t| t.memo.as_deref()))
    .bind(ts.iter().map(|t| t.created_at).collect::<Vec<i64>>())
    .bind(text(|r| &r.id))
    .bind(text(|r| &r.user_id))
    .bind(int(|r| Some(r.amount)))
    .bind(int(|r| r.settled))
    .bind(text(|r| &r.state))
    .bind(rs.iter().map(|r| r.job_id.as_deref()).collect::<Vec<_>>())
    .bind(int(|r| r.expires_at))
    .bind(int(|r| Some(r.created_at)))
    .bind(int(|r| r.closed_at))
    .bind(balances.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
    .bind(balances.iter().map(|(_, b)| *b).collect::<Vec<i64>>())
    .bind(now)
    .execute(&mut **pg)
    .await?;
    Ok(())
}

/// [`write_batch`] on SQLite: a statement per table (and per chunk of rows); SQLite runs in
/// this process, so statements cost no round trip.
async fn sqlite_write_batch(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    ts: &[Transfer],
    rs: &[&Reservation],
    balances: &[(&String, i64)],
    now: i64,
) -> Result<(), DbError> {
    if !ts.is_empty() {
        // The batch's place in the order of transfers, drawn while this transaction holds the
        // database (see the `ledger_transfers` migration).
        let ord: i64 = sqlx::query_scalar(
            "UPDATE ledger_order SET next = next + 1 WHERE id = 1 RETURNING next",
        )
        .fetch_one(&mut **tx)
        .await?;
        for (c, chunk) in ts.chunks(CHUNK).enumerate() {
            let mut qb = sqlx::QueryBuilder::new(
                "INSERT INTO ledger_transfers (id, debit, credit, amount, kind, user_id, \
                 reservation_id, job_id, memo, created_at, ord, pos) ",
            );
            let mut pos = (c * CHUNK) as i32;
            qb.push_values(chunk, |mut b, t| {
                pos += 1;
                b.push_bind(&t.id)
                    .push_bind(&t.debit)
                    .push_bind(&t.credit)
                    .push_bind(t.amount)
                    .push_bind(&t.kind)
                    .push_bind(&t.user_id)
                    .push_bind(&t.reservation_id)
                    .push_bind(&t.job_id)
                    .push_bind(&t.memo)
                    .push_bind(t.created_at)
                    .push_bind(ord)
                    .push_bind(pos - 1);
            });
            qb.build().execute(&mut **tx).await?;
        }
    }
    if !rs.is_empty() {
        const UPSERT: &str = " ON CONFLICT (id) DO UPDATE SET settled = excluded.settled, \
            state = excluded.state, closed_at = excluded.closed_at";
        for chunk in rs.chunks(CHUNK) {
            let mut qb = sqlx::QueryBuilder::new(
                "INSERT INTO ledger_reservations (id, user_id, amount, settled, state, job_id, \
                 expires_at, created_at, closed_at) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(&r.id)
                    .push_bind(&r.user_id)
                    .push_bind(r.amount)
                    .push_bind(r.settled)
                    .push_bind(&r.state)
                    .push_bind(&r.job_id)
                    .push_bind(r.expires_at)
                    .push_bind(r.created_at)
                    .push_bind(r.closed_at);
            });
            qb.push(UPSERT);
            qb.build().execute(&mut **tx).await?;
        }
    }
    if !balances.is_empty() {
        for chunk in balances.chunks(CHUNK) {
            let mut qb = sqlx::QueryBuilder::new("WITH v (vid, vbalance) AS (");
            qb.push_values(chunk, |mut b, (id, balance)| {
                b.push_bind(*id).push_bind(*balance);
            });
            qb.push(") UPDATE ledger_accounts SET balance = v.vbalance, updated_at = ");
            qb.push_bind(now);
            qb.push(" FROM v WHERE ledger_accounts.id = v.vid");
            qb.build().execute(&mut **tx).await?;
        }
    }
    Ok(())
}

/// Gives transfers their log indices.
pub(super) async fn set_seqs(tx: &mut Tx, seqs: &[(&str, i64)]) -> Result<(), DbError> {
    if seqs.is_empty() {
        return Ok(());
    }
    match tx {
        Tx::Postgres(tx) => {
            sqlx::query(
                "UPDATE ledger_transfers SET seq = v.seq \
                 FROM UNNEST($1::text[], $2::bigint[]) AS v (id, seq) WHERE ledger_transfers.id = v.id",
            )
            .persistent(false)
            .bind(seqs.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .bind(seqs.iter().map(|(_, s)| *s).collect::<Vec<i64>>())
            .execute(&mut **tx)
            .await?;
        }
        Tx::Sqlite(tx) => {
            for chunk in seqs.chunks(CHUNK) {
                let mut qb = sqlx::QueryBuilder::new("WITH v (vid, vseq) AS (");
                qb.push_values(chunk, |mut b, (id, seq)| {
                    b.push_bind(*id).push_bind(*seq);
                });
                qb.push(
                    ") UPDATE ledger_transfers SET seq = v.vseq FROM v WHERE ledger_transfers.id = v.vid",
                );
                qb.build().execute(&mut **tx).await?;
            }
        }
    }
    Ok(())
}

/// Stores complete subtrees of the log.
pub(super) async fn insert_nodes(tx: &mut Tx, nodes: &[(NodeId, Hash)]) -> Result<(), DbError> {
    if nodes.is_empty() {
        return Ok(());
    }
    match tx {
        Tx::Postgres(tx) => {
            sqlx::query(
                "INSERT INTO ledger_nodes (level, idx, hash) \
                 SELECT * FROM UNNEST($1::int[], $2::bigint[], $3::bytea[])",
            )
            .bind(
                nodes
                    .iter()
                    .map(|(id, _)| i32::from(id.level))
                    .collect::<Vec<_>>(),
            )
            .bind(
                nodes
                    .iter()
                    .map(|(id, _)| id.index as i64)
                    .collect::<Vec<_>>(),
            )
            .bind(nodes.iter().map(|(_, h)| h.to_vec()).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
        }
        Tx::Sqlite(tx) => {
            for chunk in nodes.chunks(CHUNK) {
                let mut qb =
                    sqlx::QueryBuilder::new("INSERT INTO ledger_nodes (level, idx, hash) ");
                qb.push_values(chunk, |mut b, (id, hash)| {
                    b.push_bind(i32::from(id.level))
                        .push_bind(id.index as i64)
                        .push_bind(hash.to_vec());
                });
                qb.build().execute(&mut **tx).await?;
            }
        }
    }
    Ok(())
}
