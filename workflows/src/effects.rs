//! Effects: what a job's outcome (or its submission) must also write, applied by the engine in
//! the transaction that stores it, so they commit exactly when it does and never otherwise.
//!
//! A capability plugs in through [`Table`]: the rows of its own tables that jobs stage (a chat
//! question with its job, a reply with its job's success), written with one statement per
//! table per batch, by the capability's own SQL. Besides rows, an outcome can stage ledger
//! operations (run with the job's own settlement, in one batch and in the global lock order)
//! and follow-up jobs, whose ids derive from the job and a name, so a retry or a second
//! delivery of an outcome never enqueues one twice.
//!
//! Lock order inside an outcome's transaction: the job rows (the outcome statement), then the
//! staged rows, table by table in the order of their names, then the follow-up jobs (new rows)
//! and their own staged rows, then the ledger's reservations and accounts.

use std::{any::Any, collections::BTreeMap, fmt};

use futures::future::BoxFuture;

use crate::{DbError, db::Tx, jobs::NewJob, ledger::Op};

/// A capability's table that jobs stage rows for.
pub trait Table: Send + Sync + 'static {
    type Row: Clone + fmt::Debug + Send + Sync + 'static;
    /// Names the table; tables are written in the order of their names.
    const NAME: &'static str;
    /// Writes the rows in `tx` (one statement per dialect for the batch). A row already
    /// stored (a second delivery) is kept as it is.
    fn write<'a>(tx: &'a mut Tx, rows: &'a [Self::Row]) -> BoxFuture<'a, Result<(), DbError>>;
    /// Deletes what [`Table::write`] wrote for these jobs: their submission was refused in the
    /// transaction that staged the rows.
    fn forget<'a>(tx: &'a mut Tx, job_ids: &'a [&'a str]) -> BoxFuture<'a, Result<(), DbError>>;
}

/// Rows of one [`Table`], with their type erased so the engine can carry any capability's.
pub struct Rows(Box<dyn AnyRows>);

impl Rows {
    pub fn of<T: Table>(rows: Vec<T::Row>) -> Rows {
        Rows(Box::new(TableRows::<T>(rows)))
    }

    pub fn table(&self) -> &'static str {
        self.0.table()
    }

    /// Writes these rows in `tx`.
    pub async fn write(&self, tx: &mut Tx) -> Result<(), DbError> {
        self.0.write(tx).await
    }

    /// Undoes [`Rows::write`] for these jobs (see [`Table::forget`]).
    pub async fn forget(&self, tx: &mut Tx, job_ids: &[&str]) -> Result<(), DbError> {
        self.0.forget(tx, job_ids).await
    }

    /// Gathers rows by table, so each table is written once per batch, in the order of the
    /// tables' names.
    pub fn grouped(all: impl IntoIterator<Item = Rows>) -> Vec<Rows> {
        let mut by_table: BTreeMap<&'static str, Rows> = BTreeMap::new();
        for rows in all {
            match by_table.remove(rows.table()) {
                None => {
                    by_table.insert(rows.table(), rows);
                }
                Some(mut group) => {
                    group.0.append(rows.0);
                    by_table.insert(group.table(), group);
                }
            }
        }
        by_table.into_values().collect()
    }
}

impl Clone for Rows {
    fn clone(&self) -> Rows {
        Rows(self.0.clone_box())
    }
}

impl fmt::Debug for Rows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.debug(f)
    }
}

trait AnyRows: Send + Sync {
    fn table(&self) -> &'static str;
    fn clone_box(&self) -> Box<dyn AnyRows>;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
    /// Appends `other`, which is of the same table.
    fn append(&mut self, other: Box<dyn AnyRows>);
    fn write<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<(), DbError>>;
    fn forget<'a>(
        &'a self,
        tx: &'a mut Tx,
        job_ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), DbError>>;
    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
}

struct TableRows<T: Table>(Vec<T::Row>);

impl<T: Table> AnyRows for TableRows<T> {
    fn table(&self) -> &'static str {
        T::NAME
    }
    fn clone_box(&self) -> Box<dyn AnyRows> {
        Box::new(TableRows::<T>(self.0.clone()))
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
    fn append(&mut self, other: Box<dyn AnyRows>) {
        // Only rows of the same table name are appended; two tables never share a name.
        if let Ok(other) = other.into_any().downcast::<TableRows<T>>() {
            self.0.extend(other.0);
        }
    }
    fn write<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<(), DbError>> {
        T::write(tx, &self.0)
    }
    fn forget<'a>(
        &'a self,
        tx: &'a mut Tx,
        job_ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), DbError>> {
        T::forget(tx, job_ids)
    }
    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple(T::NAME).field(&self.0).finish()
    }
}

/// A job to enqueue when an outcome is applied. Its id derives from the job that staged it and
/// `name` ([`crate::jobs::derived_id`]), so it is enqueued once however often the outcome is
/// delivered or retried.
#[derive(Debug, Clone)]
pub struct FollowUp {
    pub name: String,
    /// The job; its `id` is set by the engine. A follow-up holds no credits at submission
    /// (its `price` must be 0): what it costs it moves in its own outcome's ledger operations.
    pub job: NewJob,
}

/// What one outcome writes besides the job's own row.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    pub rows: Vec<Rows>,
    pub ledger: Vec<Op>,
    pub jobs: Vec<FollowUp>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.ledger.is_empty() && self.jobs.is_empty()
    }

    /// Stages a row of `T`.
    pub fn row<T: Table>(&mut self, row: T::Row) {
        self.rows.push(Rows::of::<T>(vec![row]));
    }

    /// Stages a ledger operation; its ids must derive from the job, so a second delivery
    /// moves nothing.
    pub fn ledger(&mut self, op: Op) {
        self.ledger.push(op);
    }

    /// Stages a follow-up job named `name` (unique among the job's follow-ups).
    pub fn follow_up(&mut self, name: impl Into<String>, job: NewJob) {
        self.jobs.push(FollowUp {
            name: name.into(),
            job,
        });
    }
}
