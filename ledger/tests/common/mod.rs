//! A small signed log shared by the integration tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tally_ledger::accounts::{self, GRANTS, REVENUE};
use tally_ledger::export::{self, CheckpointRecord};
use tally_ledger::{Checkpoint, Entry, Frontier, SignerKey};

pub const ORIGIN: &str = "example.com/tally";

pub struct Log {
    pub signer: SignerKey,
    pub entries: Vec<Entry>,
    /// `(stored size, signed note)`.
    pub checkpoints: Vec<(u64, String)>,
    pub balances: BTreeMap<String, i64>,
}

pub fn entry(index: u64, debit: &str, credit: &str, amount: i64, kind: &str) -> Entry {
    Entry {
        index,
        id: format!("t-{index}"),
        debit: debit.to_owned(),
        credit: credit.to_owned(),
        amount,
        kind: kind.to_owned(),
        user_id: None,
        reservation_id: None,
        job_id: None,
        memo: None,
        created_at_ms: 1_700_000_000_000 + index as i64,
    }
}

/// Three users, four transfers each (grant, reserve, settle, release), checkpoints every four
/// entries.
pub fn sample_log() -> Log {
    let signer = SignerKey::generate(ORIGIN).unwrap();
    let mut entries = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let (avail, held) = (accounts::available(user), accounts::held(user));
        for (debit, credit, amount, kind) in [
            (GRANTS, avail.as_str(), 1000, "grant"),
            (avail.as_str(), held.as_str(), 300, "reserve"),
            (held.as_str(), REVENUE, 200, "settle"),
            (held.as_str(), avail.as_str(), 100, "release"),
        ] {
            let mut e = entry(entries.len() as u64, debit, credit, amount, kind);
            e.user_id = Some(user.to_owned());
            entries.push(e);
        }
    }
    let mut frontier = Frontier::new();
    let mut checkpoints = Vec::new();
    let mut balances = BTreeMap::new();
    for e in &entries {
        frontier.append(e.leaf_hash());
        *balances.entry(e.debit.clone()).or_insert(0) -= e.amount;
        *balances.entry(e.credit.clone()).or_insert(0) += e.amount;
        if frontier.size().is_multiple_of(4) {
            let cp = Checkpoint {
                origin: ORIGIN.to_owned(),
                size: frontier.size(),
                root: frontier.root(),
            };
            checkpoints.push((cp.size, signer.sign(&cp)));
        }
    }
    Log {
        signer,
        entries,
        checkpoints,
        balances,
    }
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "tally-ledger-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn jsonl<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|item| serde_json::to_string(&item).unwrap() + "\n")
        .collect()
}

/// Writes `log` in the export format.
pub fn write_export(dir: &Path, log: &Log) {
    std::fs::write(dir.join(export::ENTRIES), jsonl(&log.entries)).unwrap();
    let records = log.checkpoints.iter().map(|(size, note)| CheckpointRecord {
        size: *size,
        note: note.clone(),
    });
    std::fs::write(dir.join(export::CHECKPOINTS), jsonl(records)).unwrap();
    let keys = format!("# trusted keys\n\n{}\n", log.signer.verifier().encode());
    std::fs::write(dir.join(export::KEYS), keys).unwrap();
    std::fs::write(
        dir.join(export::BALANCES),
        serde_json::to_string_pretty(&log.balances).unwrap(),
    )
    .unwrap();
}
