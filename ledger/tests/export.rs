//! Export directories: a clean export verifies, and every kind of tampering is found.

mod common;

use common::{Log, ORIGIN, sample_log, temp_dir, write_export};
use std::path::Path;
use tally_ledger::export::{self, ExportError, verify_export};
use tally_ledger::{Checkpoint, Finding, SignerKey};

fn verify(dir: &Path) -> Result<tally_ledger::Report, ExportError> {
    verify_export(dir, None, Some(ORIGIN.to_owned()), &mut |_| {})
}

fn finding(dir: &Path) -> Finding {
    match verify(dir) {
        Err(ExportError::Finding(f)) => f,
        other => panic!("expected a finding, got {other:?}"),
    }
}

/// Rewrites the entries file through `edit` on its lines.
fn edit_entries(dir: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let path = dir.join(export::ENTRIES);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    edit(&mut lines);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
}

/// Runs `check` on a fresh export of the sample log, then removes it.
fn with_export(name: &str, check: impl FnOnce(&Path, &Log)) {
    let log = sample_log();
    let dir = temp_dir(name);
    write_export(&dir, &log);
    check(&dir, &log);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clean_export_verifies() {
    with_export("clean", |dir, log| {
        let mut seen = Vec::new();
        let report = verify_export(dir, None, Some(ORIGIN.into()), &mut |n| seen.push(n)).unwrap();
        assert_eq!((report.entries, report.checkpoints), (12, 3));
        assert_eq!(report.latest_checkpoint, Some(12));
        assert_eq!(seen, vec![12]);
        // Explicitly trusted keys, and no balances file.
        std::fs::remove_file(dir.join(export::BALANCES)).unwrap();
        let trusted = Some(vec![log.signer.verifier()]);
        verify_export(dir, trusted, None, &mut |_| {}).unwrap();
    });
}

#[test]
fn changed_amount() {
    with_export("amount", |dir, _| {
        edit_entries(dir, |lines| {
            lines[0] = lines[0].replace("\"amount\":1000", "\"amount\":2000");
        });
        assert_eq!(finding(dir), Finding::CheckpointRoot { size: 4 });
    });
    // A smaller reservation makes the later settlement overdraw the held account first.
    with_export("overdraw", |dir, _| {
        edit_entries(dir, |lines| {
            lines[1] = lines[1].replace("\"amount\":300", "\"amount\":30");
        });
        assert_eq!(
            finding(dir),
            Finding::NegativeBalance {
                index: 2,
                account: "user:alice:held".into(),
                balance: -170
            }
        );
    });
}

#[test]
fn changed_account() {
    with_export("account", |dir, _| {
        edit_entries(dir, |lines| {
            lines[6] = lines[6].replace("platform:revenue", "user:mallory:available");
        });
        assert_eq!(finding(dir), Finding::CheckpointRoot { size: 8 });
    });
}

#[test]
fn deleted_line() {
    with_export("deleted", |dir, _| {
        edit_entries(dir, |lines| {
            lines.remove(5);
        });
        assert_eq!(finding(dir), Finding::EntryMissing { index: 5, next: 6 });
    });
    with_export("truncated", |dir, _| {
        edit_entries(dir, |lines| {
            lines.pop();
        });
        assert_eq!(
            finding(dir),
            Finding::CheckpointBeyondLog {
                size: 12,
                entries: 11
            }
        );
    });
}

#[test]
fn swapped_lines() {
    with_export("swapped", |dir, _| {
        edit_entries(dir, |lines| lines.swap(2, 3));
        assert_eq!(finding(dir), Finding::EntryMissing { index: 2, next: 3 });
    });
    // Swapped and renumbered, so the indexes still count up: only the hashes tell.
    with_export("renumbered", |dir, _| {
        edit_entries(dir, |lines| {
            lines.swap(2, 3);
            lines[2] = lines[2].replace("\"index\":3", "\"index\":2");
            lines[3] = lines[3].replace("\"index\":2", "\"index\":3");
        });
        assert_eq!(finding(dir), Finding::CheckpointRoot { size: 4 });
    });
}

#[test]
fn inserted_line() {
    with_export("inserted", |dir, _| {
        edit_entries(dir, |lines| {
            let copy = lines[4].clone();
            lines.insert(5, copy);
        });
        assert_eq!(
            finding(dir),
            Finding::EntryOutOfOrder {
                index: 4,
                expected: 5
            }
        );
    });
}

#[test]
fn forged_checkpoint() {
    with_export("forged", |dir, _| {
        // Re-sign the last checkpoint with another key of the same name.
        let forger = SignerKey::generate(ORIGIN).unwrap();
        let cp = Checkpoint {
            origin: ORIGIN.into(),
            size: 12,
            root: [9; 32],
        };
        let path = dir.join(export::CHECKPOINTS);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[2] = serde_json::json!({"size": 12, "note": forger.sign(&cp)}).to_string();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        assert!(matches!(
            finding(dir),
            Finding::CheckpointSignature { size: 12, .. }
        ));
    });
}

#[test]
fn untrusted_keys() {
    with_export("untrusted", |dir, _| {
        let stranger = SignerKey::generate(ORIGIN).unwrap().verifier();
        let err = verify_export(dir, Some(vec![stranger]), None, &mut |_| {}).unwrap_err();
        assert!(matches!(
            err,
            ExportError::Finding(Finding::CheckpointSignature { size: 4, .. })
        ));
    });
}

#[test]
fn changed_balances() {
    with_export("balances", |dir, log| {
        let mut stored = log.balances.clone();
        *stored.get_mut("platform:revenue").unwrap() += 1;
        let json = serde_json::to_string(&stored).unwrap();
        std::fs::write(dir.join(export::BALANCES), json).unwrap();
        assert_eq!(
            finding(dir),
            Finding::BalanceMismatch {
                account: "platform:revenue".into(),
                stored: 601,
                replayed: 600
            }
        );
    });
}

#[test]
fn malformed_files() {
    with_export("malformed", |dir, _| {
        edit_entries(dir, |lines| lines[3] = "{not json".into());
        let err = verify(dir).unwrap_err();
        assert!(matches!(err, ExportError::Parse { line: 4, .. }), "{err}");
        assert!(err.to_string().contains("entries.jsonl:4:"), "{err}");
    });
    with_export("badkey", |dir, _| {
        std::fs::write(dir.join(export::KEYS), "# keys\nnot-a-key\n").unwrap();
        let err = verify(dir).unwrap_err();
        assert!(matches!(err, ExportError::Key { line: 2, .. }), "{err}");
    });
    with_export("nokeys", |dir, _| {
        std::fs::write(dir.join(export::KEYS), "# none\n").unwrap();
        assert!(matches!(verify(dir), Err(ExportError::Parse { .. })));
    });
    with_export("missing", |dir, _| {
        std::fs::remove_file(dir.join(export::ENTRIES)).unwrap();
        assert!(matches!(verify(dir), Err(ExportError::Io { .. })));
    });
}
