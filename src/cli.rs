//! Commands, flags and the one place that turns errors into a message and an exit code
//! (2: bad configuration or usage; 3: the database; 4: the ledger failed verification;
//! 1: anything else).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use tally_api::AppState;
use tally_ledger::VerifierKey;
use tally_workers::WorkerPool;
use tally_workflows::{
    Db, DbError,
    config::{Config, ConfigError},
    ledger::log::{self as ledger_log, Keys},
    users::{self, Role, UserError},
};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "tally", version, about = "A job platform for AI products")]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Database: postgres://... or sqlite://FILE (default: sqlite://<data-dir>/tally.db).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Folder for the embedded database and local state.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// API, every worker pool and cron in one process, on SQLite, with no setup.
    Dev {
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// The API only.
    Serve {
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// One worker process; start more to scale.
    Work {
        /// Comma-separated queues to serve (ai, payments, notify, system).
        #[arg(long, value_delimiter = ',')]
        queues: Option<Vec<String>>,
        /// Jobs run at once per queue.
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Apply database migrations, then exit.
    Migrate,
    /// Manage users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Print the effective configuration, secrets redacted.
    Config,
    /// Measure enqueue and drain throughput and HTTP submission rate.
    Bench(crate::bench::BenchArgs),
    /// Checkpoint signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The signed credit ledger: audit and export.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Make a new Ed25519 checkpoint signing key. The private key goes to --out (mode 0600) or,
    /// without it, to standard output; the public (verifier) key is printed on standard error.
    Generate {
        /// The key's name, shown in every signature line.
        #[arg(long, default_value = "tally")]
        name: String,
        /// File to write the private key to (refuses to overwrite).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Recompute every entry, the Merkle tree, every checkpoint's root and signature, and every
    /// balance from a replay. Exits 4 naming the first problem.
    Verify {
        /// Verify an export folder instead of the database (no database needed).
        #[arg(long)]
        export: Option<PathBuf>,
        /// Trust this verifier key (repeatable). Default: the configured keys, or for an
        /// export without configured keys, the export's own keys.txt.
        #[arg(long = "key")]
        keys: Vec<String>,
    },
    /// Write the entries (JSON Lines), checkpoints, public keys and balances into a folder.
    Export {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum UsersCommand {
    /// Create a user and print their API key (shown once).
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "user")]
        role: String,
    },
}

/// An error as the CLI reports it.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub hint: Option<String>,
    pub code: u8,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            hint: None,
            code: 2,
        }
    }
    pub fn other(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            hint: None,
            code: 1,
        }
    }
    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::usage(e.to_string())
    }
}

impl From<DbError> for CliError {
    fn from(e: DbError) -> Self {
        let hint = match &e {
            DbError::BadUrl(_) => None,
            _ => Some("check DATABASE_URL and that the database server is running".to_owned()),
        };
        CliError {
            message: e.to_string(),
            hint,
            code: if matches!(e, DbError::BadUrl(_)) {
                2
            } else {
                3
            },
        }
    }
}

