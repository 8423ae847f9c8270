//! The transparency log over the transfers.
//!
//! Transfers commit with no log index, so writers never wait on the log. A signing process
//! integrates them in batches, as a Certificate Transparency log does: it takes the log's lock
//! (one row), gives each committed transfer the next index, stores its leaf hash and every tree
//! node it completes, and signs one checkpoint (C2SP tlog-checkpoint) over the new tree, all in
//! one transaction. Proofs are computed from the stored complete subtrees only.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use tally_ledger::{
    Auditor, Checkpoint, Finding, Frontier, Hash, NodeId, Report, SignerKey, VerifierKey, export,
    merkle,
};
use tokio_util::sync::CancellationToken;

use super::{
    Op, RESERVATION_COLUMNS, Reservation, ReservationStep, TRANSFER_COLUMNS, Transfer, reconcile,
};
use crate::{Db, DbError, config::LedgerConfig, db::Backend, db::Tx, now_ms, with_pool, with_tx};

/// The keys in effect: the one that signs (if this process signs) and every public key whose
/// checkpoints are trusted (the signer's, and older ones kept after a rotation).
#[derive(Clone)]
pub struct Keys {
    pub signer: Option<SignerKey>,
    pub trusted: Vec<VerifierKey>,
}

impl Keys {
    /// Reads the keys the configuration names. `fallback` is used when it names no signing key
    /// (`tally dev` keeps one in its data folder).
    pub fn load(cfg: &LedgerConfig, fallback: Option<SignerKey>) -> Result<Keys, String> {
        let signer = match (&cfg.signing_key, &cfg.signing_key_file) {
            (Some(_), Some(_)) => {
                return Err(
                    "ledger.signing_key and ledger.signing_key_file are both set; keep one"
                        .to_owned(),
                );
            }
            (Some(key), None) => Some(
                SignerKey::parse(key.expose()).map_err(|e| format!("ledger.signing_key: {e}"))?,
            ),
            (None, Some(path)) => Some(read_signer(path)?),
            (None, None) => fallback,
        };
        let mut trusted: Vec<VerifierKey> = signer.iter().map(SignerKey::verifier).collect();
        for text in &cfg.verifier_keys {
            let key = VerifierKey::parse(text)
                .map_err(|e| format!("ledger.verifier_keys: {text:?}: {e}"))?;
            if !trusted.contains(&key) {
                trusted.push(key);
            }
        }
        Ok(Keys { signer, trusted })
    }
}

fn read_signer(path: &Path) -> Result<SignerKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("ledger.signing_key_file {}: {e}", path.display()))?;
    SignerKey::parse(&text).map_err(|e| format!("ledger.signing_key_file {}: {e}", path.display()))
}

/// Writes a new signing key to `path`, readable by its owner only. Refuses to overwrite.
pub fn write_new_key(path: &Path, name: &str) -> Result<SignerKey, String> {
    let key = SignerKey::generate(name).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut file = opts
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(file, "{}", key.encode()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key)
}

/// The signing key `tally dev` keeps in its data folder, made on first start.
pub fn dev_key(data_dir: &Path) -> Result<SignerKey, String> {
    let path: PathBuf = data_dir.join("ledger.key");
    if path.exists() {
        read_signer(&path)
    } else {
        write_new_key(&path, "tally-dev")
    }
}

/// A stored checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct StoredCheckpoint {
    pub size: u64,
    pub root: Hash,
    pub note: String,
    pub created_at: i64,
}

/// What one integration did.
#[derive(Debug, Clone, Copy)]
pub struct Integrated {
    pub added: u64,
    pub size: u64,
}

/// Arbitrary, fixed: the advisory lock that keeps two Postgres signers from waiting on each other.
const LOG_LOCK: i64 = 0x7a11_1ed6;

