//! The streaming auditor.

mod common;

use common::{ORIGIN, entry, sample_log};
use std::collections::BTreeMap;
use tally_ledger::accounts::{self, GRANTS, REVENUE};
use tally_ledger::{Auditor, Checkpoint, Finding, Frontier, SignerKey, merkle};

fn auditor(log: &common::Log) -> Auditor {
    let mut a = Auditor::new(vec![log.signer.verifier()], Some(ORIGIN.to_owned()));
    for (size, note) in &log.checkpoints {
        a.add_checkpoint(*size, note).unwrap();
    }
    a
}

#[test]
fn clean_log_passes() {
    let log = sample_log();
    let mut a = auditor(&log);
    let mut frontier = Frontier::new();
    for e in &log.entries {
        a.push(e, Some(&e.leaf_hash())).unwrap();
        frontier.append(e.leaf_hash());
    }
    assert_eq!(a.entries(), 12);
    assert_eq!(a.balances(), &log.balances);
    let mut pending = entry(12, &accounts::available("alice"), REVENUE, 50, "settle");
    pending.index = 99;
    a.push_pending(&pending).unwrap();
    let mut stored = log.balances.clone();
    *stored.get_mut(&accounts::available("alice")).unwrap() -= 50;
    *stored.get_mut(REVENUE).unwrap() += 50;
    let report = a.finish(Some(&stored)).unwrap();
    assert_eq!(
        (
            report.entries,
            report.pending,
            report.checkpoints,
            report.size
        ),
        (12, 1, 3, 12)
    );
    assert_eq!(report.latest_checkpoint, Some(12));
    assert_eq!(report.accounts, stored.len() as u64);
    use base64::Engine;
    let root = base64::engine::general_purpose::STANDARD.encode(frontier.root());
    assert_eq!(report.root, root);
}

#[test]
fn empty_log_and_size_zero_checkpoint() {
    let signer = SignerKey::generate(ORIGIN).unwrap();
    let cp = Checkpoint {
        origin: ORIGIN.to_owned(),
        size: 0,
        root: merkle::empty_root(),
    };
    let mut a = Auditor::new(vec![signer.verifier()], None);
    a.add_checkpoint(0, &signer.sign(&cp)).unwrap();
    let report = a.finish(Some(&BTreeMap::new())).unwrap();
    assert_eq!((report.entries, report.latest_checkpoint), (0, Some(0)));

    let bad = Checkpoint {
        root: [7; 32],
        ..cp
    };
    let mut a = Auditor::new(vec![signer.verifier()], None);
    let err = a.add_checkpoint(0, &signer.sign(&bad)).unwrap_err();
    assert_eq!(err, Finding::CheckpointRoot { size: 0 });
}

