//! Per-user concurrency limits: at most `limits.max_running_per_user` jobs of one user run at
//! once, and at most `limits.kinds.<kind>` jobs of that kind, counted over every process on the
//! database.
//!
//! The claim enforces them ([`claim`], which `jobs::claim_next` calls only when a limit is
//! set): it picks the queue's next runnable jobs, counts their users' running jobs and claims
//! only the jobs that fit, in queue order, so that two claims can never both take a user's
//! last slot:
//! - Postgres: the candidates are locked (`FOR UPDATE SKIP LOCKED`), then a transaction-scoped
//!   advisory lock is taken per user of the batch (in key order, so two claims never
//!   deadlock), then the counting claim runs in a statement of its own, whose snapshot
//!   therefore includes every claim committed under those locks before it.
//! - SQLite: the whole claim is one write transaction, which is already exclusive across
//!   processes.
//!
//! A job over a limit is not claimed: it stays `queued` (or `failed`, awaiting its retry), its
//! attempts untouched, and becomes due again after [`HOLD_BACK`], behind the jobs already due.
//! A job left `running` by a worker that died counts until it is rescued.

use std::{collections::HashSet, time::Duration};

use crate::{
    Db, DbError,
    config::LimitsConfig,
    db::Tx,
    jobs::{CLAIMED, Claimed, TAKE, runnable},
};

/// How long a job held back by a limit waits before it is claimed again: a slot that
/// frees is taken within about this long (plus one poll). Shorter means more fetches of tasks
/// that still do not fit.
pub const HOLD_BACK: Duration = Duration::from_secs(1);

/// The class of Postgres advisory locks taken per user (the first key of the two-key form);
/// the second key is the hash of the user's id.
const USER_LOCK_CLASS: i32 = 0x7461_6c6c;

/// The limits in effect, from `[limits]`.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    per_user: Option<i64>,
    /// Kinds with a limit, and each one's limit (side by side, as they are bound).
    kinds: Vec<String>,
    per_kind: Vec<i64>,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Limits {
        Limits {
            per_user: cfg.max_running_per_user,
            kinds: cfg.kinds.keys().cloned().collect(),
            per_kind: cfg.kinds.values().copied().collect(),
        }
    }

    /// No limit at all: claims take the plain path.
    pub fn none() -> Limits {
        Limits::default()
    }

    /// True if any limit is set.
    pub fn is_set(&self) -> bool {
        self.per_user.is_some() || !self.kinds.is_empty()
    }

    /// Checks `[limits]`: every limit at least 1, every kind a known one. The error names the
    /// key and says why.
    pub fn check(cfg: &LimitsConfig) -> Result<(), (&'static str, String)> {
        if let Some(n) = cfg.max_running_per_user
            && n < 1
        {
            return Err((
                "limits.max_running_per_user",
                format!("must be at least 1, not {n} (leave it out for no limit)"),
            ));
        }
        for (kind, n) in &cfg.kinds {
            if crate::kinds::lookup(kind).is_none() {
                return Err((
                    "limits.kinds",
                    format!(
                        "unknown job kind {kind:?}; known kinds: {}",
                        crate::kinds::names().join(", ")
                    ),
                ));
            }
            if *n < 1 {
                return Err((
                    "limits.kinds",
                    format!("the limit of {kind:?} must be at least 1, not {n}"),
                ));
            }
        }
        Ok(())
    }
}

