//! Cron: schedules from the configuration (`[[cron]]`) and the platform's own (reservation
//! expiry), each a cron expression with seconds in an IANA time zone that makes one job per
//! tick, however many processes run it.
//!
//! A tick is claimed by its row in `tally_cron_ticks` (primary key: schedule name, tick time),
//! inserted with `ON CONFLICT DO NOTHING` in the transaction that submits the tick's job: the
//! process whose insert wrote the row submits the job; every other process's insert writes
//! nothing, and it submits nothing. The job's id derives from the schedule and the tick too.
//!
//! After downtime a missed tick runs once: at start, when the latest tick due is later than
//! the last one stored, that latest tick is enqueued (once, by the same claim), not every tick
//! that passed. A schedule that never ran has nothing missed.
//!
//! The loop that sleeps until each next tick runs in the worker processes
//! (`tally_workers::cron`); this module holds the rules and the SQL.

use std::{collections::HashMap, str::FromStr};

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    Db, DbError,
    config::{Config, ConfigError, QUEUES},
    jobs::{self, NewJob},
    kinds::{self, Kind},
    now_ms, rfc3339,
    users::PLATFORM_USER_ID,
    with_pool, with_tx,
};

/// One `[[cron]]` entry as configured.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CronConfig {
    /// Unique among the schedules; names the schedule in its jobs' view and in errors.
    pub name: String,
    /// A cron expression with seconds: `sec min hour day-of-month month day-of-week [year]`.
    pub schedule: String,
    /// IANA time zone the expression is read in.
    #[serde(default = "utc")]
    pub timezone: String,
    /// A kind users may submit (see `tally_workflows::kinds`).
    pub kind: String,
    /// The job's input, checked against the kind's typed input at start.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    /// The queue its jobs go to (default: the kind's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// The platform's reservation expiry schedule's name (and its kind's).
pub const LEDGER_EXPIRE: &str = "ledger.expire";

/// The platform's own schedules, as configured entries.
fn platform(cfg: &Config) -> Vec<(&'static str, CronConfig)> {
    vec![(
        "ledger.expiry_schedule",
        CronConfig {
            name: LEDGER_EXPIRE.to_owned(),
            schedule: cfg.ledger.expiry_schedule.clone(),
            timezone: utc(),
            kind: crate::ledger::log::EXPIRE.name.to_owned(),
            input: Value::Object(Default::default()),
            queue: None,
        },
    )]
}

/// A schedule, parsed.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    /// The expression as configured.
    pub expression: String,
    pub timezone: Tz,
    cron: cron::Schedule,
    pub kind: &'static Kind,
    pub input: Value,
    pub queue: &'static str,
    /// One of the platform's own (its kind need not be one users may submit).
    pub platform: bool,
}

impl Schedule {
    /// Parses an entry; the error says what is wrong (the caller names the schedule).
    pub fn parse(c: &CronConfig, platform: bool) -> Result<Schedule, String> {
        let expression = c.schedule.trim();
        let fields = expression.split_whitespace().count();
        if !expression.starts_with('@') && !(6..=7).contains(&fields) {
            return Err(format!(
                "schedule {expression:?} has {fields} fields; a cron expression here has seconds \
                 first: `sec min hour day-of-month month day-of-week [year]`, e.g. \"0 */5 * * * *\""
            ));
        }
        let cron = cron::Schedule::from_str(expression)
            .map_err(|e| format!("schedule {expression:?} is not a cron expression: {e}"))?;
        let timezone = Tz::from_str(c.timezone.trim()).map_err(|_| {
            format!(
                "timezone {:?} is not an IANA time zone (such as \"UTC\" or \"Europe/Paris\")",
                c.timezone
            )
        })?;
        let kind = match kinds::lookup(&c.kind) {
            Some(k) if k.public || platform => k,
            Some(k) => {
                return Err(format!(
                    "kind {:?} is made by {}, not by cron; cron runs kinds users may submit: {}",
                    k.name,
                    k.made_by,
                    public_kinds().join(", ")
                ));
            }
            None => {
                return Err(format!(
                    "unknown job kind {:?}; cron runs kinds users may submit: {}",
                    c.kind,
                    public_kinds().join(", ")
                ));
            }
        };
        kind.check(&c.input)?;
        let queue = match &c.queue {
            None => kind.queue,
            Some(q) => QUEUES.iter().copied().find(|k| k == q).ok_or_else(|| {
                format!("unknown queue {q:?}; known queues: {}", QUEUES.join(", "))
            })?,
        };
        if cron.upcoming(timezone).next().is_none() {
            return Err(format!("schedule {expression:?} has no tick in the future"));
        }
        Ok(Schedule {
            name: c.name.clone(),
            expression: expression.to_owned(),
            timezone,
            cron,
            kind,
            input: c.input.clone(),
            queue,
            platform,
        })
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // The crate steps in local wall-clock time: across a change of the clocks (a local
        // time that happens twice) its next tick can be an instant before `t`. Compared in
        // UTC, such a tick is passed over.
        self.cron
            .after(&t.with_timezone(&self.timezone))
            .map(|u| u.with_timezone(&Utc))
            .take(4)
            .find(|u| *u > t)
    }

