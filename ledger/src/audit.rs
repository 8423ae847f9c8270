//! The streaming auditor shared by the database verify command and [`crate::export`].
//!
//! Feed it the signed checkpoints, then every log entry in index order, then any committed
//! transfers not yet in the log, then call [`Auditor::finish`]. It recomputes the Merkle tree
//! and every balance, and reports the first problem as a [`Finding`]. After a finding the
//! auditor's state is unspecified: stop and report it.

use crate::merkle::Frontier;
use crate::note::{self, VerifierKey};
use crate::{Entry, Error, Hash, accounts};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::BTreeMap;

/// A problem found by the [`Auditor`]. Its `Display` is a one-line explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Finding {
    /// An entry came after entries with higher or equal indexes (duplicated or reordered).
    #[error(
        "entry {index} is out of order: expected entry {expected} next (an entry was duplicated, inserted or reordered)"
    )]
    EntryOutOfOrder {
        /// The index of the entry found.
        index: u64,
        /// The index expected at that point.
        expected: u64,
    },
    /// An index was skipped.
    #[error("entry {index} is missing: the next stored entry is {next}")]
    EntryMissing {
        /// The first index missing.
        index: u64,
        /// The index of the entry found in its place.
        next: u64,
    },
    /// An entry is malformed or overflows a balance.
    #[error("entry {index} is invalid: {why}")]
    BadEntry {
        /// The entry's index.
        index: u64,
        /// What is wrong.
        why: String,
    },
    /// An entry does not hash to the leaf stored for it.
    #[error("entry {index} was changed: its hash does not match the log (transfer {id})")]
    LeafMismatch {
        /// The entry's index.
        index: u64,
        /// The entry's transfer id.
        id: String,
    },
    /// An entry takes an account that may not be overdrawn below zero.
    #[error("entry {index} overdraws {account}: its balance becomes {balance}")]
    NegativeBalance {
        /// The entry's index.
        index: u64,
        /// The overdrawn account.
        account: String,
        /// Its balance after the entry.
        balance: i64,
    },
    /// A checkpoint note is malformed or not signed by a trusted key.
    #[error("checkpoint at size {size}: no valid signature from a trusted key: {why}")]
    CheckpointSignature {
        /// The size the checkpoint is stored under.
        size: u64,
        /// Why it does not verify.
        why: String,
    },
    /// A validly signed checkpoint does not match how it is stored (size or origin).
    #[error("checkpoint at size {size} was tampered with: {why}")]
    CheckpointTampered {
        /// The size the checkpoint is stored under.
        size: u64,
        /// What does not match.
        why: String,
    },
    /// The entries do not hash to a checkpoint's signed root.
    #[error(
        "checkpoint at size {size}: the entries do not hash to its signed root (an entry before index {size} was changed, inserted, removed or reordered)"
    )]
    CheckpointRoot {
        /// The checkpoint's size.
        size: u64,
    },
    /// A checkpoint covers more entries than the log has.
    #[error(
        "checkpoint at size {size}: the log has only {entries} entries (entries were removed from its end)"
    )]
    CheckpointBeyondLog {
        /// The checkpoint's size.
        size: u64,
        /// The number of entries in the log.
        entries: u64,
    },
    /// The balances do not sum to zero.
    #[error("the balances of all accounts sum to {sum} instead of 0")]
    SumNotZero {
        /// The sum (saturated to the `i64` range).
        sum: i64,
    },
    /// A stored balance differs from the replayed one.
    #[error("account {account}: stored balance {stored}, replay of the entries gives {replayed}")]
    BalanceMismatch {
        /// The account.
        account: String,
        /// The stored balance (0 if not stored).
        stored: i64,
        /// The balance from replaying the entries (0 if never touched).
        replayed: i64,
    },
    /// A reservation's stored row (amount, state, settled amount, user, job) differs from what
    /// the transfers that made and closed it say. Found by the database audit only: an export
    /// holds the transfers, not the reservations.
    #[error("reservation {reservation} does not match its transfers: {why}")]
    ReservationMismatch {
        /// The reservation's id.
        reservation: String,
        /// What differs.
        why: String,
    },
    /// A reservation has no hold transfer: no transfer made it.
    #[error("reservation {reservation} has no hold transfer ({reservation}/hold)")]
    ReservationWithoutHold {
        /// The reservation's id.
        reservation: String,
    },
    /// A transfer names a reservation that does not exist or did not make it.
    #[error("transfer {id} names reservation {reservation}, {why}")]
    TransferReservation {
        /// The transfer's id.
        id: String,
        /// The reservation it names.
        reservation: String,
        /// What is wrong.
        why: String,
    },
    /// A job's cost as the API shows it, or the reservation its outcome settles, differs from
    /// what its transfers say.
    #[error("job {job} does not match its transfers: {why}")]
    JobCost {
        /// The job's id.
        job: String,
        /// What differs.
        why: String,
    },
}

