//! `walvault-recover`: list what an archive can restore, restore a base backup plus WAL to a
//! point in time, serve as PostgreSQL's `restore_command` (`wal-fetch`), run restore drills
//! (`verify`, see `verify.rs`) and audit the achieved RPO (`audit`).
//!
//! Exit codes: 0 success; 1 failure (the message says what and gives a hint); 2 usage error.
//! `wal-fetch` has its own (see `walfetch.rs`): 0 written, 1 not in the archive, 126 could not
//! fetch.
//!
//! `audit` exits 0 when the RPO target is met and there are no gaps, 1 when not, 2 on error;
//! `verify` exits 0 when the drill passed, 1 when it failed.

mod audit;
mod restore;
mod verify;
mod walfetch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use walvault_shared::archive::backup::{self, BackupEntry};
use walvault_shared::archive::walcat::WalCatalog;
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::storage::s3::S3Options;

#[derive(Parser)]
#[command(
    name = "walvault-recover",
    version,
    about = "Restore PostgreSQL from a walvault archive.",
    after_help = "Exit codes: 0 success; 1 failure; 2 usage error. wal-fetch: 0 written, 1 not in the archive, 126 could not fetch."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct ArchiveArgs {
    /// Archive: file:///path, a plain path, or s3://bucket/prefix.
    #[arg(long, env = "WALVAULT_ARCHIVE")]
    archive: String,
    #[arg(long, env = "WALVAULT_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "WALVAULT_S3_REGION")]
    s3_region: Option<String>,
    #[arg(long, env = "WALVAULT_S3_FORCE_PATH_STYLE")]
    s3_force_path_style: bool,
}

impl ArchiveArgs {
    fn s3(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            force_path_style: self.s3_force_path_style,
            ..Default::default()
        }
    }
    /// The same settings as wal-fetch flags (no secrets).
    /// The flags as arguments for another walvault-recover process.
    fn args(&self) -> Vec<String> {
        let mut v = vec!["--archive".to_string(), self.archive.clone()];
        if let Some(e) = &self.s3_endpoint {
            v.extend(["--s3-endpoint".to_string(), e.clone()]);
        }
        if let Some(r) = &self.s3_region {
            v.extend(["--s3-region".to_string(), r.clone()]);
        }
        if self.s3_force_path_style {
            v.push("--s3-force-path-style".into());
        }
        v
    }

    /// The flags as shell text for restore_command (values single-quoted).
    fn as_flags(&self) -> String {
        self.args()
            .iter()
            .map(|a| if a.starts_with("--") { a.clone() } else { format!("'{a}'") })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Before anything is written: `owner` exists and, when we are root, can read the archive,
/// since PostgreSQL will run restore_command (this binary) as that user.
fn check_owner_reads_archive(owner: Option<&str>, archive: &ArchiveArgs) -> Result<()> {
    let Some(o) = owner else { return Ok(()) };
    let Some((uid, gid)) = verify::owner_ids(Some(o))? else { return Ok(()) };
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("list")
        .args(archive.args())
        .uid(uid)
        .gid(gid)
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "the user {o} cannot read the archive, and PostgreSQL will run restore_command as {o}: {}\nHINT: give {o} read access to the archive directory and r-x on its parents (or, for S3, the credentials in its environment); this binary must be executable by {o} too",
            err.lines().next().unwrap_or("").trim_start_matches("walvault-recover: ")
        );
    }
    Ok(())
}