    /// The latest tick at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Ticks fall on whole seconds; the iterator looks strictly before its start. As in
        // `next_after`, a tick the local clock puts before `t` but UTC after it is passed over.
        let start = t + chrono::Duration::milliseconds(1);
        self.cron
            .after(&start.with_timezone(&self.timezone))
            .rev()
            .map(|u| u.with_timezone(&Utc))
            .take(4)
            .find(|u| *u <= t)
    }

    /// The id of the job of the tick at `tick_ms`: a UUIDv7 with the tick's time (so it sorts
    /// with other jobs by time), its other bits derived from the schedule's name and the tick.
    pub fn job_id(&self, tick_ms: i64) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"cron\0")
            .chain_update(self.name.as_bytes())
            .chain_update([0u8])
            .chain_update(tick_ms.to_be_bytes())
            .finalize();
        let mut rand = [0u8; 10];
        rand.copy_from_slice(&digest[..10]);
        uuid::Builder::from_unix_timestamp_millis(tick_ms.max(0) as u64, &rand)
            .into_uuid()
            .to_string()
    }
}

fn public_kinds() -> Vec<&'static str> {
    kinds::REGISTRY
        .iter()
        .filter(|k| k.public)
        .map(|k| k.name)
        .collect()
}

/// Every schedule in effect: the platform's own, then the configured ones. An invalid one is
/// refused with a message that names it.
pub fn schedules(cfg: &Config) -> Result<Vec<Schedule>, ConfigError> {
    let mut out: Vec<Schedule> = Vec::new();
    let entries = platform(cfg)
        .into_iter()
        .map(|(key, c)| (key, c, true))
        .chain(cfg.cron.iter().map(|c| ("cron", c.clone(), false)));
    for (key, c, is_platform) in entries {
        let invalid = |why: String| ConfigError::Invalid {
            key,
            why: format!("schedule {:?}: {why}", c.name),
        };
        if c.name.trim().is_empty() || c.name.len() > 200 || c.name.contains(char::is_control) {
            return Err(invalid(
                "a schedule's name is 1 to 200 printable characters".to_owned(),
            ));
        }
        if out.iter().any(|s| s.name == c.name) {
            return Err(invalid(
                "two schedules share this name (the platform's own are named ledger.*)".to_owned(),
            ));
        }
        out.push(Schedule::parse(&c, is_platform).map_err(invalid)?);
    }
    Ok(out)
}

// ---- storage: tally_cron_ticks ----

/// Claims the tick at `tick` of `schedule` and submits its job, in one transaction. Returns the
/// job's id, or `None` when the tick was already claimed (by another process, or earlier).
pub async fn enqueue_tick(
    db: &Db,
    schedule: &Schedule,
    tick: DateTime<Utc>,
    max_attempts: u32,
) -> Result<Option<String>, DbError> {
    let tick_ms = tick.timestamp_millis();
    let job_id = schedule.job_id(tick_ms);
    let mut tx = db.begin().await?;
    let sql = "INSERT INTO tally_cron_ticks (name, tick_at, job_id, created_at) \
               VALUES ($1, $2, $3, $4) ON CONFLICT (name, tick_at) DO NOTHING";
    let claimed = with_tx!(&mut tx, conn => {
        sqlx::query(sql)
            .bind(&schedule.name)
            .bind(tick_ms)
            .bind(&job_id)
            .bind(now_ms())
            .execute(&mut *conn)
            .await?
            .rows_affected()
    });
    if claimed == 0 {
        return Ok(None);
    }
    let job = NewJob {
        id: Some(job_id.clone()),
        request_hash: job_id.clone(),
        queue: schedule.queue,
        max_attempts,
        ..NewJob::new(PLATFORM_USER_ID, schedule.kind, schedule.input.clone())
    };
    match jobs::submit_in(&mut tx, vec![job]).await?.pop() {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            // A free job with an id of its own is refused only if its id is taken by a
            // different request: the tick is not claimed then either.
            return Err(DbError::Corrupt(format!(
                "cron {:?}: the job of tick {} was refused: {e}",
                schedule.name,
                rfc3339(tick_ms)
            )));
        }
        None => return Err(DbError::Corrupt("submit answered nothing".into())),
    }
    tx.commit().await?;
    crate::events::publish([job_id.as_str()]);
    Ok(Some(job_id))
}