/// Gives up to `max` committed transfers their log indices and signs a checkpoint over the new
/// tree. `None` when another process is integrating or nothing was waiting (unless no
/// checkpoint exists yet: then the empty tree is signed, so there is always one to serve).
pub async fn integrate(
    db: &Db,
    signer: &SignerKey,
    origin: &str,
    max: usize,
) -> Result<Option<Integrated>, DbError> {
    let mut tx = db.begin().await?;
    if tx.backend() == Backend::Postgres {
        let got: bool = with_tx!(&mut tx, conn => {
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(LOG_LOCK).fetch_one(&mut *conn).await?
        });
        if !got {
            return Ok(None);
        }
    }
    let lock_sql = match tx.backend() {
        Backend::Postgres => "SELECT size FROM ledger_log WHERE id = 1 FOR UPDATE",
        Backend::Sqlite => "SELECT size FROM ledger_log WHERE id = 1",
    };
    let size: i64 = with_tx!(&mut tx, conn => {
        sqlx::query_scalar(lock_sql).fetch_one(&mut *conn).await?
    });
    let size = size as u64;
    let sql = format!(
        "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE seq IS NULL ORDER BY ord, pos LIMIT $1"
    );
    let pending: Vec<Transfer> = with_tx!(&mut tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(max as i64).fetch_all(&mut *conn).await?
    });
    if pending.is_empty() {
        let signed: i64 = with_tx!(&mut tx, conn => {
            sqlx::query_scalar("SELECT COUNT(*) FROM ledger_checkpoints WHERE size = $1").bind(size as i64).fetch_one(&mut *conn).await?
        });
        if signed > 0 {
            return Ok(None);
        }
    }

    let needed = Frontier::nodes_needed(size);
    let stored = read_nodes(&mut tx, &needed).await?;
    let hashes = needed
        .iter()
        .map(|id| {
            stored
                .get(id)
                .copied()
                .ok_or_else(|| DbError::Corrupt(format!("ledger tree node {id:?} is missing")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut frontier = Frontier::from_parts(size, hashes)
        .map_err(|e| DbError::Corrupt(format!("ledger tree: {e}")))?;
    // Never extend a tree whose stored edge no longer matches what was signed.
    let signed: Option<Vec<u8>> = with_tx!(&mut tx, conn => {
        sqlx::query_scalar("SELECT root FROM ledger_checkpoints WHERE size = $1").bind(size as i64).fetch_optional(&mut *conn).await?
    });
    if let Some(root) = signed
        && root.as_slice() != frontier.root().as_slice()
    {
        return Err(DbError::Corrupt(format!(
            "the stored ledger tree does not match the checkpoint signed at size {size}; \
             nothing more is signed until `tally ledger verify` is clean"
        )));
    }
    let mut nodes: Vec<(NodeId, Hash)> = Vec::with_capacity(pending.len() * 2);
    let mut seqs: Vec<(&str, i64)> = Vec::with_capacity(pending.len());
    let mut buf = Vec::with_capacity(256);
    for (i, t) in pending.iter().enumerate() {
        let index = size + i as u64;
        buf.clear();
        t.entry(index).write_canonical(&mut buf);
        nodes.extend(frontier.append(merkle::leaf_hash(&buf)));
        seqs.push((&t.id, index as i64));
    }
    super::sql::set_seqs(&mut tx, &seqs).await?;
    super::sql::insert_nodes(&mut tx, &nodes).await?;
    let new_size = frontier.size();
    let root = frontier.root();
    let note = signer.sign(&Checkpoint {
        origin: origin.to_owned(),
        size: new_size,
        root,
    });
    let now = now_ms();
    with_tx!(&mut tx, conn => {
        sqlx::query("INSERT INTO ledger_checkpoints (size, root, note, created_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (size) DO NOTHING")
            .bind(new_size as i64).bind(root.to_vec()).bind(&note).bind(now)
            .execute(&mut *conn).await?;
        sqlx::query("UPDATE ledger_log SET size = $1 WHERE id = 1")
            .bind(new_size as i64).execute(&mut *conn).await?;
    });
    tx.commit().await?;
    Ok(Some(Integrated {
        added: pending.len() as u64,
        size: new_size,
    }))
}

async fn read_nodes(tx: &mut Tx, ids: &[NodeId]) -> Result<HashMap<NodeId, Hash>, DbError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let rows: Vec<(i32, i64, Vec<u8>)> = with_tx!(tx, conn => {
            let mut qb = sqlx::QueryBuilder::new("SELECT level, idx, hash FROM ledger_nodes WHERE ");
            for (i, id) in chunk.iter().enumerate() {
                if i > 0 {
                    qb.push(" OR ");
                }
                qb.push("(level = ").push_bind(i32::from(id.level)).push(" AND idx = ").push_bind(id.index as i64).push(")");
            }
            qb.build_query_as().fetch_all(&mut *conn).await?
        });
        for (level, idx, hash) in rows {
            let hash: Hash = hash.try_into().map_err(|_| {
                DbError::Corrupt(format!("ledger tree node ({level}, {idx}) is not 32 bytes"))
            })?;
            let level = u8::try_from(level)
                .map_err(|_| DbError::Corrupt(format!("ledger tree level {level}")))?;
            out.insert(
                NodeId {
                    level,
                    index: idx as u64,
                },
                hash,
            );
        }
    }
    Ok(out)
}

/// `ledger.expire`: releases the reservations whose time is up. The platform's cron schedule of
/// the same name (`ledger.expiry_schedule`) makes one such job per tick, on the `system` queue;
/// users cannot submit it.
pub static EXPIRE: crate::kinds::Kind =
    crate::kinds::Kind::new::<ExpireInput>("ledger.expire", "system")
        .made_by("the platform's cron schedule ledger.expire");

/// `ledger.expire` takes no input: `{}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpireInput {}
impl crate::kinds::Input for ExpireInput {}

/// Releases every pending reservation whose time is up (up to `max`). Returns how many.
pub async fn expire_due(db: &Db, now: i64, max: usize) -> Result<usize, DbError> {
    let sql = "SELECT id FROM ledger_reservations WHERE state = 'pending' AND expires_at IS NOT NULL \
        AND expires_at <= $1 ORDER BY expires_at LIMIT $2";
    let due: Vec<String> = with_pool!(db, pool => {
        sqlx::query_scalar(sql).bind(now).bind(max as i64).fetch_all(pool).await?
    });
    if due.is_empty() {
        return Ok(0);
    }
    let ops = due
        .into_iter()
        .map(|id| Op::Release {
            id,
            expired: true,
            owner: None,
        })
        .collect();
    let answers = super::run(db, ops).await?;
    Ok(answers
        .iter()
        .filter(|a| {
            matches!(
                a,
                Ok(super::Done::Reservation {
                    replayed: false,
                    ..
                })
            )
        })
        .count())
}

/// The ledger's background work in one process: if it holds a signing key, integrate new
/// transfers and sign a checkpoint every `checkpoint_ms`. (Reservations expire through the
/// platform's `ledger.expire` cron schedule, not here: see [`EXPIRE`].)
/// While the database is unreachable it waits longer between rounds (see [`crate::outage`]);
/// it never ends on its own. Stops when `stop` is cancelled, after a last integration.
pub fn spawn_maintenance(
    db: Db,
    signer: Option<SignerKey>,
    cfg: LedgerConfig,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    const BATCH: usize = 20_000;
    tokio::spawn(async move {
        let tick = Duration::from_millis(cfg.checkpoint_ms);
        // Rounds in a row that could not reach the database.
        let mut failures = 0usize;
        loop {
            // Whether a step of this round reached the database, and whether one could not.
            let (mut reached, mut unreachable) = (false, false);
            let mut failed = |what: &str, e: &DbError| {
                if e.is_unavailable() {
                    unreachable = true;
                    crate::outage::lost(what, e);
                } else {
                    tracing::warn!(error = %e, "{what} failed; will retry");
                }
            };
            if let Some(key) = &signer {
                loop {
                    match integrate(&db, key, &cfg.origin, BATCH).await {
                        Ok(Some(done)) if done.added as usize == BATCH => continue,
                        Ok(_) => {
                            reached = true;
                            break;
                        }
                        Err(e) => {
                            failed("ledger integration", &e);
                            break;
                        }
                    }
                }
            }
            let wait = if unreachable {
                failures += 1;
                tick.max(crate::outage::wait_after(failures))
            } else if failures > 0 && !reached {
                // Nothing was due this round: the database is not known to be back yet.
                tick.max(crate::outage::wait_after(failures))
            } else {
                if failures > 0 {
                    crate::outage::back();
                }
                failures = 0;
                tick
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(key) = &signer
            && let Err(e) = integrate(&db, key, &cfg.origin, usize::MAX >> 1).await
        {
            tracing::warn!(error = %e, "last ledger integration failed");
        }
    })
}

// ---- reading the log ----

pub async fn latest_checkpoint(db: &Db) -> Result<Option<StoredCheckpoint>, DbError> {
    checkpoint_where(db, "ORDER BY size DESC LIMIT 1", None).await
}

pub async fn checkpoint_at(db: &Db, size: u64) -> Result<Option<StoredCheckpoint>, DbError> {
    checkpoint_where(db, "WHERE size = $1", Some(size as i64)).await
}

async fn checkpoint_where(
    db: &Db,
    clause: &str,
    size: Option<i64>,
) -> Result<Option<StoredCheckpoint>, DbError> {
    let sql = format!("SELECT size, root, note, created_at FROM ledger_checkpoints {clause}");
    let row: Option<(i64, Vec<u8>, String, i64)> = with_pool!(db, pool => {
        let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        if let Some(size) = size {
            q = q.bind(size);
        }
        q.fetch_optional(pool).await?
    });
    row.map(|(size, root, note, created_at)| {
        Ok(StoredCheckpoint {
            size: size as u64,
            root: root.try_into().map_err(|_| {
                DbError::Corrupt(format!("checkpoint {size}: root is not 32 bytes"))
            })?,
            note,
            created_at,
        })
    })
    .transpose()
}

/// The number of entries in the log.
pub async fn log_size(db: &Db) -> Result<u64, DbError> {
    let n: i64 = with_pool!(db, pool => {
        sqlx::query_scalar("SELECT size FROM ledger_log WHERE id = 1").fetch_one(pool).await?
    });
    Ok(n as u64)
}

/// The transfer at a log index.
pub async fn entry_at(db: &Db, index: u64) -> Result<Option<Transfer>, DbError> {
    let sql = format!("SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE seq = $1");
    let t: Option<Transfer> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(index as i64).fetch_optional(pool).await?
    });
    Ok(t)
}

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("{0}")]
    OutOfRange(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// An inclusion proof of the entry at `index` in the tree of `size` entries.
pub async fn inclusion_proof(db: &Db, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
    let log = log_size(db).await?;
    if size > log || index >= size {
        return Err(ProofError::OutOfRange(format!(
            "need index < size <= {log} (the log's size); got index {index}, size {size}"
        )));
    }
    let mut tx = db.begin_read().await?;
    let mut nodes = read_nodes(&mut tx, &merkle::nodes_for_inclusion(index, size)).await?;
    merkle::inclusion_proof(&mut nodes, index, size)
        .map_err(|e| ProofError::Db(DbError::Corrupt(format!("ledger tree: {e}"))))
}

/// A consistency proof from the tree of `from` entries to the tree of `to` entries.
pub async fn consistency_proof(db: &Db, from: u64, to: u64) -> Result<Vec<Hash>, ProofError> {
    let log = log_size(db).await?;
    if from == 0 || from > to || to > log {
        return Err(ProofError::OutOfRange(format!(
            "need 0 < from <= to <= {log} (the log's size); got from {from}, to {to}"
        )));
    }
    let mut tx = db.begin_read().await?;
    let mut nodes = read_nodes(&mut tx, &merkle::nodes_for_consistency(from, to)).await?;
    merkle::consistency_proof(&mut nodes, from, to)
        .map_err(|e| ProofError::Db(DbError::Corrupt(format!("ledger tree: {e}"))))
}

/// The leaf hash stored for an index.
pub async fn stored_leaf(db: &Db, index: u64) -> Result<Option<Hash>, DbError> {
    let mut tx = db.begin_read().await?;
    let id = NodeId { level: 0, index };
    Ok(read_nodes(&mut tx, &[id]).await?.get(&id).copied())
}

// ---- audit ----

#[derive(sqlx::FromRow)]
struct LoggedTransfer {
    #[sqlx(flatten)]
    transfer: Transfer,
    leaf: Option<Vec<u8>>,
}

/// Rows read per page by the audit and the export.
const PAGE: i64 = 10_000;

/// Everything one snapshot of the log needs for an audit or an export.
struct Snapshot {
    tx: Tx,
}

impl Snapshot {
    async fn open(db: &Db) -> Result<Snapshot, DbError> {
        Ok(Snapshot {
            tx: db.begin_read().await?,
        })
    }

    async fn checkpoints(&mut self) -> Result<Vec<(u64, String)>, DbError> {
        let rows: Vec<(i64, String)> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as("SELECT size, note FROM ledger_checkpoints ORDER BY size").fetch_all(&mut *conn).await?
        });
        Ok(rows.into_iter().map(|(s, n)| (s as u64, n)).collect())
    }

    async fn count(&mut self) -> Result<u64, DbError> {
        let n: i64 = with_tx!(&mut self.tx, conn => {
            sqlx::query_scalar("SELECT COUNT(*) FROM ledger_transfers").fetch_one(&mut *conn).await?
        });
        Ok(n as u64)
    }

    /// Integrated transfers with index >= `from`, in index order, with their stored leaf hash.
    async fn page(&mut self, from: i64) -> Result<Vec<LoggedTransfer>, DbError> {
        let sql = "SELECT t.id, t.seq, t.debit, t.credit, t.amount, t.kind, t.user_id, t.reservation_id, \
            t.job_id, t.memo, t.created_at, n.hash AS leaf FROM ledger_transfers t \
            LEFT JOIN ledger_nodes n ON n.level = 0 AND n.idx = t.seq \
            WHERE t.seq >= $1 ORDER BY t.seq LIMIT $2";
        let rows: Vec<LoggedTransfer> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as(sql).bind(from).bind(PAGE).fetch_all(&mut *conn).await?
        });
        Ok(rows)
    }

    async fn pending(&mut self) -> Result<Vec<Transfer>, DbError> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE seq IS NULL ORDER BY ord, pos"
        );
        let rows: Vec<Transfer> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *conn).await?
        });
        Ok(rows)
    }

    async fn balances(&mut self) -> Result<BTreeMap<String, i64>, DbError> {
        let rows: Vec<(String, i64)> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as("SELECT id, balance FROM ledger_accounts").fetch_all(&mut *conn).await?
        });
        Ok(rows.into_iter().collect())
    }

    /// Reservations with ids after `after`, in id order.
    async fn reservations(&mut self, after: &str) -> Result<Vec<Reservation>, DbError> {
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE id > $1 ORDER BY id LIMIT $2"
        );
        let rows: Vec<Reservation> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(after).bind(PAGE).fetch_all(&mut *conn).await?
        });
        Ok(rows)
    }

    /// The transfers whose ids are the steps' of the reservations [`Snapshot::reservations`]
    /// reads after `after` (each looked up by primary key).
    async fn reservations_transfers(&mut self, after: &str) -> Result<Vec<Transfer>, DbError> {
        let steps: Vec<String> = ReservationStep::ALL
            .iter()
            .map(|s| format!("r.id || '{}'", s.id("").replace('\'', "''")))
            .collect();
        let columns = TRANSFER_COLUMNS.replace(", ", ", t.");
        let sql = format!(
            "SELECT t.{columns} FROM (SELECT id FROM ledger_reservations WHERE id > $1 \
             ORDER BY id LIMIT $2) AS r JOIN ledger_transfers t ON t.id IN ({})",
            steps.join(", ")
        );
        let rows: Vec<Transfer> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(after).bind(PAGE).fetch_all(&mut *conn).await?
        });
        Ok(rows)
    }

    /// A transfer that names a reservation that does not exist, if there is one.
    async fn transfer_of_missing_reservation(
        &mut self,
    ) -> Result<Option<(String, String)>, DbError> {
        let sql = "SELECT id, reservation_id FROM ledger_transfers t WHERE reservation_id IS NOT NULL \
            AND NOT EXISTS (SELECT 1 FROM ledger_reservations r WHERE r.id = t.reservation_id) \
            ORDER BY id LIMIT 1";
        let row: Option<(String, String)> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as(sql).fetch_optional(&mut *conn).await?
        });
        Ok(row)
    }

    /// The last of the next `PAGE` job ids (in order) that transfers name after `after`.
    async fn job_page_end(&mut self, after: &str) -> Result<Option<String>, DbError> {
        let sql = "SELECT MAX(job_id) FROM (SELECT DISTINCT job_id FROM ledger_transfers \
            WHERE job_id > $1 ORDER BY job_id LIMIT $2) AS page";
        let end: Option<String> = with_tx!(&mut self.tx, conn => {
            sqlx::query_scalar(sql).bind(after).bind(PAGE).fetch_one(&mut *conn).await?
        });
        Ok(end)
    }

    /// `(job_id, kind, amount)` of the transfers naming a job in (`after`, `last`], by job.
    async fn job_transfers(
        &mut self,
        after: &str,
        last: &str,
    ) -> Result<Vec<(String, String, i64)>, DbError> {
        let sql = "SELECT job_id, kind, amount FROM ledger_transfers \
            WHERE job_id > $1 AND job_id <= $2 ORDER BY job_id";
        let rows: Vec<(String, String, i64)> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as(sql).bind(after).bind(last).fetch_all(&mut *conn).await?
        });
        Ok(rows)
    }

    /// The reservations naming a job in (`after`, `last`].
    async fn job_reservations(
        &mut self,
        after: &str,
        last: &str,
    ) -> Result<Vec<Reservation>, DbError> {
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE job_id > $1 AND job_id <= $2"
        );
        let rows: Vec<Reservation> = with_tx!(&mut self.tx, conn => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(after).bind(last).fetch_all(&mut *conn).await?
        });
        Ok(rows)
    }
}