#[derive(Subcommand)]
enum Cmd {
    /// Backups, timelines and the recoverable window.
    List {
        #[command(flatten)]
        archive: ArchiveArgs,
        #[arg(long)]
        json: bool,
    },
    /// The RPO actually achieved, gaps, timelines and the recoverable window (exit 0: target met and no gaps, 1: not, 2: error).
    Audit {
        #[command(flatten)]
        archive: ArchiveArgs,
        /// Only commits at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only commits before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Pass/fail against this RPO (e.g. 5s).
        #[arg(long, value_parser = humantime::parse_duration)]
        rpo_target: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
        /// Also write an HTML report with a chart of RPO over time.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Restore a base backup and set up recovery to a target.
    Restore(RestoreArgs),
    /// A restore drill: restore the newest backup into a scratch directory, check it with
    /// pg_verifybackup, recover it with PostgreSQL to the end of the archive, query it, stop it.
    /// Exit 0 passed, 1 failed.
    Verify(VerifyArgs),
    /// PostgreSQL restore_command: fetch WALFILE (%f) into DEST (%p).
    WalFetch {
        #[command(flatten)]
        archive: ArchiveArgs,
        /// Segments to prefetch in the background into pg_wal/walvault-prefetch (0: off).
        #[arg(long, default_value_t = 4)]
        prefetch: u32,
        walfile: String,
        dest: PathBuf,
    },
    /// (internal) the background prefetcher started by wal-fetch.
    #[command(hide = true)]
    WalPrefetch {
        #[command(flatten)]
        archive: ArchiveArgs,
        #[arg(long)]
        spool: PathBuf,
        #[arg(long)]
        count: u32,
        after: String,
    },
}

#[derive(Args, Debug)]
struct RestoreArgs {
    #[command(flatten)]
    archive: ArchiveArgs,
    /// Data directory to restore into (must be empty unless --force).
    #[arg(long)]
    pgdata: PathBuf,
    /// Recover to this time (RFC 3339 or PostgreSQL's text, with a zone).
    #[arg(long, group = "target")]
    target_time: Option<String>,
    #[arg(long, group = "target")]
    target_lsn: Option<String>,
    #[arg(long, group = "target")]
    target_xid: Option<u64>,
    /// A restore point made with pg_create_restore_point().
    #[arg(long, group = "target")]
    target_name: Option<String>,
    /// Recover everything archived.
    #[arg(long, group = "target")]
    latest: bool,
    /// What to do at the target: promote, pause or shutdown.
    #[arg(long, default_value = "promote")]
    target_action: String,
    /// Timeline to recover along (default: the latest descending from the backup's).
    #[arg(long)]
    target_timeline: Option<u32>,
    /// Stop just after (true) or just before (false) the target.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    inclusive: bool,
    /// Empty a non-empty PGDATA first.
    #[arg(long)]
    force: bool,
    /// Give the restored directory to this user (when running as root).
    #[arg(long)]
    owner: Option<String>,
    /// Restore this backup instead of choosing one.
    #[arg(long)]
    backup: Option<String>,
    /// Parts downloaded in parallel.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Segments the restore_command prefetches ahead of replay (0: off).
    #[arg(long, default_value_t = 4)]
    prefetch: u32,
    /// Start PostgreSQL on the restored directory, wait until recovery reaches the target, and
    /// report the last replayed commit (needs --pg-bin). The server is left running.
    #[arg(long, requires = "pg_bin")]
    start: bool,
    /// PostgreSQL's bin directory (pg_ctl, psql), e.g. /usr/lib/postgresql/15/bin.
    #[arg(long)]
    pg_bin: Option<PathBuf>,
    /// Port for the started server.
    #[arg(long, default_value_t = 5433)]
    port: u16,
    /// Database user for the checks of --start (connects over the Unix socket in /tmp).
    #[arg(long, default_value = "postgres")]
    pg_user: String,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    archive: ArchiveArgs,
    /// PostgreSQL's bin directory (pg_ctl, psql, pg_verifybackup), e.g. /usr/lib/postgresql/15/bin.
    #[arg(long)]
    pg_bin: PathBuf,
    /// Scratch directory for the drill (absent or empty); default $TMPDIR/walvault-verify-<pid>.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Run PostgreSQL as this user (when running as root); it owns the scratch directory.
    #[arg(long)]
    owner: Option<String>,
    /// Restore this backup instead of the newest.
    #[arg(long)]
    backup: Option<String>,
    /// A query to run on the recovered server (repeatable); the drill fails if it fails.
    #[arg(long)]
    check_sql: Vec<String>,
    /// Keep the scratch directory after a successful drill.
    #[arg(long)]
    keep: bool,
    /// Give up when recovery has not ended after this long.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Parts downloaded in parallel.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

/// The archive flags as restore_command will use them: a local path made absolute (it runs in
/// the data directory).
fn archive_for_restore_command(a: &ArchiveArgs) -> Result<ArchiveArgs> {
    let url = match walvault_shared::storage::RepoUrl::parse(&a.archive)? {
        walvault_shared::storage::RepoUrl::Local(p) => {
            let abs = if p.is_absolute() { p } else { std::env::current_dir()?.join(p) };
            format!("file://{}", abs.display())
        }
        _ => a.archive.clone(),
    };
    Ok(ArchiveArgs { archive: url, ..a.clone() })
}

/// restore_command's program and flags (without %f %p): this binary, by absolute path.
fn wal_fetch_command(archive: &ArchiveArgs, prefetch: u32) -> Result<String> {
    let exe = std::env::current_exe()?.canonicalize()?;
    Ok(format!("\"{}\" wal-fetch --prefetch {} {}", exe.display(), prefetch, archive.as_flags()))
}

async fn do_verify(a: VerifyArgs) -> Result<bool> {
    let archive = archive_for_restore_command(&a.archive)?;
    // SAFETY: geteuid has no preconditions.
    if a.owner.is_none() && unsafe { libc::geteuid() } == 0 {
        bail!("PostgreSQL cannot run as root\nHINT: pass --owner with an unprivileged user (e.g. --owner postgres); it runs the drill's server");
    }
    let store = walvault_shared::storage::open_existing(&archive.archive, &archive.s3()).await?;
    walvault_shared::archive::identity::load_existing(&*store).await?;
    check_owner_reads_archive(a.owner.as_deref(), &archive)?;
    let workdir = a
        .workdir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("walvault-verify-{}", std::process::id())));
    let restore = restore::RestoreOptions {
        pgdata: workdir.join("data"),
        target: restore::Target::Latest,
        action: "promote".into(),
        target_timeline: None,
        inclusive: true,
        force: false,
        owner: a.owner.clone(),
        backup_id: a.backup.clone(),
        wal_fetch_command: wal_fetch_command(&archive, 4)?,
        parallel: a.parallel,
    };
    let opts = verify::DrillOptions {
        workdir,
        pg_bin: a.pg_bin.clone(),
        owner: a.owner.clone(),
        check_sql: a.check_sql.clone(),
        keep: a.keep,
        timeout: a.timeout,
    };
    let report = verify::drill(store, restore, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", verify::text(&report));
    }
    Ok(report.pass)
}