/// A schedule's latest stored tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastTick {
    /// RFC 3339.
    pub at: String,
    pub job_id: String,
    /// Its job's status now.
    pub status: String,
    #[serde(skip)]
    pub at_ms: i64,
}

/// The latest stored tick of each of `schedules`, by name.
pub async fn last_ticks(
    db: &Db,
    schedules: &[Schedule],
) -> Result<HashMap<String, LastTick>, DbError> {
    // One probe of the primary key's end per schedule (a handful): the ticks table keeps every
    // tick, so a statement over all of it would grow with time. A tick whose job was deleted
    // shows the job as `deleted`.
    let sql = "SELECT t.tick_at, t.job_id, j.status FROM tally_cron_ticks t \
               LEFT JOIN tally_jobs j ON j.id = t.job_id \
               WHERE t.name = $1 ORDER BY t.tick_at DESC LIMIT 1";
    let mut out = HashMap::new();
    for s in schedules {
        let row: Option<(i64, String, Option<String>)> = with_pool!(db, pool => {
            sqlx::query_as(sql).bind(&s.name).fetch_optional(pool).await?
        });
        if let Some((at_ms, job_id, status)) = row {
            let tick = LastTick {
                at: rfc3339(at_ms),
                job_id,
                status: status.unwrap_or_else(|| "deleted".to_owned()),
                at_ms,
            };
            out.insert(s.name.clone(), tick);
        }
    }
    Ok(out)
}

/// The tick each of these jobs was made for (those made by cron): `(schedule, tick ms)` by
/// job id.
pub async fn ticks_of(
    db: &Db,
    job_ids: &[&str],
) -> Result<HashMap<String, (String, i64)>, DbError> {
    if job_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String, i64)> = match db {
        Db::Postgres(pool) => {
            sqlx::query_as(
                "SELECT job_id, name, tick_at FROM tally_cron_ticks WHERE job_id = ANY($1)",
            )
            .bind(job_ids)
            .fetch_all(pool)
            .await?
        }
        Db::Sqlite(pool) => {
            let mut qb = sqlx::QueryBuilder::new(
                "SELECT job_id, name, tick_at FROM tally_cron_ticks WHERE job_id IN (",
            );
            let mut list = qb.separated(", ");
            for id in job_ids {
                list.push_bind(*id);
            }
            qb.push(")");
            qb.build_query_as().fetch_all(pool).await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|(job, name, at)| (job, (name, at)))
        .collect())
}

/// What a job's view shows of the tick that made it: `{"name", "tick"}`.
pub fn tick_view(name: &str, tick_ms: i64) -> Value {
    serde_json::json!({ "name": name, "tick": rfc3339(tick_ms) })
}

/// One schedule as an admin sees it (`GET /v1/admin/cron`).
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    pub name: String,
    pub schedule: String,
    pub timezone: String,
    /// RFC 3339; `null` when the expression has no tick left.
    pub next_tick: Option<String>,
    pub last_tick: Option<LastTick>,
}

/// Every schedule now, in order (the platform's first).
pub async fn overview(db: &Db, schedules: &[Schedule]) -> Result<Vec<ScheduleView>, DbError> {
    let mut last = last_ticks(db, schedules).await?;
    let now = Utc::now();
    Ok(schedules
        .iter()
        .map(|s| ScheduleView {
            name: s.name.clone(),
            schedule: s.expression.clone(),
            timezone: s.timezone.name().to_owned(),
            next_tick: s.next_after(now).map(|t| rfc3339(t.timestamp_millis())),
            last_tick: last.remove(&s.name),
        })
        .collect())
}

/// The tick to enqueue at start for a schedule whose last stored tick is `last_ms`: the latest
/// one due at `now`, if it is later (a missed tick runs once, however many were missed).
pub fn missed(
    schedule: &Schedule,
    last_ms: Option<i64>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let last_ms = last_ms?;
    let due = schedule.latest_at_or_before(now)?;
    (due.timestamp_millis() > last_ms).then_some(due)
}

