//! One pool on Postgres or SQLite. Every query goes through [`with_pool!`] or [`with_tx!`], which
//! type-check the same SQL against both drivers; where the dialects differ, the SQL says so here.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    PgPool, Postgres, Sqlite, SqlitePool, Transaction,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
};

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("queue error: {0}")]
    Queue(String),
    #[error("unsupported database URL {0:?}: use postgres://... or sqlite://FILE")]
    BadUrl(String),
    #[error("batched write failed: {0}")]
    Batch(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database could not be reached (a batch's error, passed on to each of its callers).
    #[error("the database is unreachable: {0}")]
    Unavailable(String),
}

impl DbError {
    /// Whether the database could not be reached (refused, restarting, dropped the
    /// connection, or no connection came free in time), so the same work may succeed later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Sqlx(e) => connection_lost(e) || matches!(e, sqlx::Error::PoolTimedOut),
            DbError::Unavailable(_) => true,
            _ => false,
        }
    }
}

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// A connection pool on one of the two supported databases.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// An open write transaction on either database.
pub enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// Runs `$body` with `$pool` bound to the concrete pool (`&PgPool` or `&SqlitePool`).
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Postgres($pool) => $body,
            $crate::db::Db::Sqlite($pool) => $body,
        }
    };
}

/// Runs `$body` with `$conn` bound to the transaction's connection.
#[macro_export]
macro_rules! with_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::db::Tx::Postgres(tx) => {
                let $conn = &mut **tx;
                $body
            }
            $crate::db::Tx::Sqlite(tx) => {
                let $conn = &mut **tx;
                $body
            }
        }
    };
}

/// SQLite: pushes `sql` onto `qb`, with each numbered parameter (`$1`, `$2`, ...) bound by
/// `bind(qb, n)` where it appears: one text serves both dialects, though SQLite's query builder
/// numbers parameters in the order they are bound.
pub(crate) fn push_numbered(
    qb: &mut sqlx::QueryBuilder<Sqlite>,
    sql: &str,
    mut bind: impl FnMut(&mut sqlx::QueryBuilder<Sqlite>, usize),
) {
    let mut rest = sql;
    while let Some(pos) = rest.find('$') {
        let digits = rest[pos + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        match rest[pos + 1..pos + 1 + digits].parse::<usize>() {
            Ok(n) => {
                qb.push(&rest[..pos]);
                bind(qb, n);
            }
            Err(_) => {
                qb.push(&rest[..=pos]);
            }
        }
        rest = &rest[pos + 1 + digits..];
    }
    qb.push(rest);
}

static PG_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");

/// Tally's migration history lives in its own table, so it never collides with another tool's
/// `_sqlx_migrations` in the same database (apalis' own, in releases that used its tables).
const MIGRATIONS_TABLE: &str = "tally_migrations";

fn migrator(base: &Migrator) -> Migrator {
    let mut m = Migrator::with_migrations(base.migrations.to_vec());
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}

/// A pool on a `postgres://` URL that only writes queue bookkeeping a crash may lose without harm
/// (claims of jobs, heartbeats): its commits do not wait for
/// the disk (`synchronous_commit = off`). Postgres stays consistent: a commit it loses is
/// only the most recent ones, and any later commit that does wait (an outcome, a ledger
/// transfer) flushes everything before it. A claim lost that way leaves its job queued, to run
/// again, as it would had the worker died. Money and outcomes never go through such a pool.
///
/// Its statements are planned at every execution (`plan_cache_mode = force_custom_plan`), still
/// prepared once: a worker usually starts while `tally_jobs` is small, and the generic plan
/// its claim got then read the candidates' ids by scanning every job, comparing each with each
/// id (44 ms a claim once the table held 20,000 jobs, in `tally bench --ai`). A custom plan
/// sees the table's current size (see ARCHITECTURE.md, "planned at each execution").
///
/// It connects when first used, so a server that goes away while a worker process starts is
/// waited for like during any other outage, instead of ending the process.
pub async fn pg_bookkeeping_pool(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options = sqlx::postgres::PgConnectOptions::from_str(url)?.options([
        ("synchronous_commit", "off"),
        ("plan_cache_mode", "force_custom_plan"),
    ]);
    Ok(pool_options::<Postgres>()
        .max_connections(max_connections)
        .acquire_timeout(PG_ACQUIRE_TIMEOUT)
        .acquire_slow_threshold(PG_ACQUIRE_TIMEOUT)
        .connect_lazy_with(options))
}

/// Pool settings every Tally pool shares. sqlx pings a connection each time it leaves the pool
/// by default: a round trip before every statement outside a transaction and every `BEGIN`,
/// about a third of a chat job's trips to Postgres. Tally pings only a connection that sat
/// idle for a second or more, as one does when the system is quiet (when a restarted server or
/// a proxy may have dropped it); under load connections are reused within milliseconds and
/// never pinged. sqlx still pings each connection in the background when it goes back to the
/// pool. A connection that broke while in use fails its statement; [`Db::begin`] then tries
/// once more on another.
pub fn pool_options<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                // A connection that fails its ping (the server restarted since) is closed and
                // another taken, without a warning for each.
                Ok(meta.idle_for <= PING_IF_IDLE_FOR || sqlx::Connection::ping(conn).await.is_ok())
            })
        })
}