impl From<UserError> for CliError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::Db(e) => e.into(),
            other => CliError::usage(other.to_string()),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::other(e.to_string())
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| {
        // apalis-core logs each failure of a worker and each restart, sqlx-core each pooled
        // connection a restarted server dropped; Tally logs an outage once instead
        // (`tally_workflows::outage`).
        tracing_subscriber::EnvFilter::new(
            "info,apalis=warn,apalis_core=off,sqlx=warn,sqlx_core=error",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

impl Cli {
    fn overrides(&self) -> BTreeMap<String, toml::Value> {
        let mut o = BTreeMap::new();
        if let Some(url) = &self.database_url {
            o.insert("database_url".into(), toml::Value::String(url.clone()));
        }
        if let Some(dir) = &self.data_dir {
            o.insert(
                "data_dir".into(),
                toml::Value::String(dir.display().to_string()),
            );
        }
        match &self.command {
            Command::Dev { addr: Some(a) } | Command::Serve { addr: Some(a) } => {
                o.insert("addr".into(), toml::Value::String(a.to_string()));
            }
            Command::Work {
                queues,
                concurrency,
            } => {
                if let Some(q) = queues {
                    o.insert(
                        "worker.queues".into(),
                        toml::Value::Array(
                            q.iter()
                                .map(|s| toml::Value::String(s.trim().to_owned()))
                                .collect(),
                        ),
                    );
                }
                if let Some(c) = concurrency {
                    o.insert("worker.concurrency".into(), toml::Value::Integer(*c as i64));
                }
            }
            _ => {}
        }
        o
    }
}

/// SIGTERM or Ctrl-C, once, for every part of the process.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

/// Closes the pool, but never lets a connection that is still checked out hold up the exit.
async fn close(db: Db) {
    if tokio::time::timeout(std::time::Duration::from_secs(2), db.close())
        .await
        .is_err()
    {
        tracing::warn!("database connections still busy at exit; closing anyway");
    }
}

async fn open(cfg: &Config) -> Result<Db, CliError> {
    Ok(Db::connect(&cfg.database_url(), cfg.max_connections).await?)
}

async fn open_ready(cfg: &Config) -> Result<Db, CliError> {
    let db = open(cfg).await?;
    if !db.ready().await? {
        return Err(
            CliError::usage("the database is not migrated").hint("run `tally migrate` first")
        );
    }
    Ok(db)
}

/// The ledger keys the configuration names (`tally dev` falls back to one in its data folder).
fn ledger_keys(cfg: &Config, dev: bool) -> Result<Keys, CliError> {
    let fallback =
        if dev && cfg.ledger.signing_key.is_none() && cfg.ledger.signing_key_file.is_none() {
            Some(ledger_log::dev_key(&cfg.data_dir).map_err(CliError::usage)?)
        } else {
            None
        };
    let keys = Keys::load(&cfg.ledger, fallback).map_err(CliError::usage)?;
    if keys.signer.is_none() {
        tracing::info!(
            "no ledger.signing_key: this process commits transfers but does not sign checkpoints"
        );
    }
    Ok(keys)
}

/// The ledger's background work for this process, stopped by `token`.
fn maintenance(
    db: &Db,
    cfg: &Config,
    keys: &Keys,
    token: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    ledger_log::spawn_maintenance(
        db.clone(),
        keys.signer.clone(),
        cfg.ledger.clone(),
        token.clone(),
    )
}

fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:40}} {{pos}}/{{len}} entries ({{per_sec}}, {{eta}} left)"
    )) {
        bar.set_style(style);
    }
    bar
}

fn verdict(result: Result<tally_ledger::Report, String>, database: bool) -> Result<(), CliError> {
    match result {
        Ok(report) => {
            // Reservations and jobs are in the database, not in an export.
            let derived = if database {
                format!(
                    ", {} reservations and {} jobs' costs checked against their transfers",
                    report.reservations, report.jobs
                )
            } else {
                String::new()
            };
            println!(
                "ledger verified: {} entries in the log ({} not yet integrated), {} checkpoints, {} accounts{derived}; root {} at size {}",
                report.entries,
                report.pending,
                report.checkpoints,
                report.accounts,
                report.root,
                report.size
            );
            Ok(())
        }
        Err(why) => Err(CliError {
            message: format!("ledger verification failed: {why}"),
            hint: None,
            code: 4,
        }),
    }
}