#[test]
fn entry_order_and_content() {
    let log = sample_log();
    let e = &log.entries;

    let mut a = auditor(&log);
    a.push(&e[0], None).unwrap();
    assert_eq!(
        a.push(&e[2], None).unwrap_err(),
        Finding::EntryMissing { index: 1, next: 2 }
    );

    let mut a = auditor(&log);
    a.push(&e[0], None).unwrap();
    assert_eq!(
        a.push(&e[0], None).unwrap_err(),
        Finding::EntryOutOfOrder {
            index: 0,
            expected: 1
        }
    );

    let mut a = auditor(&log);
    let mut changed = e[0].clone();
    changed.amount += 1;
    let err = a.push(&changed, Some(&e[0].leaf_hash())).unwrap_err();
    assert_eq!(
        err,
        Finding::LeafMismatch {
            index: 0,
            id: "t-0".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "entry 0 was changed: its hash does not match the log (transfer t-0)"
    );

    let mut a = auditor(&log);
    let mut zero = e[0].clone();
    zero.amount = 0;
    assert!(matches!(
        a.push(&zero, None).unwrap_err(),
        Finding::BadEntry { index: 0, .. }
    ));
    assert!(matches!(
        a.push_pending(&zero).unwrap_err(),
        Finding::BadEntry { .. }
    ));
}

#[test]
fn overdraft_and_overflow() {
    let alice = accounts::available("alice");
    let mut a = Auditor::new(vec![], None);
    a.push(&entry(0, GRANTS, &alice, 10, "grant"), None)
        .unwrap();
    let err = a
        .push(&entry(1, &alice, REVENUE, 11, "settle"), None)
        .unwrap_err();
    assert_eq!(
        err,
        Finding::NegativeBalance {
            index: 1,
            account: alice.clone(),
            balance: -1
        }
    );

    let mut a = Auditor::new(vec![], None);
    a.push(&entry(0, GRANTS, REVENUE, i64::MAX, "grant"), None)
        .unwrap();
    a.push(&entry(1, GRANTS, "clearing:x", 1, "grant"), None)
        .unwrap();
    let err = a
        .push(&entry(2, GRANTS, "clearing:x", 1, "grant"), None)
        .unwrap_err();
    assert!(matches!(err, Finding::BadEntry { index: 2, .. }), "{err}");
}

#[test]
fn checkpoint_findings() {
    let log = sample_log();
    let (size, note) = log.checkpoints[0].clone();
    let ring = vec![log.signer.verifier()];

    // Signed by a different key of the same name.
    let other = SignerKey::generate(ORIGIN).unwrap();
    let frontier_root = |n: usize| {
        let mut f = Frontier::new();
        for e in &log.entries[..n] {
            f.append(e.leaf_hash());
        }
        f.root()
    };
    let cp = Checkpoint {
        origin: ORIGIN.to_owned(),
        size,
        root: frontier_root(size as usize),
    };
    let mut a = Auditor::new(ring.clone(), None);
    let err = a.add_checkpoint(size, &other.sign(&cp)).unwrap_err();
    assert!(
        matches!(err, Finding::CheckpointSignature { size: 4, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("checkpoint at size 4: no valid signature from a trusted key: ")
    );

    // Stored under another size, or for another log.
    let mut a = Auditor::new(ring.clone(), None);
    assert!(matches!(
        a.add_checkpoint(5, &note).unwrap_err(),
        Finding::CheckpointTampered { size: 5, .. }
    ));
    let mut a = Auditor::new(ring.clone(), Some("other.example/log".into()));
    assert!(matches!(
        a.add_checkpoint(size, &note).unwrap_err(),
        Finding::CheckpointTampered { size: 4, .. }
    ));

    // Signed root that the entries do not produce.
    let wrong = Checkpoint {
        root: frontier_root(3),
        ..cp.clone()
    };
    let mut a = Auditor::new(ring.clone(), None);
    a.add_checkpoint(size, &log.signer.sign(&wrong)).unwrap();
    for e in &log.entries[..3] {
        a.push(e, None).unwrap();
    }
    let err = a.push(&log.entries[3], None).unwrap_err();
    assert_eq!(err, Finding::CheckpointRoot { size: 4 });
    assert_eq!(
        err.to_string(),
        "checkpoint at size 4: the entries do not hash to its signed root (an entry before index 4 was changed, inserted, removed or reordered)"
    );

    // A checkpoint beyond the log.
    let mut a = auditor(&log);
    for e in &log.entries[..10] {
        a.push(e, None).unwrap();
    }
    assert_eq!(
        a.finish(None).unwrap_err(),
        Finding::CheckpointBeyondLog {
            size: 12,
            entries: 10
        }
    );

    // A checkpoint added too late to be checked, and one added exactly at the current size.
    let mut a = Auditor::new(ring, None);
    for e in &log.entries[..5] {
        a.push(e, None).unwrap();
    }
    assert!(matches!(
        a.add_checkpoint(size, &note).unwrap_err(),
        Finding::CheckpointTampered { .. }
    ));
    let mut a = Auditor::new(vec![log.signer.verifier()], None);
    for e in &log.entries[..4] {
        a.push(e, None).unwrap();
    }
    a.add_checkpoint(size, &note).unwrap();
}

#[test]
fn balance_findings() {
    let log = sample_log();
    let mut a = auditor(&log);
    for e in &log.entries {
        a.push(e, None).unwrap();
    }
    let mut stored = log.balances.clone();
    stored.insert("platform:zzz".into(), 0);
    stored.insert(accounts::available("bob"), 901);
    stored.remove(&accounts::held("carol"));
    let err = a.finish(Some(&stored)).unwrap_err();
    assert_eq!(
        err,
        Finding::BalanceMismatch {
            account: "user:bob:available".into(),
            stored: 901,
            replayed: 800
        }
    );
    assert_eq!(
        err.to_string(),
        "account user:bob:available: stored balance 901, replay of the entries gives 800"
    );
    let json = serde_json::to_value(&err).unwrap();
    assert_eq!(json["problem"], "balance_mismatch");
    assert_eq!(json["replayed"], 800);
}

#[test]
fn finding_messages() {
    assert_eq!(
        Finding::EntryMissing { index: 7, next: 8 }.to_string(),
        "entry 7 is missing: the next stored entry is 8"
    );
    let sig = Finding::CheckpointSignature {
        size: 50,
        why: "bad".into(),
    };
    assert_eq!(
        sig.to_string(),
        "checkpoint at size 50: no valid signature from a trusted key: bad"
    );
    assert_eq!(
        serde_json::to_value(&sig).unwrap(),
        serde_json::json!({"problem": "checkpoint_signature", "size": 50, "why": "bad"})
    );
}

/// Run with `cargo test -p tally-ledger --release -- --ignored --nocapture`.
#[test]
#[ignore = "throughput measurement"]
fn auditor_throughput() {
    const N: u64 = 200_000;
    let users: Vec<String> = (0..1000)
        .map(|u| accounts::available(&format!("u{u}")))
        .collect();
    let entries: Vec<_> = (0..N)
        .map(|i| {
            let user = &users[(i % 1000) as usize];
            let mut e = entry(i, GRANTS, user, 1 + (i as i64 % 97), "grant");
            e.user_id = Some(format!("u{}", i % 1000));
            e.memo = Some("monthly grant".into());
            e
        })
        .collect();
    let start = std::time::Instant::now();
    let mut a = Auditor::new(vec![], None);
    for e in &entries {
        a.push(e, None).unwrap();
    }
    let report = a.finish(None).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} entries in {secs:.3}s: {:.0} entries/s",
        report.entries,
        N as f64 / secs
    );
}