/// `--start`: start the restored server and wait for recovery to reach its target.
fn start_and_wait(a: &RestoreArgs) -> Result<()> {
    let bin = a.pg_bin.as_ref().context("--start needs --pg-bin")?;
    let owner = a.owner.as_deref();
    let log = a.pgdata.join("walvault-restore-start.log");
    let opts = format!("-p {} -c unix_socket_directories=/tmp -c listen_addresses=''", a.port);
    let out = verify::pg_cmd(bin, "pg_ctl", owner)?
        .arg("-D")
        .arg(&a.pgdata)
        .args(["-o", &opts, "-l"])
        .arg(&log)
        .args(["-w", "-t", "600", "start"])
        .output()?;
    if !out.status.success() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        bail!(
            "pg_ctl start failed: {}{}\n{tail}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "restore: PostgreSQL started on port {} (socket in /tmp); waiting for recovery to reach the target",
        a.port
    );
    let t0 = std::time::Instant::now();
    loop {
        let q = verify::pg_cmd(bin, "psql", owner)?
            .args(["-h", "/tmp", "-p", &a.port.to_string(), "-U", &a.pg_user, "-d", "postgres", "-AtX", "-c"])
            .arg(
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END, \
                 coalesce(pg_last_xact_replay_timestamp()::text, '-')",
            )
            .output()?;
        let text = String::from_utf8_lossy(&q.stdout).trim().to_string();
        let cols: Vec<&str> = text.split('|').collect();
        let done =
            matches!((a.target_action.as_str(), cols.as_slice()), (_, ["f", _, _]) | ("pause", ["t", "paused", _]));
        // With target-action shutdown the server stops by itself at the target.
        let stopped = a.target_action == "shutdown" && !a.pgdata.join("postmaster.pid").exists();
        if done || stopped {
            let last = cols.get(2).copied().unwrap_or("-");
            println!(
                "recovery reached the target after {:.1} s; last replayed commit: {last}{}",
                t0.elapsed().as_secs_f64(),
                if stopped { " (server shut down at the target)" } else { "" }
            );
            return Ok(());
        }
        if t0.elapsed() > std::time::Duration::from_secs(3600) {
            bail!("recovery did not reach the target within an hour; see {}", log.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

async fn list(a: ArchiveArgs, json: bool) -> Result<()> {
    let store = walvault_shared::storage::open_existing(&a.archive, &a.s3()).await?;
    let id = walvault_shared::archive::identity::load_existing(&*store).await?;
    let seg = id.wal_segment_size;
    let entries = backup::list(&*store, seg).await?;
    let cat = WalCatalog::load(&*store, seg).await?;
    let mut backups = Vec::new();
    let mut incomplete = Vec::new();
    for e in &entries {
        match e {
            BackupEntry::Complete(d) => backups.push(serde_json::json!({
                "id": d.id, "start_lsn": d.start_lsn, "stop_lsn": d.stop_lsn, "timeline": d.timeline,
                "start_time": d.start_time, "stop_time": d.stop_time, "raw_bytes": d.raw_bytes, "stored_bytes": d.stored_bytes,
            })),
            BackupEntry::Incomplete { id, .. } => incomplete.push(id.clone()),
        }
    }
    let complete: Vec<_> =
        entries.iter().filter_map(|e| if let BackupEntry::Complete(d) = e { Some(d) } else { None }).collect();
    let mut timelines = Vec::new();
    for tli in cat.timelines.keys() {
        let ranges: Vec<_> =
            cat.ranges(*tli).into_iter().map(|(s, e)| serde_json::json!({"start": s, "end": e})).collect();
        let earliest = complete.iter().filter(|b| b.timeline <= *tli).map(|b| b.stop_lsn).min();
        let latest = match complete.iter().filter(|b| b.timeline <= *tli).min_by_key(|b| b.start_lsn) {
            Some(b) => {
                let path = restore::timeline_path(&*store, b, *tli).await.ok();
                path.map(|p| restore::reachable_end(&cat, &p)).filter(|(t, _)| t == tli).map(|(_, l)| l)
            }
            None => None,
        };
        timelines.push(serde_json::json!({
            "timeline": tli, "history_file": cat.histories.contains(tli), "wal_ranges": ranges,
            "recoverable_from_lsn": earliest, "recoverable_to_lsn": latest,
        }));
    }
    let out = serde_json::json!({
        "archive": store.url(), "system_identifier": id.system_identifier, "pg_major": id.pg_major,
        "wal_segment_size": seg, "backups": backups, "incomplete_backups": incomplete, "timelines": timelines,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "archive {} (system {}, PostgreSQL {}, {} MiB segments)",
        store.url(),
        id.system_identifier,
        id.pg_major,
        seg >> 20
    );
    println!("\nbackups:");
    if complete.is_empty() {
        println!("  (none complete)");
    }
    for b in &complete {
        println!(
            "  {}  timeline {}  {} .. {}  stopped {}  {} MiB (stored {} MiB)",
            b.id,
            b.timeline,
            b.start_lsn,
            b.stop_lsn,
            b.stop_time,
            b.raw_bytes >> 20,
            b.stored_bytes >> 20
        );
    }
    for i in &incomplete {
        println!("  {i}  INCOMPLETE (interrupted or running)");
    }
    println!("\ntimelines:");
    for t in &timelines {
        println!(
            "  {}  WAL {}  recoverable from {} to {}",
            t["timeline"],
            t["wal_ranges"]
                .as_array()
                .map(|r| r
                    .iter()
                    .map(|x| format!("{}..{}", x["start"].as_str().unwrap_or("?"), x["end"].as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            t["recoverable_from_lsn"].as_str().unwrap_or("-"),
            t["recoverable_to_lsn"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

/// A bad argument value the parser could not catch: exit status 2, like the parser's errors.
#[derive(Debug)]
struct UsageError(anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for UsageError {}

/// The recovery target and action from the flags.
fn restore_target(a: &RestoreArgs) -> Result<restore::Target> {
    let target = if let Some(t) = &a.target_time {
        restore::Target::Time(restore::parse_time(t)?)
    } else if let Some(l) = &a.target_lsn {
        restore::Target::Lsn(
            l.parse::<Lsn>().map_err(|e| anyhow::anyhow!("invalid --target-lsn {l:?}: {e}\nHINT: e.g. 0/3000060"))?,
        )
    } else if let Some(x) = a.target_xid {
        restore::Target::Xid(x)
    } else if let Some(n) = &a.target_name {
        restore::Target::Name(n.clone())
    } else if a.latest {
        restore::Target::Latest
    } else {
        bail!("no recovery target\nHINT: give exactly one of --target-time, --target-lsn, --target-xid, --target-name, --latest");
    };
    if !["promote", "pause", "shutdown"].contains(&a.target_action.as_str()) {
        bail!("invalid --target-action {:?}\nHINT: use promote, pause or shutdown", a.target_action);
    }
    Ok(target)
}

async fn do_restore(a: RestoreArgs) -> Result<()> {
    let target = restore_target(&a).map_err(UsageError)?;
    let archive = archive_for_restore_command(&a.archive)?;
    let store = walvault_shared::storage::open_existing(&archive.archive, &archive.s3()).await?;
    walvault_shared::archive::identity::load_existing(&*store).await?;
    check_owner_reads_archive(a.owner.as_deref(), &archive)?;
    let opts = restore::RestoreOptions {
        pgdata: a.pgdata.clone(),
        target,
        action: a.target_action.clone(),
        target_timeline: a.target_timeline.map(TimelineId),
        inclusive: a.inclusive,
        force: a.force,
        owner: a.owner.clone(),
        backup_id: a.backup.clone(),
        wal_fetch_command: wal_fetch_command(&archive, a.prefetch)?,
        parallel: a.parallel,
    };
    let r = restore::restore(store, &opts).await?;
    if let Some((t, xid, lsn, tli)) = r.last_commit {
        println!(
            "the last commit at or before the target: {} (xid {xid}, LSN {lsn}, timeline {tli})",
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        );
    }
    println!(
        "restored backup {} ({} MiB in {:.1} s, {:.0} MiB/s) into {}; WAL is archived up to {} on timeline {}.{}",
        r.backup.id,
        r.bytes >> 20,
        r.seconds,
        (r.bytes as f64 / (1 << 20) as f64) / r.seconds.max(0.001),
        a.pgdata.display(),
        r.reachable.1,
        r.reachable.0,
        if a.start {
            String::new()
        } else {
            format!(
                "\nStart PostgreSQL on it to recover to the target (on another port and socket directory than a running cluster): pg_ctl -D {} -o '-p 5433 -k /tmp' start",
                a.pgdata.display()
            )
        }
    );
    if a.start {
        start_and_wait(&a)?;
    }
    Ok(())
}

/// Start the background prefetcher, detached: PostgreSQL waits only for this process.
fn spawn_prefetcher(archive: &ArchiveArgs, spool: &std::path::Path, after: &str, count: u32) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else { return };
    let mut c = std::process::Command::new(exe);
    c.arg("wal-prefetch").args(archive.args());
    c.arg("--spool").arg(spool).arg("--count").arg(count.to_string()).arg(after);
    c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: setsid in the child before exec; it only detaches from our session.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let _ = c.spawn();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match cli.cmd {
        Cmd::WalPrefetch { archive, spool, count, after } => {
            let _ = rt.block_on(async {
                let store = walvault_shared::storage::open_existing(&archive.archive, &archive.s3()).await?;
                let id = walvault_shared::archive::identity::load_existing(&*store).await?;
                let seg = walvault_shared::wal::SegmentName::parse(&after, id.wal_segment_size)?;
                walfetch::prefetch(&*store, &spool, &seg, count, id.wal_segment_size).await
            });
            ExitCode::SUCCESS
        }
        Cmd::WalFetch { archive, prefetch, walfile, dest } => {
            let spool = walfetch::spool_dir(&dest);
            let r: Result<walfetch::Fetched> = rt.block_on(async {
                let store = walvault_shared::storage::open_existing(&archive.archive, &archive.s3()).await?;
                let id = walvault_shared::archive::identity::load_existing(&*store).await?;
                let seg = walvault_shared::wal::SegmentName::parse(&walfile, id.wal_segment_size).ok();
                let fetched = if seg.is_some() && walfetch::take_from_spool(&spool, &walfile, &dest) {
                    walfetch::Fetched::Written
                } else {
                    walfetch::fetch(&*store, &walfile, &dest, id.wal_segment_size).await?
                };
                if let (Some(seg), walfetch::Fetched::Written, true) = (seg, &fetched, prefetch > 0) {
                    walfetch::prune_spool(&spool, &seg, id.wal_segment_size);
                    spawn_prefetcher(&archive, &spool, &walfile, prefetch);
                }
                Ok(fetched)
            });
            match r {
                Ok(walfetch::Fetched::Written) => ExitCode::SUCCESS,
                Ok(walfetch::Fetched::NotInArchive) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("walvault-recover wal-fetch {walfile}: {e:#}");
                    ExitCode::from(126)
                }
            }
        }
        Cmd::Audit { archive, since, until, rpo_target, json, html } => {
            let r: Result<bool> = rt.block_on(async {
                let t = |s: &Option<String>| -> Result<Option<chrono::DateTime<chrono::Utc>>> {
                    s.as_deref().map(|x| restore::parse_time(x).map(|t| t.with_timezone(&chrono::Utc))).transpose()
                };
                let opts = audit::AuditOptions { since: t(&since)?, until: t(&until)?, rpo_target };
                let store = walvault_shared::storage::open_existing(&archive.archive, &archive.s3()).await?;
                let t0 = std::time::Instant::now();
                let report = audit::audit(&*store, &opts).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", audit::table(&report));
                    println!("audit took {:.2} s", t0.elapsed().as_secs_f64());
                }
                if let Some(p) = html {
                    std::fs::write(&p, audit::html(&report)).with_context(|| format!("write {}", p.display()))?;
                }
                Ok(report.pass)
            });
            match r {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("walvault-recover audit: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Verify(a) => match rt.block_on(do_verify(a)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("walvault-recover verify: {e:#}");
                ExitCode::from(1)
            }
        },
        cmd => {
            let r = rt.block_on(async {
                match cmd {
                    Cmd::List { archive, json } => list(archive, json).await,
                    Cmd::Restore(a) => do_restore(a).await,
                    Cmd::WalFetch { .. } | Cmd::WalPrefetch { .. } | Cmd::Audit { .. } | Cmd::Verify(_) => {
                        unreachable!()
                    }
                }
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("walvault-recover: {e:#}");
                    ExitCode::from(if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 })
                }
            }
        }
    }
}