/// The summary of a successful audit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Log entries replayed.
    pub entries: u64,
    /// Committed transfers not yet in the log, replayed into the balances only.
    pub pending: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// Accounts with a balance.
    pub accounts: u64,
    /// The tree size (equal to `entries`).
    pub size: u64,
    /// The Merkle root of all entries, base64.
    pub root: String,
    /// The size of the largest checkpoint verified, if any.
    pub latest_checkpoint: Option<u64>,
    /// Reservations checked against their transfers (by the database audit only; 0 here).
    pub reservations: u64,
    /// Jobs whose shown cost was checked against their transfers (the database audit only).
    pub jobs: u64,
}

/// Replays a log and checks it; see the [module docs](self).
#[derive(Debug)]
pub struct Auditor {
    keyring: Vec<VerifierKey>,
    origin: Option<String>,
    frontier: Frontier,
    balances: BTreeMap<String, i64>,
    /// Signed roots of checkpoints beyond the entries replayed so far, by size.
    unchecked: BTreeMap<u64, Vec<Hash>>,
    checkpoints: u64,
    latest_checkpoint: Option<u64>,
    pending: u64,
    buf: Vec<u8>,
}

impl Auditor {
    /// An auditor trusting `keyring`; if `origin` is given, every checkpoint must have it.
    pub fn new(keyring: Vec<VerifierKey>, origin: Option<String>) -> Auditor {
        Auditor {
            keyring,
            origin,
            frontier: Frontier::new(),
            balances: BTreeMap::new(),
            unchecked: BTreeMap::new(),
            checkpoints: 0,
            latest_checkpoint: None,
            pending: 0,
            buf: Vec::with_capacity(256),
        }
    }

    /// Adds a signed checkpoint stored under `stored_size`. The note must verify with the
    /// keyring and be for that size (and origin); its root is compared once the entries reach
    /// its size. Add checkpoints before pushing the entries they cover (a checkpoint at the
    /// current size is checked at once; one below it is an error).
    pub fn add_checkpoint(&mut self, stored_size: u64, note: &str) -> Result<(), Finding> {
        let tampered = |why: String| Finding::CheckpointTampered {
            size: stored_size,
            why,
        };
        let (cp, _) = note::open(note, &self.keyring).map_err(|e| match e {
            Error::BadCheckpoint(_) => tampered(e.to_string()),
            _ => Finding::CheckpointSignature {
                size: stored_size,
                why: e.to_string(),
            },
        })?;
        if let Some(origin) = &self.origin
            && cp.origin != *origin
        {
            return Err(tampered(format!(
                "it is signed for log {:?}, not {origin:?}",
                cp.origin
            )));
        }
        if cp.size != stored_size {
            return Err(tampered(format!("it is signed for size {}", cp.size)));
        }
        let replayed = self.frontier.size();
        if cp.size < replayed {
            return Err(tampered(format!(
                "it was added after {replayed} entries were replayed, so its root cannot be checked"
            )));
        }
        self.checkpoints += 1;
        if cp.size == replayed {
            self.check_root(cp.size, std::slice::from_ref(&cp.root))
        } else {
            self.unchecked.entry(cp.size).or_default().push(cp.root);
            Ok(())
        }
    }

    fn check_root(&mut self, size: u64, roots: &[Hash]) -> Result<(), Finding> {
        let root = self.frontier.root();
        if roots.iter().any(|r| *r != root) {
            return Err(Finding::CheckpointRoot { size });
        }
        self.latest_checkpoint = self.latest_checkpoint.max(Some(size));
        Ok(())
    }

