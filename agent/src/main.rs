//! `walvault-agent`: runs beside PostgreSQL and streams its WAL into a walvault archive; takes
//! base backups; applies retention; makes signing keys.
//!
//! Exit codes ([`walvault_shared::exit`]): 0 success (`run`: clean shutdown with everything
//! received archived); 1 failure (cannot connect at start, another cluster's archive, split
//! brain, refused password, WAL still unarchived when the shutdown deadline passed, …); 2 usage
//! or configuration error.

mod basebackup;
mod cli;
mod config;
mod http;
mod metrics;
mod replication;
mod retention;
mod schedule;
mod stream;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::sign::SigningKey;
use walvault_shared::archive::write::Writer;
use walvault_shared::exit::usage;

use cli::{BackupCmdArgs, Cli, Cmd, ExpireArgs, KeygenArgs, RunArgs};
use replication::conninfo::ConnParams;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut log_json = false;
    match run(cli, &mut log_json) {
        Ok(code) => code,
        Err(e) => {
            // Once: as a JSON log record for log pipelines, else as plain text with its hints.
            if log_json {
                tracing::error!("{e:#}");
            } else {
                eprintln!("walvault-agent: {e:#}");
            }
            walvault_shared::exit::code_of(&e)
        }
    }
}

fn run(cli: Cli, log_json: &mut bool) -> Result<ExitCode> {
    if let Cmd::Keygen(k) = &cli.cmd {
        return keygen(k);
    }
    let common = match &cli.cmd {
        Cmd::Run(a) => &a.archive,
        Cmd::Backup(a) => &a.archive,
        Cmd::Expire(a) => &a.archive,
        Cmd::Keygen(_) => unreachable!("handled above"),
    };
    let (file, common) = config::common(common).map_err(usage)?;
    *log_json = common.log_json;
    init_logging(common.log_json);
    // One thread for all async work (the replication stream, uploads, scheduled backups);
    // zstd and other CPU work run on the blocking pool, the status endpoint on its own thread.
    // Measured under full-speed pgbench OLTP, where WAL arrives as thousands of small messages a
    // second: a multi-thread runtime spent 15-40% more CPU per GiB on cross-thread wake-ups
    // (bench/RESULTS.md, docs/operations.md).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(a) => run_agent(*a, file, common).await,
            Cmd::Backup(a) => backup_once(a, file, common).await,
            Cmd::Expire(a) => expire_once(a, file, common).await,
            Cmd::Keygen(_) => unreachable!("handled above"),
        }
    })?;
    Ok(ExitCode::SUCCESS)
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