/// How long a statement waits for a Postgres connection. While the server is down, sqlx keeps
/// trying to connect until then (its pauses grow to a fifth of it), so this bounds both how
/// long a request waits before it is answered `503` and how late a waiting statement notices
/// that the server is back.
pub const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a pooled connection may sit idle before it is checked on its way out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Whether `e` says the connection itself is gone (the server restarted or dropped it), so
/// the same work may be tried again on another connection.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        // Class 08 (connection exception) and 57P01 to 57P03 (the server is shutting down or
        // restarting).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

impl Db {
    /// Connects to `postgres://...` or `sqlite://FILE` (the file and its folder are created).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = pool_options::<Postgres>()
                .max_connections(max_connections)
                .acquire_timeout(PG_ACQUIRE_TIMEOUT)
                .acquire_slow_threshold(PG_ACQUIRE_TIMEOUT)
                .connect(url)
                .await?;
            Ok(Db::Postgres(pool))
        } else if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let file = path.split('?').next().unwrap_or(path);
            if file.is_empty() {
                return Err(DbError::BadUrl(url.to_owned()));
            }
            if let Some(dir) = Path::new(file)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| DbError::Sqlx(sqlx::Error::Io(e)))?;
            }
            let opts = SqliteConnectOptions::from_str(&format!("sqlite://{file}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .pragma("cache_size", "-65536")
                .pragma("temp_store", "memory")
                .foreign_keys(true);
            let pool = pool_options::<Sqlite>()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await?;
            Ok(Db::Sqlite(pool))
        } else {
            Err(DbError::BadUrl(url.to_owned()))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies Tally's migrations. Safe to run from many processes at once (Postgres takes an
    /// advisory lock; SQLite serialises writers). (A database made by a release that queued
    /// through apalis' own tables keeps them, unused: the jobs they pointed at are queued by
    /// their own rows.)
    pub async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Db::Postgres(pool) => migrator(&PG_MIGRATIONS).run(pool).await?,
            Db::Sqlite(pool) => migrator(&SQLITE_MIGRATIONS).run(pool).await?,
        }
        Ok(())
    }

    /// True when the database answers and every Tally migration is applied.
    pub async fn ready(&self) -> Result<bool, DbError> {
        let expected = match self {
            Db::Postgres(_) => PG_MIGRATIONS.iter().count() as i64,
            Db::Sqlite(_) => SQLITE_MIGRATIONS.iter().count() as i64,
        };
        let sql = "SELECT COUNT(*) FROM tally_migrations WHERE success";
        let applied: Result<i64, sqlx::Error> = with_pool!(self, pool => {
            sqlx::query_scalar(sql).fetch_one(pool).await
        });
        match applied {
            Ok(n) => Ok(n >= expected),
            // No migrations table yet; a server going down also answers with a database
            // error, which is not that.
            Err(e @ sqlx::Error::Database(_)) if !connection_lost(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Begins a write transaction. On SQLite it takes the write lock up front (`BEGIN IMMEDIATE`)
    /// so two writers never deadlock on a lock upgrade.
    ///
    /// `BEGIN` runs in its own task: sqlx 0.9 loses track of a transaction whose `begin()` future
    /// is dropped after `BEGIN` was sent (it neither rolls back nor remembers it), and the pooled
    /// connection then runs every later statement inside that forgotten transaction. Here the
    /// task always finishes, so a caller that goes away (a client disconnect) drops a real
    /// `Transaction`, which rolls back.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        let db = self.clone();
        let started = tokio::spawn(async move {
            let begin = || async {
                Ok::<_, sqlx::Error>(match &db {
                    Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
                    Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
                })
            };
            // A pooled connection the server dropped fails and is closed; the next one may
            // have been dropped too (a restart drops them all), so once more per connection.
            let mut tries = with_pool!(&db, pool => pool.size()) + 1;
            loop {
                match begin().await {
                    Err(e) if connection_lost(&e) && tries > 1 => {
                        tries -= 1;
                        tracing::debug!(error = %e, "a pooled connection was lost; beginning on another");
                    }
                    other => break other,
                }
            }
        });
        match started.await {
            Ok(tx) => Ok(tx?),
            Err(e) => Err(DbError::Batch(format!("transaction start failed: {e}"))),
        }
    }

    /// Begins a read-only transaction that sees one snapshot of the database throughout
    /// (REPEATABLE READ on Postgres; on SQLite, a deferred transaction in WAL mode).
    pub async fn begin_read(&self) -> Result<Tx, DbError> {
        let db = self.clone();
        let started = tokio::spawn(async move {
            Ok::<_, sqlx::Error>(match db {
                Db::Postgres(pool) => Tx::Postgres(
                    pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        .await?,
                ),
                Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN DEFERRED").await?),
            })
        });
        match started.await {
            Ok(tx) => Ok(tx?),
            Err(e) => Err(DbError::Batch(format!("transaction start failed: {e}"))),
        }
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}

impl Tx {
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Postgres(_) => Backend::Postgres,
            Tx::Sqlite(_) => Backend::Sqlite,
        }
    }

    pub async fn commit(self) -> Result<(), DbError> {
        match self {
            Tx::Postgres(tx) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }
}

/// True when the error is a unique-constraint violation (same on both databases).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// `head` (a `SELECT ... WHERE x IN (`) over `ids`, in chunks SQLite can bind (it allows
/// 32,766 bound values per statement).
pub(crate) async fn sqlite_select_in<T>(
    conn: &mut sqlx::SqliteConnection,
    head: &str,
    ids: &[&str],
) -> Result<Vec<T>, DbError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
{
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        let mut qb = sqlx::QueryBuilder::new(head);
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        qb.push(")");
        out.extend(qb.build_query_as::<T>().fetch_all(&mut *conn).await?);
    }
    Ok(out)
}