    /// Replays the next log entry. `stored_leaf`, if given, is the leaf hash the log stores
    /// for it and must match the entry.
    pub fn push(&mut self, entry: &Entry, stored_leaf: Option<&Hash>) -> Result<(), Finding> {
        let expected = self.frontier.size();
        if entry.index < expected {
            return Err(Finding::EntryOutOfOrder {
                index: entry.index,
                expected,
            });
        }
        if entry.index > expected {
            return Err(Finding::EntryMissing {
                index: expected,
                next: entry.index,
            });
        }
        entry.check().map_err(|why| Finding::BadEntry {
            index: entry.index,
            why,
        })?;
        let leaf = entry.leaf_hash_with(&mut self.buf);
        if stored_leaf.is_some_and(|stored| *stored != leaf) {
            return Err(Finding::LeafMismatch {
                index: entry.index,
                id: entry.id.clone(),
            });
        }
        self.frontier.append_with(leaf, |_, _| {});
        self.apply(entry)?;
        let size = self.frontier.size();
        if let Some(roots) = self.unchecked.remove(&size) {
            self.check_root(size, &roots)?;
        }
        Ok(())
    }

    /// Replays a committed transfer that is not yet in the log: balances only. Its index is
    /// not checked (it is only used to name the entry in a finding).
    pub fn push_pending(&mut self, entry: &Entry) -> Result<(), Finding> {
        entry.check().map_err(|why| Finding::BadEntry {
            index: entry.index,
            why,
        })?;
        self.apply(entry)?;
        self.pending += 1;
        Ok(())
    }

    /// Moves the entry's amount from its debit to its credit account.
    fn apply(&mut self, entry: &Entry) -> Result<(), Finding> {
        let balance = |account: &str| self.balances.get(account).copied().unwrap_or(0);
        let overflow = |account: &str| Finding::BadEntry {
            index: entry.index,
            why: format!("the balance of {account} overflows"),
        };
        let debit = balance(&entry.debit)
            .checked_sub(entry.amount)
            .ok_or_else(|| overflow(&entry.debit))?;
        let credit = balance(&entry.credit)
            .checked_add(entry.amount)
            .ok_or_else(|| overflow(&entry.credit))?;
        self.set(&entry.debit, debit);
        self.set(&entry.credit, credit);
        if debit < 0 && accounts::no_overdraft(&entry.debit) {
            return Err(Finding::NegativeBalance {
                index: entry.index,
                account: entry.debit.clone(),
                balance: debit,
            });
        }
        Ok(())
    }

    fn set(&mut self, account: &str, value: i64) {
        match self.balances.get_mut(account) {
            Some(slot) => *slot = value,
            None => {
                self.balances.insert(account.to_owned(), value);
            }
        }
    }

    /// The number of log entries replayed so far.
    pub fn entries(&self) -> u64 {
        self.frontier.size()
    }

    /// The replayed balances so far.
    pub fn balances(&self) -> &BTreeMap<String, i64> {
        &self.balances
    }

    /// Final checks: no checkpoint beyond the log, balances summing to zero, and, if given,
    /// `stored_balances` equal to the replayed ones (a missing account counts as 0).
    pub fn finish(
        self,
        stored_balances: Option<&BTreeMap<String, i64>>,
    ) -> Result<Report, Finding> {
        let entries = self.frontier.size();
        if let Some((&size, _)) = self.unchecked.first_key_value() {
            return Err(Finding::CheckpointBeyondLog { size, entries });
        }
        let sum: i128 = self.balances.values().map(|&b| i128::from(b)).sum();
        if sum != 0 {
            let sum = i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX });
            return Err(Finding::SumNotZero { sum });
        }
        if let Some(stored) = stored_balances {
            let mut accounts: Vec<&String> = stored.keys().chain(self.balances.keys()).collect();
            accounts.sort_unstable();
            accounts.dedup();
            for account in accounts {
                let stored = stored.get(account).copied().unwrap_or(0);
                let replayed = self.balances.get(account).copied().unwrap_or(0);
                if stored != replayed {
                    return Err(Finding::BalanceMismatch {
                        account: account.clone(),
                        stored,
                        replayed,
                    });
                }
            }
        }
        Ok(Report {
            entries,
            pending: self.pending,
            checkpoints: self.checkpoints,
            accounts: self.balances.len() as u64,
            size: entries,
            root: B64.encode(self.frontier.root()),
            latest_checkpoint: self.latest_checkpoint,
            reservations: 0,
            jobs: 0,
        })
    }
}
