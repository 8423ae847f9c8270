//! The export directory format, and [`verify_export`] which audits an export with no database.
//!
//! An export directory holds:
//!
//! - [`ENTRIES`]: one [`Entry`] as JSON per line, in index order;
//! - [`CHECKPOINTS`]: one [`CheckpointRecord`] (`{"size": N, "note": "..."}`) per line;
//! - [`KEYS`]: verifier keys, one per line (blank lines and lines starting with `#` ignored);
//! - [`BALANCES`] (optional): `{"account": balance, ...}`, the stored balances at export time.

use crate::audit::{Auditor, Finding, Report};
use crate::{Entry, Error, VerifierKey};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The entries file.
pub const ENTRIES: &str = "entries.jsonl";
/// The checkpoints file.
pub const CHECKPOINTS: &str = "checkpoints.jsonl";
/// The verifier keys file.
pub const KEYS: &str = "keys.txt";
/// The optional stored balances file.
pub const BALANCES: &str = "balances.json";

/// How often [`verify_export`] reports progress, in entries.
const PROGRESS_EVERY: u64 = 10_000;

/// One line of [`CHECKPOINTS`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRecord {
    /// The tree size the checkpoint is stored under.
    pub size: u64,
    /// The signed note.
    pub note: String,
}

/// Why an export could not be verified.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A line of a file is malformed.
    #[error("{}:{line}: {why}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The 1-based line number (0 for the whole file).
        line: u64,
        /// What is wrong.
        why: String,
    },
    /// A key in a keys file is malformed.
    #[error("{}:{line}: {source}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What is wrong with the key.
        source: Error,
    },
    /// The export's contents fail the audit.
    #[error(transparent)]
    Finding(#[from] Finding),
}

fn open(path: &Path) -> Result<BufReader<File>, ExportError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| ExportError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Calls `each(line_number, line)` for every line of `path` (without its newline), reusing
/// one buffer.
fn for_each_line(
    path: &Path,
    mut each: impl FnMut(u64, &str) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let mut reader = open(path)?;
    let mut line = String::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|source| ExportError::Io {
                path: path.to_owned(),
                source,
            })?;
        if read == 0 {
            return Ok(());
        }
        number += 1;
        let text = line.strip_suffix('\n').unwrap_or(&line);
        each(number, text.strip_suffix('\r').unwrap_or(text))?;
    }
}

/// Reads a keys file: one verifier key per line; blank lines and `#` comments are skipped.
/// A file without any key is an error.
pub fn read_keys(path: &Path) -> Result<Vec<VerifierKey>, ExportError> {
    let mut keys = Vec::new();
    for_each_line(path, |line, text| {
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            return Ok(());
        }
        let key = VerifierKey::parse(text).map_err(|source| ExportError::Key {
            path: path.to_owned(),
            line,
            source,
        })?;
        keys.push(key);
        Ok(())
    })?;
    if keys.is_empty() {
        return Err(ExportError::Parse {
            path: path.to_owned(),
            line: 0,
            why: "no verifier keys".to_owned(),
        });
    }
    Ok(keys)
}

/// Audits the export in `dir`: verifies every checkpoint with `trusted` keys (or, if `None`,
/// the export's own [`KEYS`]) and `origin`, replays every entry, and compares the balances
/// with [`BALANCES`] if present. Calls `progress(entries_done)` every 10,000 entries and at
/// the end.
pub fn verify_export(
    dir: &Path,
    trusted: Option<Vec<VerifierKey>>,
    origin: Option<String>,
    progress: &mut dyn FnMut(u64),
) -> Result<Report, ExportError> {
    let keyring = match trusted {
        Some(keys) => keys,
        None => read_keys(&dir.join(KEYS))?,
    };
    let mut auditor = Auditor::new(keyring, origin);

    let path = dir.join(CHECKPOINTS);
    for_each_line(&path, |line, text| {
        let record: CheckpointRecord =
            serde_json::from_str(text).map_err(|e| ExportError::Parse {
                path: path.clone(),
                line,
                why: e.to_string(),
            })?;
        Ok(auditor.add_checkpoint(record.size, &record.note)?)
    })?;

    let path = dir.join(ENTRIES);
    for_each_line(&path, |line, text| {
        let entry: Entry = serde_json::from_str(text).map_err(|e| ExportError::Parse {
            path: path.clone(),
            line,
            why: e.to_string(),
        })?;
        auditor.push(&entry, None)?;
        let done = auditor.entries();
        if done.is_multiple_of(PROGRESS_EVERY) {
            progress(done);
        }
        Ok(())
    })?;
    progress(auditor.entries());

    let path = dir.join(BALANCES);
    let stored: Option<BTreeMap<String, i64>> =
        match File::open(&path) {
            Ok(file) => Some(serde_json::from_reader(BufReader::new(file)).map_err(|e| {
                ExportError::Parse {
                    path: path.clone(),
                    line: e.line() as u64,
                    why: e.to_string(),
                }
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(ExportError::Io { path, source }),
        };
    Ok(auditor.finish(stored.as_ref())?)
}