/// Audits the whole ledger from one snapshot: every entry's leaf against the stored tree, every
/// checkpoint's signature (against `trusted` keys only) and root, every balance against a
/// replay of the transfers, then the state derived from the transfers: every reservation
/// against the transfers that made and closed it, and every job's shown cost against the
/// transfers that name it ([`reconcile`]). `progress(done, total)` is called as entries are
/// checked. The inner `Err` is the first problem found.
pub async fn verify(
    db: &Db,
    trusted: Vec<VerifierKey>,
    origin: Option<String>,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Result<Report, Finding>, DbError> {
    let mut snap = Snapshot::open(db).await?;
    let mut auditor = Auditor::new(trusted, origin);
    let mut named = NamedReservations::default();
    let checkpoints = snap.checkpoints().await?;
    let latest = checkpoints.last().map(|(s, _)| *s).unwrap_or(0);
    for (size, note) in &checkpoints {
        if let Err(f) = auditor.add_checkpoint(*size, note) {
            return Ok(Err(f));
        }
    }
    let total = snap.count().await?;
    let mut next: i64 = 0;
    loop {
        let page = snap.page(next).await?;
        let Some(last) = page.last() else { break };
        next = last.transfer.seq.unwrap_or(next) + 1;
        for row in &page {
            let index = row.transfer.seq.unwrap_or_default() as u64;
            let Some(leaf) = row.leaf.clone().and_then(|l| Hash::try_from(l).ok()) else {
                return Ok(Err(Finding::BadEntry {
                    index,
                    why: "its leaf hash is missing from the stored tree".to_owned(),
                }));
            };
            if let Err(f) = auditor.push(&row.transfer.entry(index), Some(&leaf)) {
                return Ok(Err(f));
            }
            if let Err(f) = named.count(&row.transfer) {
                return Ok(Err(f));
            }
            if index >= latest {
                return Ok(Err(Finding::BadEntry {
                    index,
                    why: format!(
                        "it is not covered by any signed checkpoint (the latest covers {latest} entries)"
                    ),
                }));
            }
        }
        progress(auditor.entries(), total);
    }
    for t in snap.pending().await? {
        if let Err(f) = auditor.push_pending(&t.entry(0)) {
            return Ok(Err(f));
        }
        if let Err(f) = named.count(&t) {
            return Ok(Err(f));
        }
    }
    progress(total, total);
    let stored = snap.balances().await?;
    let mut report = match auditor.finish(Some(&stored)) {
        Ok(report) => report,
        Err(f) => return Ok(Err(f)),
    };
    // The stored edge of the tree, which the next integration extends, must give the same root.
    let edge = Frontier::nodes_needed(report.size);
    let nodes = read_nodes(&mut snap.tx, &edge).await?;
    let hashes: Option<Vec<Hash>> = edge.iter().map(|id| nodes.get(id).copied()).collect();
    let stored_root = hashes
        .and_then(|h| Frontier::from_parts(report.size, h).ok())
        .map(|f| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, f.root()));
    if stored_root.as_deref() != Some(report.root.as_str()) {
        return Ok(Err(Finding::CheckpointTampered {
            size: report.size,
            why: "the stored tree nodes do not hash to the root of the entries".to_owned(),
        }));
    }
    match check_reservations(&mut snap, named.0).await? {
        Ok(n) => report.reservations = n,
        Err(f) => return Ok(Err(f)),
    }
    match check_jobs(&mut snap).await? {
        Ok(n) => report.jobs = n,
        Err(f) => return Ok(Err(f)),
    }
    Ok(Ok(report))
}