/// The CTEs that pick, from the candidates `cand` (runnable jobs of the batch with their
/// place `ord`), the jobs that fit their limits (`ok`). `users` picks the running jobs of the
/// candidates' users and `not_in_batch` leaves out the batch's own; the kind limits are
/// `lim (kind, n)`; `per_user` is the SQL of the per-user limit (NULL for none). Each job's place among its user's candidates, plus the
/// user's jobs running outside the batch, must not pass its limits; a job refused by its kind
/// limit takes no place in its user's count.
fn fitting(users: &str, not_in_batch: &str, per_user: &str, per_user_again: &str) -> String {
    format!(
        "busy AS (SELECT user_id, kind, COUNT(*) AS n FROM tally_jobs WHERE status = 'running' \
         AND {users} AND {not_in_batch} GROUP BY user_id, kind), \
         fits_kind AS (SELECT r.id, r.user_id, r.ord FROM (SELECT cand.id, cand.user_id, \
         cand.kind, cand.ord, ROW_NUMBER() OVER (PARTITION BY cand.user_id, cand.kind ORDER BY \
         cand.ord) AS nth FROM cand) AS r LEFT JOIN lim ON lim.kind = r.kind LEFT JOIN busy AS b \
         ON b.user_id = r.user_id AND b.kind = r.kind \
         WHERE lim.n IS NULL OR COALESCE(b.n, 0) + r.nth <= lim.n), \
         ok AS (SELECT r.id FROM (SELECT f.id, f.user_id, ROW_NUMBER() OVER (PARTITION BY \
         f.user_id ORDER BY f.ord) AS nth FROM fits_kind AS f) AS r \
         WHERE {per_user} IS NULL OR COALESCE((SELECT SUM(b.n) FROM busy AS b \
         WHERE b.user_id = r.user_id), 0) + r.nth <= {per_user_again})"
    )
}