async fn run_ledger(cfg: &Config, command: LedgerCommand) -> Result<(), CliError> {
    match command {
        LedgerCommand::Verify {
            export: Some(dir),
            keys,
        } => {
            let mut trusted = parse_keys(&keys)?;
            if trusted.is_empty() {
                trusted = Keys::load(&cfg.ledger, None)
                    .map_err(CliError::usage)?
                    .trusted;
            }
            let trusted = (!trusted.is_empty()).then_some(trusted);
            if trusted.is_none() {
                eprintln!("note: trusting the keys in the export's keys.txt; pin keys with --key");
            }
            let bar = progress_bar("verifying");
            let result = tally_ledger::export::verify_export(&dir, trusted, None, &mut |n| {
                bar.set_length(bar.length().unwrap_or(0).max(n));
                bar.set_position(n)
            });
            bar.finish_and_clear();
            match result {
                Ok(report) => verdict(Ok(report), false),
                Err(tally_ledger::export::ExportError::Finding(f)) => {
                    verdict(Err(f.to_string()), false)
                }
                Err(e) => Err(CliError::usage(e.to_string())),
            }
        }
        LedgerCommand::Verify { export: None, keys } => {
            let mut trusted = Keys::load(&cfg.ledger, None)
                .map_err(CliError::usage)?
                .trusted;
            trusted.extend(parse_keys(&keys)?);
            if trusted.is_empty() {
                return Err(CliError::usage("no trusted ledger keys").hint(
                    "set ledger.signing_key, ledger.signing_key_file or ledger.verifier_keys, or pass --key",
                ));
            }
            let db = open_ready(cfg).await?;
            let bar = progress_bar("verifying");
            let result = ledger_log::verify(
                &db,
                trusted,
                Some(cfg.ledger.origin.clone()),
                &mut |done, total| {
                    bar.set_length(total);
                    bar.set_position(done)
                },
            )
            .await?;
            bar.finish_and_clear();
            close(db).await;
            verdict(result.map_err(|f| f.to_string()), true)
        }
        LedgerCommand::Export { out } => {
            let db = open_ready(cfg).await?;
            let keys = Keys::load(&cfg.ledger, None).map_err(CliError::usage)?;
            // Sign what is waiting first, so the export covers every committed transfer.
            if let Some(signer) = &keys.signer {
                ledger_log::integrate(&db, signer, &cfg.ledger.origin, usize::MAX >> 1).await?;
            }
            let bar = progress_bar("exporting");
            let done = ledger_log::export_to(&db, &out, &keys.trusted, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done)
            })
            .await
            .map_err(|e| match e {
                ledger_log::ExportError::Db(e) => CliError::from(e),
                other => CliError::other(other.to_string()),
            })?;
            bar.finish_and_clear();
            close(db).await;
            println!(
                "exported {} entries, {} checkpoints and {} keys to {}{}",
                done.entries,
                done.checkpoints,
                done.keys,
                out.display(),
                if done.balances {
                    ""
                } else {
                    " (balances left out: some transfers are not signed into the log yet)"
                }
            );
            Ok(())
        }
    }
}

fn parse_keys(texts: &[String]) -> Result<Vec<VerifierKey>, CliError> {
    texts
        .iter()
        .map(|t| VerifierKey::parse(t).map_err(|e| CliError::usage(format!("--key {t:?}: {e}"))))
        .collect()
}

/// Makes sure an admin can log in: the `TALLY_ADMIN_KEY` one, or (when `create` and no admin
/// exists yet) a new one whose key is printed.
async fn ensure_admin(db: &Db, cfg: &Config, create: bool) -> Result<(), CliError> {
    if let Some(key) = &cfg.admin_key {
        users::ensure_admin_key(db, key.expose()).await?;
    } else if create && !users::admin_exists(db).await? {
        let admin = users::create(db, "admin@tally.local", Role::Admin, None).await?;
        println!(
            "created admin user {} with API key: {}",
            admin.email, admin.api_key
        );
    }
    Ok(())
}