/// Counts the transfers that name a reservation (each must be one of its steps), so that
/// [`check_reservations`] finds out whether any names one that does not exist without looking
/// each one up.
#[derive(Default)]
struct NamedReservations(u64);

impl NamedReservations {
    fn count(&mut self, t: &Transfer) -> Result<(), Finding> {
        if t.reservation_id.is_some() {
            reconcile::check_named_reservation(t)?;
            self.0 += 1;
        }
        Ok(())
    }
}

/// Checks every reservation, a page at a time in id order, against the transfers its steps'
/// ids name (read by primary key, a page's in one statement); then that every one of the
/// `named` transfers that name a reservation was among them. Returns how many it checked.
async fn check_reservations(
    snap: &mut Snapshot,
    named: u64,
) -> Result<Result<u64, Finding>, DbError> {
    let (mut checked, mut matched) = (0u64, 0u64);
    let mut after = String::new();
    loop {
        let found = snap.reservations_transfers(&after).await?;
        let page = snap.reservations(&after).await?;
        let Some(last) = page.last() else { break };
        after = last.id.clone();
        let mut made: HashMap<&str, Vec<&Transfer>> = HashMap::with_capacity(page.len());
        for t in &found {
            // The step's id leads to its reservation: the part before the last '/'.
            if let Some((reservation, _)) = t.id.rsplit_once('/') {
                made.entry(reservation).or_default().push(t);
            }
        }
        for r in &page {
            let made = made.get(r.id.as_str()).map_or(&[][..], Vec::as_slice);
            if let Err(f) = reconcile::check_reservation(r, made) {
                return Ok(Err(f));
            }
            matched += made.len() as u64;
        }
        checked += page.len() as u64;
    }
    if matched != named {
        return Ok(Err(match snap.transfer_of_missing_reservation().await? {
            Some((id, reservation)) => Finding::TransferReservation {
                id,
                reservation,
                why: "which does not exist".to_owned(),
            },
            None => Finding::TransferReservation {
                id: "(unknown)".to_owned(),
                reservation: "(unknown)".to_owned(),
                why: format!(
                    "but {named} transfers name reservations and {matched} belong to theirs"
                ),
            },
        }));
    }
    Ok(Ok(checked))
}

