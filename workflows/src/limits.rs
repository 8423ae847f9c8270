//! Per-user concurrency limits: at most `limits.max_running_per_user` jobs of one user run at
//! once, and at most `limits.kinds.<kind>` jobs of that kind, counted over every process on the
//! database.
//!
//! The claim enforces them ([`claim`], which `jobs::claim_many` calls only when a limit is
//! set): it counts the batch's users' running jobs and claims only the jobs that fit, in batch
//! order, so that two claims can never both take a user's last slot:
//! - Postgres: first a transaction-scoped advisory lock per user of the batch (taken in key
//!   order, so two claims never deadlock), then the counting claim in a statement of its own,
//!   whose snapshot therefore includes every claim committed under those locks before it.
//! - SQLite: the counting claim is one statement in a write transaction, which is already
//!   exclusive across processes.
//!
//! A job over a limit is not claimed: it stays `queued` (or `failed`, awaiting its retry), its
//! attempts untouched, and the worker puts its queue task back to be fetched again after
//! [`HOLD_BACK`]. A job left `running` by a worker that died counts until it is rescued.

use std::{collections::HashSet, time::Duration};

use crate::{Db, DbError, config::LimitsConfig, jobs::Claimed};

/// How long a queue task held back by a limit waits before it is fetched again: a slot that
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

/// One row of the Postgres claim: a job claimed, or one held back by a limit.
#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    user_id: String,
    kind: String,
    input: String,
    attempts: i32,
    max_attempts: i32,
    held: bool,
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

/// Claims the jobs `ids` that fit the limits (marked running on `worker`, the attempt
/// counted, as `jobs::claim_many` does) and answers them with the ids of the runnable jobs the
/// limits held back. A job that must not run (cancelled, finished, unknown) is in neither.
pub(crate) async fn claim(
    db: &Db,
    worker: &str,
    ids: &[String],
    now: i64,
    limits: &Limits,
) -> Result<(Vec<Claimed>, HashSet<String>), DbError> {
    const SET: &str = "SET status = 'running', attempts = attempts + 1, worker = ";
    const RUNNABLE: &str = "status IN ('queued', 'failed', 'running') AND NOT cancel_requested";
    let mut tx = db.begin().await?;
    let out = match &mut tx {
        crate::db::Tx::Postgres(conn) => {
            sqlx::query(
                "SELECT pg_advisory_xact_lock($1, k) FROM (SELECT DISTINCT hashtext(j.user_id) AS k \
                 FROM UNNEST($2::text[]) AS c (id) JOIN tally_jobs AS j ON j.id = c.id) AS u ORDER BY k",
            )
            .bind(USER_LOCK_CLASS)
            .bind(ids)
            .execute(&mut **conn)
            .await?;
            let sql = format!(
                "WITH c (id, ord) AS (SELECT * FROM UNNEST($3::text[]) WITH ORDINALITY), \
                 cand AS (SELECT j.id, j.user_id, j.kind, c.ord FROM c JOIN tally_jobs AS j \
                 ON j.id = c.id WHERE j.{RUNNABLE}), \
                 lim (kind, n) AS (SELECT * FROM UNNEST($4::text[], $5::bigint[])), {}, \
                 u AS (UPDATE tally_jobs {SET}$1, started_at = COALESCE(started_at, $2), \
                 updated_at = $2 FROM ok WHERE tally_jobs.id = ok.id AND tally_jobs.{RUNNABLE} \
                 RETURNING tally_jobs.id, tally_jobs.user_id, kind, input, attempts, max_attempts) \
                 SELECT id, user_id, kind, input, attempts, max_attempts, FALSE AS held FROM u \
                 UNION ALL SELECT id, user_id, kind, '', 0, 0, TRUE FROM cand \
                 WHERE id <> ALL(ARRAY(SELECT id FROM ok))",
                fitting(
                    "user_id = ANY(ARRAY(SELECT user_id FROM cand))",
                    "id <> ALL($3::text[])",
                    "$6::bigint",
                    "$6"
                )
            );
            let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(worker)
                .bind(now)
                .bind(ids)
                .bind(&limits.kinds)
                .bind(&limits.per_kind)
                .bind(limits.per_user)
                .fetch_all(&mut **conn)
                .await?;
            let mut claimed = Vec::new();
            let mut held = HashSet::new();
            for r in rows {
                if r.held {
                    held.insert(r.id);
                } else {
                    claimed.push(Claimed {
                        id: r.id,
                        user_id: r.user_id,
                        kind: r.kind,
                        input: r.input,
                        attempts: r.attempts,
                        max_attempts: r.max_attempts,
                    });
                }
            }
            (claimed, held)
        }
        crate::db::Tx::Sqlite(conn) => {
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
            // Each marker in the clause becomes the per-user limit, bound.
            let clause = fitting(
                "user_id IN (SELECT user_id FROM cand)",
                "id NOT IN (SELECT id FROM c)",
                "\u{1}",
                "\u{1}",
            );
            qb.push("), ");
            let mut rest = clause.as_str();
            while let Some(pos) = rest.find('\u{1}') {
                qb.push(&rest[..pos]).push_bind(limits.per_user);
                rest = &rest[pos + 1..];
            }
            qb.push(rest)
                .push(format!(" UPDATE tally_jobs {SET}"))
                .push_bind(worker)
                .push(", started_at = COALESCE(started_at, ")
                .push_bind(now)
                .push("), updated_at = ")
                .push_bind(now)
                .push(format!(
                    " WHERE id IN (SELECT id FROM ok) AND {RUNNABLE} \
                     RETURNING id, user_id, kind, input, attempts, max_attempts"
                ));
            let claimed: Vec<Claimed> = qb.build_query_as().fetch_all(&mut **conn).await?;
            // Held back: the runnable jobs of the batch this claim did not take.
            let taken: HashSet<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
            let rest: Vec<&String> = ids
                .iter()
                .filter(|id| !taken.contains(id.as_str()))
                .collect();
            let mut held = HashSet::new();
            if !rest.is_empty() {
                let mut qb = sqlx::QueryBuilder::new("SELECT id FROM tally_jobs WHERE id IN (");
                let mut list = qb.separated(", ");
                for id in rest {
                    list.push_bind(id);
                }
                qb.push(format!(") AND {RUNNABLE}"));
                let ids: Vec<String> = qb.build_query_scalar().fetch_all(&mut **conn).await?;
                held.extend(ids);
            }
            (claimed, held)
        }
    };
    tx.commit().await?;
    Ok(out)
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
