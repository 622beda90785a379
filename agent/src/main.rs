//! `walvault-agent`: runs beside PostgreSQL and streams its WAL into a walvault archive.
//!
//! Exit codes: 0 clean shutdown (SIGINT/SIGTERM, everything received archived); 1 failure
//! (cannot connect at start, another cluster's archive, split brain, refused password, …);
//! 2 usage or configuration error.

mod basebackup;
mod config;
mod http;
mod metrics;
mod replication;
mod retention;
mod schedule;
mod stream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use config::{FileConfig, RunSettings};
use replication::conninfo::ConnParams;
use stream::StreamConfig;

const EXIT_CODES: &str = "Exit codes: 0 clean shutdown; 1 failure; 2 usage or configuration error.";

#[derive(Parser)]
#[command(name = "walvault-agent", version, about = "Stream PostgreSQL WAL into a walvault archive.", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stream WAL continuously (until SIGINT/SIGTERM); take scheduled base backups.
    Run(RunArgs),
    /// Take one base backup now and exit 0 once it is complete (needs `run` streaming into the same archive).
    Backup(BackupArgs),
    /// Apply retention now: delete expired backups and the WAL only they needed.
    Expire(ExpireArgs),
}

#[derive(Args, Debug)]
struct RetentionArgs {
    /// Keep the newest N full backups.
    #[arg(long, env = "WALVAULT_RETAIN_FULL")]
    retain_full: Option<usize>,
    /// Keep what is needed to recover to any point in the last D days.
    #[arg(long, env = "WALVAULT_RETAIN_DAYS")]
    retain_days: Option<u32>,
}

#[derive(Args, Debug)]
struct BackupArgs {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
struct ExpireArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML config file; flags and WALVAULT_* variables override its keys.
    #[arg(long, env = "WALVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL connection (URL or key=value; default DATABASE_URL, then libpq's PG* variables).
    #[arg(long, env = "WALVAULT_PG_URL", hide_env_values = true)]
    pg_url: Option<String>,
    /// Archive: file:///path, a plain path, or s3://bucket/prefix.
    #[arg(long, env = "WALVAULT_ARCHIVE")]
    archive: Option<String>,
    /// Physical replication slot name [default: walvault].
    #[arg(long, env = "WALVAULT_SLOT")]
    slot: Option<String>,
    /// Do not create the slot if it is missing.
    #[arg(long, env = "WALVAULT_NO_CREATE_SLOT")]
    no_create_slot: bool,
    /// Seal and upload a chunk at least this often while WAL flows [default: 1s].
    #[arg(long, env = "WALVAULT_CHUNK_INTERVAL", value_parser = humantime::parse_duration)]
    chunk_interval: Option<Duration>,
    /// Largest chunk [default: 8MiB].
    #[arg(long, env = "WALVAULT_CHUNK_MAX_BYTES")]
    chunk_max_bytes: Option<String>,
    /// Uploads in flight [default: 4].
    #[arg(long, env = "WALVAULT_UPLOAD_CONCURRENCY")]
    upload_concurrency: Option<usize>,
    /// Give up on one upload attempt after this long and retry [default: 60s].
    #[arg(long, env = "WALVAULT_UPLOAD_TIMEOUT", value_parser = humantime::parse_duration)]
    upload_timeout: Option<Duration>,
    /// Send standby status to PostgreSQL at least this often [default: 10s].
    #[arg(long, env = "WALVAULT_STATUS_INTERVAL", value_parser = humantime::parse_duration)]
    status_interval: Option<Duration>,
    /// Serve /metrics, /healthz and /status on this address (e.g. 127.0.0.1:9187).
    #[arg(long, env = "WALVAULT_LISTEN")]
    listen: Option<String>,
    /// Log format: plain or json [default: plain]. Level from RUST_LOG (default info).
    #[arg(long, env = "WALVAULT_LOG_FORMAT")]
    log_format: Option<String>,
    /// S3 endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS).
    #[arg(long, env = "WALVAULT_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, else us-east-1).
    #[arg(long, env = "WALVAULT_S3_REGION")]
    s3_region: Option<String>,
    /// Address buckets as endpoint/bucket (MinIO, SeaweedFS, Ceph, most self-hosted stores).
    #[arg(long, env = "WALVAULT_S3_FORCE_PATH_STYLE")]
    s3_force_path_style: bool,
    /// Take a base backup this often (e.g. 24h).
    #[arg(long, env = "WALVAULT_BACKUP_INTERVAL", value_parser = humantime::parse_duration)]
    backup_interval: Option<Duration>,
    /// Take a base backup every day at this UTC time (HH:MM).
    #[arg(long, env = "WALVAULT_BACKUP_AT")]
    backup_at: Option<String>,
    /// Take a base backup once this much WAL was archived since the last one (e.g. 10GiB).
    #[arg(long, env = "WALVAULT_BACKUP_WAL_VOLUME")]
    backup_wal_volume: Option<String>,
    /// Do not take base backups from `run` (not even the first one).
    #[arg(long, env = "WALVAULT_NO_BACKUPS")]
    no_backups: bool,
    /// Base backup part size [default: 64MiB].
    #[arg(long, env = "WALVAULT_BACKUP_PART_SIZE")]
    backup_part_size: Option<String>,
    /// Spread the backup's checkpoint instead of a fast one.
    #[arg(long, env = "WALVAULT_SPREAD_CHECKPOINT")]
    spread_checkpoint: bool,
    #[command(flatten)]
    retention: RetentionArgs,
}