/// Checks every job that transfers name, a page of job ids at a time in id order: the cost
/// the API shows for it against its transfers. Returns how many it checked.
async fn check_jobs(snap: &mut Snapshot) -> Result<Result<u64, Finding>, DbError> {
    let mut checked = 0u64;
    let mut after = String::new();
    while let Some(last) = snap.job_page_end(&after).await? {
        let transfers = snap.job_transfers(&after, &last).await?;
        let reservations = snap.job_reservations(&after, &last).await?;
        let mut by_job: BTreeMap<&str, JobLedger> = BTreeMap::new();
        for (job, kind, amount) in &transfers {
            let named = by_job.entry(job.as_str()).or_default();
            named.transfers.push((kind.as_str(), *amount));
        }
        for r in &reservations {
            if let Some(job) = r.job_id.as_deref() {
                by_job.entry(job).or_default().reservations.push(r);
            }
        }
        let ids: Vec<&str> = by_job.keys().copied().collect();
        let records: HashMap<String, reconcile::JobRecord> =
            crate::jobs::ledger_records(&mut snap.tx, &ids)
                .await?
                .into_iter()
                .collect();
        for (job, named) in &by_job {
            let record = records.get(*job);
            if let Err(f) = reconcile::check_job(job, record, &named.reservations, &named.transfers)
            {
                return Ok(Err(f));
            }
        }
        checked += by_job.len() as u64;
        after = last;
    }
    Ok(Ok(checked))
}