fn keygen(k: &KeygenArgs) -> Result<ExitCode> {
    let key = SigningKey::generate();
    key.write_new(&k.signing_key)?;
    println!("{}", key.verify_key());
    eprintln!(
        "walvault-agent: wrote the signing key {} (mode 0600; keep it on the agent's host only, and back it up).\n\
         The line above is its verify key: give it to walvault-recover as --verify-key (it is not secret).",
        k.signing_key.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Open the archive for writing, signing with the configured key and encrypting to the
/// configured recipients.
async fn open_writer(
    common: &config::Common,
    signer: Option<Arc<SigningKey>>,
    recipients: Option<walvault_shared::archive::crypt::Recipients>,
) -> Result<Writer> {
    let store = walvault_shared::storage::open(&common.archive, &common.s3).await?;
    // Tests (debug builds only) put a fault-injecting store under the agent.
    #[cfg(debug_assertions)]
    let store = match std::env::var_os("WALVAULT_TEST_FAULTS") {
        Some(p) => walvault_shared::storage::faulty::controlled_by_file(store, p.into()),
        None => store,
    };
    let w = Writer::new(store, signer);
    Ok(match recipients {
        Some(r) => w.with_encryption(r),
        None => w,
    })
}

async fn run_agent(a: RunArgs, file: config::FileConfig, common: config::Common) -> Result<()> {
    let stream_cfg = config::stream(&a.stream, &file).map_err(usage)?;
    let schedule = config::schedule(&a.schedule, &file).map_err(usage)?;
    let backup_cfg = config::backup(&a.backup, &file).map_err(usage)?;
    let policy = config::retention(&a.retention, &file);
    let signer = config::signer(&a.server, &file).map_err(usage)?;
    let recipients = config::encryption(&a.server, &file).map_err(usage)?;
    let rotation = config::key_rotation(&a.stream, &file).map_err(usage)?;
    let mut params = ConnParams::parse_with_process_env(&config::pg_url(&a.server, &file)).map_err(usage)?;
    if let Some(name) = config::application_name(&a.stream, &file) {
        params.application_name = name;
    }
    if stream_cfg.synchronous {
        tracing::info!(
            application_name = %params.application_name,
            "synchronous mode: WAL is archived as it arrives; name this agent in synchronous_standby_names"
        );
    }
    http::raise_fd_limit();
    // Bind first: a busy port is a configuration error, found before anything starts.
    let listener = config::listen(&a.stream, &file).map(|addr| http::bind(&addr)).transpose().map_err(usage)?;
    let writer = open_writer(&common, signer, recipients).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    *metrics.archive_url.lock().unwrap() = writer.store().url();
    let http = match listener {
        Some(l) => {
            tracing::info!("status on http://{}/status, metrics on /metrics", l.local_addr()?);
            Some(http::Server::start(l, metrics.clone())?)
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(watch_signals(shutdown.clone()));
    tracing::info!(archive = %writer.store().url(), server = %params.describe(), slot = %stream_cfg.slot,
        signed = writer.signer().is_some(), encrypted = writer.encrypts(), "walvault-agent starting");
    let keys = writer.encrypts().then(|| stream::rotate_keys(writer.clone(), rotation, shutdown.child_token()));
    // Backups on a schedule, and the newest backup's age from the archive whoever took it.
    let backups = schedule::Task::start(
        schedule::Context {
            params: params.clone(),
            writer: writer.clone(),
            cfg: backup_cfg,
            policy,
            metrics: metrics.clone(),
        },
        schedule,
        shutdown.child_token(),
    );
    let result = stream::run(params, writer, stream_cfg, metrics, shutdown.clone()).await;
    shutdown.cancel();
    backups.join().await;
    if let Some(k) = keys {
        let _ = k.await;
    }
    signals.abort();
    if let Some(h) = http {
        h.stop();
    }
    result
}

/// First SIGINT/SIGTERM: cancel (archive what was received, within the shutdown deadline);
/// a second one: exit at once (the slot keeps whatever was not archived).
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: sealing the open chunk and archiving it (signal again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    eprintln!("walvault-agent: second signal, exiting now; WAL not yet archived stays in the replication slot");
    std::process::exit(1);
}

async fn backup_once(a: BackupCmdArgs, file: config::FileConfig, common: config::Common) -> Result<()> {
    let backup_cfg = config::backup(&a.backup, &file).map_err(usage)?;
    let policy = config::retention(&a.retention, &file);
    let signer = config::signer(&a.server, &file).map_err(usage)?;
    let recipients = config::encryption(&a.server, &file).map_err(usage)?;
    let params = ConnParams::parse_with_process_env(&config::pg_url(&a.server, &file)).map_err(usage)?;
    let writer = open_writer(&common, signer, recipients).await?;
    let d = basebackup::take_backup(&params, &writer, &backup_cfg).await?;
    println!("{}", serde_json::to_string_pretty(&d)?);
    if policy.is_set() {
        retention::expire(&writer, d.wal_segment_size, &policy, false).await?;
    }
    Ok(())
}

async fn expire_once(a: ExpireArgs, file: config::FileConfig, common: config::Common) -> Result<()> {
    let policy = config::retention(&a.retention, &file);
    if !policy.is_set() {
        return Err(usage(anyhow::anyhow!(
            "no retention policy given\nHINT: --retain-full N and/or --retain-days D (or retain_full/retain_days in the config file)"
        )));
    }
    let writer = open_writer(&common, None, None).await?;
    let id = walvault_shared::archive::identity::load_existing(&Reader::new(writer.store().clone(), None)).await?;
    let r = retention::expire(&writer, id.wal_segment_size, &policy, a.dry_run).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    println!(
        "{}kept {} backups, {verb} {} ({}), WAL cutoff {}, {verb} {} WAL objects",
        if a.dry_run { "dry run: " } else { "" },
        r.kept_backups.len(),
        r.deleted_backups.len(),
        r.deleted_backups.join(", "),
        r.wal_cutoff.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
        r.deleted_wal_objects
    );
    Ok(())
}
