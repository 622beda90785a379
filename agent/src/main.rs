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
mod copy;
mod http;
mod metrics;
mod replication;
mod retention;
mod schedule;
mod stream;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

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
    // glibc gives every thread that allocates its own malloc arena (up to 8 per core), and
    // each keeps what it once held: with the runtime, the blocking pool and the HTTP thread
    // that is most of the agent's RSS beyond its buffers. Two arenas are enough here.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    let mut log_json = false;
    match run(cli, &mut log_json) {
        Ok(code) => code,
        Err(e) => {
            // Once: as a JSON log record for log pipelines, else as plain text with its hints.
            if log_json {
                // The hint as a field of its own, for log pipelines.
                let text = format!("{e:#}");
                match text.split_once("\nHINT: ") {
                    Some((message, hint)) => tracing::error!(hint = %hint, "{message}"),
                    None => tracing::error!("{text}"),
                }
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
    if let Cmd::GenerateDocs { dir } = &cli.cmd {
        use clap::CommandFactory;
        walvault_shared::cligen::generate_docs(Cli::command(), dir)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Copy(_) = &cli.cmd {
        let Cmd::Copy(a) = cli.cmd else { unreachable!() };
        *log_json = a.log_format.as_deref() == Some("json");
        init_logging(*log_json);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
        rt.block_on(copy_archive(*a))?;
        return Ok(ExitCode::SUCCESS);
    }
    let common = match &cli.cmd {
        Cmd::Run(a) => &a.archive,
        Cmd::Backup(a) => &a.archive,
        Cmd::Expire(a) => &a.archive,
        Cmd::Keygen(_) | Cmd::Copy(_) | Cmd::GenerateDocs { .. } => unreachable!("handled above"),
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
            Cmd::Keygen(_) | Cmd::Copy(_) | Cmd::GenerateDocs { .. } => unreachable!("handled above"),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `copy`: the source must exist; the copy is created (local) or must be a bucket (S3).
async fn copy_archive(a: cli::CopyArgs) -> Result<()> {
    let creds = |prefix: &str| {
        let id = std::env::var(format!("WALVAULT_{prefix}_AWS_ACCESS_KEY_ID")).ok()?;
        let secret = std::env::var(format!("WALVAULT_{prefix}_AWS_SECRET_ACCESS_KEY")).ok()?;
        Some(walvault_shared::storage::s3::StaticCredentials { access_key_id: id, secret_access_key: secret })
    };
    let from_opts = walvault_shared::storage::s3::S3Options {
        endpoint: a.from_s3_endpoint.clone(),
        region: a.from_s3_region.clone(),
        force_path_style: a.from_s3_force_path_style,
        credentials: creds("FROM"),
        ..Default::default()
    };
    let to_opts = walvault_shared::storage::s3::S3Options {
        endpoint: a.to_s3_endpoint.clone(),
        region: a.to_s3_region.clone(),
        force_path_style: a.to_s3_force_path_style,
        credentials: creds("TO"),
        ..Default::default()
    };
    let verify = walvault_shared::archive::sign::VerifyKeys::from_args(&a.verify_keys).map_err(usage)?;
    let listener = a.listen.as_deref().map(http::bind).transpose().map_err(usage)?;
    let from = walvault_shared::storage::open_existing(&a.from, &from_opts).await?;
    let to = walvault_shared::storage::open(&a.to, &to_opts).await?;
    let metrics = Arc::new(copy::CopyMetrics::new());
    let http = listener.map(|l| http::Server::start(l, metrics.clone())).transpose()?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        on_signal.cancel();
    });
    tracing::info!(from = %from.url(), to = %to.url(), "copying");
    let policy =
        retention::RetentionPolicy { retain_full: a.retention.retain_full, retain_days: a.retention.retain_days };
    let copier = copy::Copier { from, to, verify, metrics };
    let r = copy::run(copier, a.interval, a.once, policy, cancel).await;
    if let Some(h) = http {
        h.stop();
    }
    r
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
        // timestamp, level, message and the event's fields (lsn, timeline, key, backup, …) at
        // the top level, as log pipelines expect.
        b.json().flatten_event(true).with_current_span(false).with_span_list(false).init();
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
/// configured recipients. `journal`: the streaming agent, the one writer of a local archive's
/// commit journal (`Some(true)`: synchronous, chunks are written through it; `Some(false)`:
/// only deletes, draining what a synchronous run left; see `walvault_shared::storage::journal`).
async fn open_writer(
    common: &config::Common,
    signer: Option<Arc<SigningKey>>,
    recipients: Option<walvault_shared::archive::crypt::Recipients>,
    journal: Option<bool>,
) -> Result<Writer> {
    let store = if let Some(puts) = journal {
        walvault_shared::storage::open_journaled(&common.archive, &common.s3, puts).await?
    } else {
        walvault_shared::storage::open(&common.archive, &common.s3).await?
    };
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
    let writer = open_writer(&common, signer, recipients, Some(stream_cfg.synchronous)).await?;
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
    let notify = tokio::spawn(systemd_notify(metrics.clone(), shutdown.child_token()));
    let result = stream::run(params, writer, stream_cfg, metrics, shutdown.clone()).await;
    shutdown.cancel();
    let _ = notify.await;
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

/// systemd (`Type=notify`): READY=1 once the agent streams for the first time (the archive
/// checked, replication started), STATUS= lines, STOPPING=1 at shutdown; and, when the unit
/// sets `WatchdogSec`, WATCHDOG=1 at half that period from this task on the agent's one
/// runtime thread, so a wedged event loop is restarted by systemd. Outside systemd
/// (`NOTIFY_SOCKET` unset) nothing is sent.
async fn systemd_notify(metrics: Arc<metrics::Metrics>, stop: CancellationToken) {
    use sd_notify::NotifyState;
    let mut usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2));
    let mut ready = false;
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
                return;
            }
            _ = tick.tick() => {}
        }
        if !ready && metrics.up.get() == 1 {
            ready = true;
            let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status("streaming")]);
        }
        if watchdog.is_some() {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    }
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
    let writer = open_writer(&common, signer, recipients, None).await?;
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
    let writer = open_writer(&common, None, None, None).await?;
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