/// A usage or configuration error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct ConfigError(anyhow::Error);

fn settings(a: RunArgs) -> Result<RunSettings, ConfigError> {
    let inner = || -> Result<RunSettings> {
        let file = match &a.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let d = StreamConfig::default();
        let chunk_max_bytes = match a.chunk_max_bytes.or(file.chunk_max_bytes) {
            Some(s) => config::parse_bytes(&s)?,
            None => d.chunk_max_bytes,
        };
        let stream = StreamConfig {
            slot: a.slot.or(file.slot).unwrap_or(d.slot),
            create_slot: !a.no_create_slot && file.create_slot.unwrap_or(true),
            chunk_interval: a.chunk_interval.or(file.chunk_interval).unwrap_or(d.chunk_interval),
            chunk_max_bytes,
            upload_concurrency: a.upload_concurrency.or(file.upload_concurrency).unwrap_or(d.upload_concurrency),
            upload_timeout: a.upload_timeout.or(file.upload_timeout).unwrap_or(d.upload_timeout),
            status_interval: a.status_interval.or(file.status_interval).unwrap_or(d.status_interval),
            ..d
        };
        config::validate_stream(&stream)?;
        let archive = a.archive.or(file.archive).context(
            "no archive given\nHINT: --archive file:///var/lib/walvault/archive (or s3://bucket/prefix), or archive = … in the config file",
        )?;
        walvault_shared::storage::RepoUrl::parse(&archive)?;
        let pg_url = a.pg_url.or(file.pg_url).or_else(|| std::env::var("DATABASE_URL").ok()).unwrap_or_default();
        let log_format = a.log_format.or(file.log_format).unwrap_or_else(|| "plain".into());
        let log_json = match log_format.as_str() {
            "plain" => false,
            "json" => true,
            o => anyhow::bail!("invalid log format {o:?}: use plain or json"),
        };
        let s3 = walvault_shared::storage::s3::S3Options {
            endpoint: a.s3_endpoint.or(file.s3_endpoint),
            region: a.s3_region.or(file.s3_region),
            force_path_style: a.s3_force_path_style || file.s3_force_path_style.unwrap_or(false),
            ..Default::default()
        };
        let no_backups = a.no_backups || file.no_backups.unwrap_or(false);
        let backup_at = a.backup_at.or(file.backup_at).map(|s| config::parse_daily_time(&s)).transpose()?;
        let wal_volume = a.backup_wal_volume.or(file.backup_wal_volume).map(|s| config::parse_bytes(&s)).transpose()?;
        let schedule = config::Schedule {
            interval: a.backup_interval.or(file.backup_interval),
            daily_at: backup_at,
            wal_volume: wal_volume.map(|v| v as u64),
            initial: !no_backups,
        };
        let bd = basebackup::BackupConfig::default();
        let backup = basebackup::BackupConfig {
            part_size: match a.backup_part_size.or(file.backup_part_size) {
                Some(s) => config::parse_bytes(&s)?.max(1 << 20),
                None => bd.part_size,
            },
            fast_checkpoint: !(a.spread_checkpoint || file.spread_checkpoint.unwrap_or(false)),
            ..bd
        };
        let retention = retention::RetentionPolicy {
            retain_full: a.retention.retain_full.or(file.retain_full),
            retain_days: a.retention.retain_days.or(file.retain_days),
        };
        let schedule = if no_backups { config::Schedule::default() } else { schedule };
        Ok(RunSettings {
            pg_url,
            archive,
            stream,
            listen: a.listen.or(file.listen),
            log_json,
            s3,
            schedule,
            backup,
            retention,
        })
    };
    inner().map_err(ConfigError)
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour only for a terminal: journald and log files get plain text.
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run_agent(s: RunSettings) -> Result<()> {
    let params = ConnParams::parse_with_process_env(&s.pg_url).map_err(ConfigError)?;
    let store = walvault_shared::storage::open(&s.archive, &s.s3).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    *metrics.archive_url.lock().unwrap() = store.url();
    if let Some(addr) = &s.listen {
        let listener = http::bind(addr).await?;
        tracing::info!("status on http://{}/status, metrics on /metrics", listener.local_addr()?);
        tokio::spawn(http::serve(listener, metrics.clone()));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: sealing the open chunk and archiving it (signal again to exit at once)");
        stop_tx.send_replace(true);
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!("walvault-agent: second signal, exiting now; WAL not yet archived stays in the replication slot");
        std::process::exit(1);
    });
    tracing::info!(archive = %store.url(), server = %params.describe(), slot = %s.stream.slot, "walvault-agent starting");
    if s.schedule.initial
        || s.schedule.interval.is_some()
        || s.schedule.daily_at.is_some()
        || s.schedule.wal_volume.is_some()
    {
        tokio::spawn(schedule::run(params.clone(), store.clone(), s.schedule, s.backup, s.retention, metrics.clone()));
    }
    stream::run(params, store, s.stream, metrics, stop_rx).await
}