async fn bind(cfg: &Config) -> Result<tokio::net::TcpListener, CliError> {
    tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| CliError::usage(format!("cannot listen on {}: {e}", cfg.addr)))
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    init_tracing();
    let mut cfg = Config::load(cli.config.as_deref(), cli.overrides())?;
    if matches!(
        cli.command,
        Command::Dev { .. } | Command::Serve { .. } | Command::Work { .. }
    ) {
        tally_workers::ai::discover_models(&mut cfg.ai).await;
    }
    match cli.command {
        Command::Config => {
            print!("{}", cfg.redacted_toml());
            Ok(())
        }
        Command::Migrate => {
            let db = open(&cfg).await?;
            db.migrate().await?;
            println!("migrations applied ({})", db.backend().name());
            Ok(())
        }
        Command::Users {
            command: UsersCommand::Create { email, role },
        } => {
            let role = Role::parse(&role).ok_or_else(|| {
                CliError::usage(format!("--role must be user or admin, not {role:?}"))
            })?;
            let db = open_ready(&cfg).await?;
            let user = users::create(&db, &email, role, None).await?;
            println!(
                "{}",
                serde_json::json!({ "id": user.id, "email": user.email, "role": user.role, "api_key": user.api_key })
            );
            Ok(())
        }
        Command::Dev { .. } => {
            let db = open(&cfg).await?;
            db.migrate().await?;
            ensure_admin(&db, &cfg, true).await?;
            let listener = bind(&cfg).await?;
            let addr = listener.local_addr()?;
            println!(
                "Tally dev is listening on http://{addr} (database {})",
                tally_workflows::config::redact_url(&cfg.database_url())
            );
            let keys = ledger_keys(&cfg, true)?;
            let token = shutdown_token();
            let ledger = maintenance(&db, &cfg, &keys, &token);
            let state = AppState::new(db.clone(), cfg.clone(), keys);
            let api = tally_api::serve(listener, state, token.clone().cancelled_owned());
            let pool = WorkerPool::new(db.clone(), cfg.clone());
            let workers = pool.run(token.clone().cancelled_owned());
            let (api, workers) = tokio::join!(api, workers);
            api?;
            workers?;
            let _ = ledger.await;
            close(db).await;
            Ok(())
        }
        Command::Serve { .. } => {
            let db = open_ready(&cfg).await?;
            ensure_admin(&db, &cfg, false).await?;
            let listener = bind(&cfg).await?;
            println!(
                "Tally API is listening on http://{}",
                listener.local_addr()?
            );
            let keys = ledger_keys(&cfg, false)?;
            let token = shutdown_token();
            let ledger = maintenance(&db, &cfg, &keys, &token);
            let state = AppState::new(db.clone(), cfg, keys);
            tally_api::serve(listener, state, token.clone().cancelled_owned()).await?;
            token.cancel();
            let _ = ledger.await;
            close(db).await;
            Ok(())
        }
        Command::Work { .. } => {
            let db = open_ready(&cfg).await?;
            let keys = ledger_keys(&cfg, false)?;
            let token = shutdown_token();
            let ledger = maintenance(&db, &cfg, &keys, &token);
            let pool = WorkerPool::new(db.clone(), cfg);
            println!("Tally worker {} started", pool.name());
            pool.run(token.clone().cancelled_owned()).await?;
            token.cancel();
            let _ = ledger.await;
            close(db).await;
            Ok(())
        }
        Command::Bench(args) => crate::bench::run(cfg, args).await,
        Command::Keys {
            command: KeysCommand::Generate { name, out },
        } => {
            let key = match &out {
                Some(path) => ledger_log::write_new_key(path, &name).map_err(CliError::usage)?,
                None => {
                    let key = tally_ledger::SignerKey::generate(&name)
                        .map_err(|e| CliError::usage(e.to_string()))?;
                    println!("{}", key.encode());
                    key
                }
            };
            if let Some(path) = &out {
                eprintln!("private key written to {}", path.display());
            }
            eprintln!("verifier key: {}", key.verifier().encode());
            Ok(())
        }
        Command::Ledger { command } => run_ledger(&cfg, command).await,
    }
}