/// What names one job: its transfers' `(kind, amount)` and its reservations.
#[derive(Default)]
struct JobLedger<'a> {
    transfers: Vec<(&'a str, i64)>,
    reservations: Vec<&'a Reservation>,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    pub entries: u64,
    pub checkpoints: u64,
    pub keys: u64,
    /// False when transfers were committed but not yet in the log, so stored balances could
    /// not be compared with the exported entries alone.
    pub balances: bool,
}

/// Writes the log (entries covered by the latest checkpoint), every checkpoint, the trusted
/// public keys and, when every committed transfer is in the log, the stored balances, into
/// `dir`, in the format `tally_ledger::export` reads.
pub async fn export_to(
    db: &Db,
    dir: &Path,
    trusted: &[VerifierKey],
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Exported, ExportError> {
    std::fs::create_dir_all(dir).map_err(|e| ExportError::io(dir, e))?;
    let mut snap = Snapshot::open(db).await?;
    let checkpoints = snap.checkpoints().await?;
    let covered = checkpoints.last().map(|(s, _)| *s).unwrap_or(0);
    let path = dir.join(export::CHECKPOINTS);
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&path).map_err(|e| ExportError::io(&path, e))?,
    );
    for (size, note) in &checkpoints {
        let line = serde_json::json!({ "size": size, "note": note });
        writeln!(out, "{line}").map_err(|e| ExportError::io(&path, e))?;
    }
    out.flush().map_err(|e| ExportError::io(&path, e))?;

    let path = dir.join(export::KEYS);
    let keys: String = trusted
        .iter()
        .map(|k| format!("{}\n", k.encode()))
        .collect();
    std::fs::write(&path, keys).map_err(|e| ExportError::io(&path, e))?;

    let total = snap.count().await?;
    let path = dir.join(export::ENTRIES);
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&path).map_err(|e| ExportError::io(&path, e))?,
    );
    let mut written = 0u64;
    let mut next = 0i64;
    'pages: loop {
        let page = snap.page(next).await?;
        let Some(last) = page.last() else { break };
        next = last.transfer.seq.unwrap_or(next) + 1;
        for row in &page {
            let index = row.transfer.seq.unwrap_or_default() as u64;
            if index >= covered {
                break 'pages;
            }
            let line = serde_json::to_string(&row.transfer.entry(index))
                .map_err(|e| ExportError::io(&path, std::io::Error::other(e)))?;
            writeln!(out, "{line}").map_err(|e| ExportError::io(&path, e))?;
            written += 1;
        }
        progress(written, total);
    }
    out.flush().map_err(|e| ExportError::io(&path, e))?;

    let complete = written == total;
    let path = dir.join(export::BALANCES);
    if complete {
        let balances = snap.balances().await?;
        let text = serde_json::to_string_pretty(&balances)
            .map_err(|e| ExportError::io(&path, std::io::Error::other(e)))?;
        std::fs::write(&path, text).map_err(|e| ExportError::io(&path, e))?;
    } else if path.exists() {
        std::fs::remove_file(&path).map_err(|e| ExportError::io(&path, e))?;
    }
    progress(total, total);
    Ok(Exported {
        entries: written,
        checkpoints: checkpoints.len() as u64,
        keys: trusted.len() as u64,
        balances: complete,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ExportError {
    fn io(path: &Path, source: std::io::Error) -> ExportError {
        ExportError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