async fn backup_once(s: RunSettings) -> Result<()> {
    let params = ConnParams::parse_with_process_env(&s.pg_url).map_err(ConfigError)?;
    let store = walvault_shared::storage::open(&s.archive, &s.s3).await?;
    let d = basebackup::take_backup(&params, store.clone(), &s.backup).await?;
    println!("{}", serde_json::to_string_pretty(&d)?);
    if s.retention.is_set() {
        retention::expire(&*store, d.wal_segment_size, &s.retention, false).await?;
    }
    Ok(())
}

async fn expire_once(s: RunSettings, dry_run: bool, json: bool) -> Result<()> {
    let store = walvault_shared::storage::open(&s.archive, &s.s3).await?;
    let id = walvault_shared::archive::identity::load_existing(&*store).await?;
    if !s.retention.is_set() {
        return Err(ConfigError(anyhow::anyhow!(
            "no retention policy given\nHINT: --retain-full N and/or --retain-days D (or retain_full/retain_days in the config file)"
        ))
        .into());
    }
    let r = retention::expire(&*store, id.wal_segment_size, &s.retention, dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let verb = if dry_run { "would delete" } else { "deleted" };
        println!(
            "{}kept {} backups, {verb} {} ({}), WAL cutoff {}, {verb} {} WAL objects",
            if dry_run { "dry run: " } else { "" },
            r.kept_backups.len(),
            r.deleted_backups.len(),
            r.deleted_backups.join(", "),
            r.wal_cutoff.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            r.deleted_wal_objects
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    enum Action {
        Run,
        Backup,
        Expire { dry_run: bool, json: bool },
    }
    let (args, action) = match cli.cmd {
        Cmd::Run(a) => (a, Action::Run),
        Cmd::Backup(b) => (b.run, Action::Backup),
        Cmd::Expire(e) => (e.run, Action::Expire { dry_run: e.dry_run, json: e.json }),
    };
    let s = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("walvault-agent: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(s.log_json);
    let log_json = s.log_json;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let fut = async move {
        match action {
            Action::Run => run_agent(s).await,
            Action::Backup => backup_once(s).await,
            Action::Expire { dry_run, json } => expire_once(s, dry_run, json).await,
        }
    };
    // One thread for all async work (the replication stream, uploads, HTTP, scheduled backups);
    // zstd and other CPU work run on the blocking pool. Measured under full-speed pgbench OLTP,
    // where WAL arrives as thousands of small messages a second: a multi-thread runtime spent
    // 15-40% more CPU per GiB on cross-thread wake-ups (bench/RESULTS.md, docs/operations.md).
    let result = rt.block_on(fut);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<ConfigError>().is_some() { 2 } else { 1 };
            // Once: as a JSON log record for log pipelines, else as plain text with its hints.
            if log_json {
                tracing::error!("{e:#}");
            } else {
                eprintln!("walvault-agent: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}