/// Claims, of the next `n` runnable jobs of `queue`, those that fit the limits (marked
/// running on `worker`, the attempt counted, as `jobs::claim_next` does); the others are held
/// back: due again after [`HOLD_BACK`].
pub(crate) async fn claim(
    db: &Db,
    worker: &str,
    queue: &str,
    n: usize,
    now: i64,
    limits: &Limits,
) -> Result<Vec<Claimed>, DbError> {
    const RUNNABLE: &str = "status IN ('queued', 'failed')";
    let mut tx = db.begin().await?;
    let candidates = runnable(db.backend(), "$1", "$2", "$3");
    let ids: Vec<String> = crate::with_tx!(&mut tx, conn => {
        sqlx::query_scalar(sqlx::AssertSqlSafe(candidates))
            .bind(now)
            .bind(queue)
            .bind(n as i64)
            .fetch_all(&mut *conn)
            .await?
    });
    if ids.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let claimed: Vec<Claimed> = match &mut tx {
        Tx::Postgres(conn) => {
            sqlx::query(
                "SELECT pg_advisory_xact_lock($1, k) FROM (SELECT DISTINCT hashtext(j.user_id) AS k \
                 FROM UNNEST($2::text[]) AS c (id) JOIN tally_jobs AS j ON j.id = c.id) AS u ORDER BY k",
            )
            .bind(USER_LOCK_CLASS)
            .bind(&ids)
            .execute(&mut **conn)
            .await?;
            let sql = format!(
                "WITH c (id, ord) AS (SELECT * FROM UNNEST($3::text[]) WITH ORDINALITY), \
                 cand AS (SELECT j.id, j.user_id, j.kind, c.ord FROM c JOIN tally_jobs AS j \
                 ON j.id = c.id WHERE j.{RUNNABLE}), \
                 lim (kind, n) AS (SELECT * FROM UNNEST($4::text[], $5::bigint[])), {} \
                 UPDATE tally_jobs SET {TAKE} FROM ok WHERE tally_jobs.id = ok.id \
                 AND tally_jobs.{RUNNABLE} RETURNING {CLAIMED}",
                fitting(
                    "user_id = ANY(ARRAY(SELECT user_id FROM cand))",
                    "id <> ALL($3::text[])",
                    "$6::bigint",
                    "$6"
                )
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(worker)
                .bind(now)
                .bind(&ids)
                .bind(&limits.kinds)
                .bind(&limits.per_kind)
                .bind(limits.per_user)
                .fetch_all(&mut **conn)
                .await?
        }
        Tx::Sqlite(conn) => {
            let mut qb = sqlx::QueryBuilder::new("WITH c (id, ord) AS (VALUES ");
            let mut list = qb.separated(", ");
            for (i, id) in ids.iter().enumerate() {
                list.push("(")
                    .push_bind_unseparated(id)
                    .push_unseparated(format!(", {i})"));
            }
            qb.push(format!(
                "), cand AS (SELECT j.id, j.user_id, j.kind, c.ord FROM c JOIN tally_jobs AS j \
                 ON j.id = c.id WHERE j.{RUNNABLE}), lim (kind, n) AS ("
            ));
            if limits.kinds.is_empty() {
                qb.push("SELECT NULL, NULL WHERE 0");
            } else {
                qb.push("VALUES ");
                let mut list = qb.separated(", ");
                for (kind, n) in limits.kinds.iter().zip(&limits.per_kind) {
                    list.push("(")
                        .push_bind_unseparated(kind)
                        .push_unseparated(", ")
                        .push_bind_unseparated(*n)
                        .push_unseparated(")");
                }
            }
            // `TAKE` binds the worker (`$1`) and now (`$2`); the per-user limit is `$3`.
            let sql = format!(
                "), {} UPDATE tally_jobs SET {TAKE} WHERE id IN (SELECT id FROM ok) \
                 AND {RUNNABLE} RETURNING {CLAIMED}",
                fitting(
                    "user_id IN (SELECT user_id FROM cand)",
                    "id NOT IN (SELECT id FROM c)",
                    "$3",
                    "$3",
                )
            );
            crate::db::push_numbered(&mut qb, &sql, |qb, n| match n {
                1 => {
                    qb.push_bind(worker);
                }
                2 => {
                    qb.push_bind(now);
                }
                _ => {
                    qb.push_bind(limits.per_user);
                }
            });
            qb.build_query_as().fetch_all(&mut **conn).await?
        }
    };
    // Held back: the candidates this claim did not take (each was runnable, and locked).
    let taken: HashSet<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
    let held: Vec<&String> = ids
        .iter()
        .filter(|id| !taken.contains(id.as_str()))
        .collect();
    if !held.is_empty() {
        let later = now + HOLD_BACK.as_millis() as i64;
        crate::with_tx!(&mut tx, conn => {
            let mut qb = sqlx::QueryBuilder::new("UPDATE tally_jobs SET run_at = ");
            qb.push_bind(later).push(" WHERE id IN (");
            let mut list = qb.separated(", ");
            for id in &held {
                list.push_bind(*id);
            }
            qb.push(")");
            qb.build().execute(&mut *conn).await?;
        });
    }
    tx.commit().await?;
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_must_be_positive_and_name_known_kinds() {
        let mut cfg = LimitsConfig::default();
        assert!(Limits::check(&cfg).is_ok());
        assert!(!Limits::new(&cfg).is_set());
        cfg.max_running_per_user = Some(0);
        let (key, why) = Limits::check(&cfg).expect_err("0");
        assert_eq!(key, "limits.max_running_per_user");
        assert!(why.contains("at least 1"), "{why}");
        cfg.max_running_per_user = Some(2);
        cfg.kinds.insert("sleep".into(), -1);
        let (key, why) = Limits::check(&cfg).expect_err("negative");
        assert_eq!(key, "limits.kinds");
        assert!(why.contains("\"sleep\""), "{why}");
        cfg.kinds.clear();
        cfg.kinds.insert("nope".into(), 1);
        let (_, why) = Limits::check(&cfg).expect_err("unknown kind");
        assert!(why.contains("unknown job kind"), "{why}");
        cfg.kinds.clear();
        cfg.kinds.insert("chat".into(), 4);
        assert!(Limits::check(&cfg).is_ok());
        assert!(Limits::new(&cfg).is_set());
    }
}