/// `t` in UTC from stored milliseconds.
pub fn from_ms(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(schedule: &str, tz: &str, kind: &str, input: Value) -> CronConfig {
        CronConfig {
            name: "nightly".into(),
            schedule: schedule.into(),
            timezone: tz.into(),
            kind: kind.into(),
            input,
            queue: None,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn ticks_are_read_in_the_schedules_time_zone() {
        let s = Schedule::parse(
            &entry("0 30 2 * * *", "Europe/Paris", "echo", json!({})),
            false,
        )
        .unwrap();
        // 02:30 in Paris in winter is 01:30 UTC.
        assert_eq!(
            s.next_after(at("2026-12-02T00:00:00Z")),
            Some(at("2026-12-02T01:30:00Z"))
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-12-02T01:30:00Z")),
            Some(at("2026-12-02T01:30:00Z")),
            "a tick exactly now is due"
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-12-02T01:29:59.999Z")),
            Some(at("2026-12-01T01:30:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-12-02T01:30:00Z")),
            Some(at("2026-12-03T01:30:00Z")),
            "next is strictly after"
        );
    }

    #[test]
    fn a_missed_tick_runs_once_and_a_new_schedule_misses_nothing() {
        let s = Schedule::parse(&entry("*/10 * * * * *", "UTC", "echo", json!(1)), false).unwrap();
        let now = at("2026-12-02T10:00:35.5Z");
        let last = at("2026-12-02T09:00:00Z").timestamp_millis();
        assert_eq!(
            missed(&s, Some(last), now),
            Some(at("2026-12-02T10:00:30Z"))
        );
        let recent = at("2026-12-02T10:00:30Z").timestamp_millis();
        assert_eq!(missed(&s, Some(recent), now), None);
        assert_eq!(missed(&s, None, now), None);
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let e = |c: CronConfig| Schedule::parse(&c, false).unwrap_err();
        assert!(e(entry("* * * * *", "UTC", "echo", json!(1))).contains("seconds"));
        assert!(e(entry("61 * * * * *", "UTC", "echo", json!(1))).contains("not a cron"));
        assert!(e(entry("0 * * * * *", "Mars/Olympus", "echo", json!(1))).contains("IANA"));
        assert!(e(entry("0 * * * * *", "UTC", "teleport", json!(1))).contains("unknown job kind"));
        assert!(e(entry("0 * * * * *", "UTC", "chat", json!({}))).contains("not by cron"));
        assert!(
            e(entry("0 * * * * *", "UTC", "sleep", json!({"ms": "x"}))).starts_with("input.ms")
        );
        assert!(e(entry("0 0 0 1 1 * 2001", "UTC", "echo", json!(1))).contains("future"));
        let mut q = entry("0 * * * * *", "UTC", "echo", json!(1));
        q.queue = Some("nowhere".into());
        assert!(e(q).contains("unknown queue"));
    }

    #[test]
    fn ticks_across_a_change_of_the_clocks_stay_in_order() {
        let s = Schedule::parse(
            &entry("0 30 2 * * *", "Europe/Paris", "echo", json!({})),
            false,
        )
        .unwrap();
        // 2026-10-25: 02:30 in Paris happens at 00:30 UTC and again at 01:30 UTC.
        for now in [
            "2026-10-25T00:15:00Z",
            "2026-10-25T00:45:00Z",
            "2026-10-25T01:45:00Z",
            "2026-03-29T00:45:00Z",
            "2026-03-29T01:45:00Z",
        ] {
            let now = at(now);
            let next = s.next_after(now).unwrap();
            assert!(next > now, "next tick {next} after {now}");
            let last = s.latest_at_or_before(now).unwrap();
            assert!(last <= now, "latest tick {last} at or before {now}");
            assert!(
                next - now <= chrono::Duration::hours(25),
                "{next} after {now}"
            );
        }
    }

    #[test]
    fn job_ids_derive_from_the_schedule_and_tick_and_sort_by_time() {
        let s = Schedule::parse(&entry("* * * * * *", "UTC", "echo", json!(1)), false).unwrap();
        let a = s.job_id(1_000_000);
        assert_eq!(a, s.job_id(1_000_000));
        assert_ne!(a, s.job_id(1_001_000));
        assert!(a < s.job_id(1_001_000));
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 7);
    }
}
