//! `walvault-recover`: list what an archive can restore, restore a base backup plus WAL to a
//! point in time, serve as PostgreSQL's `restore_command` (`wal-fetch`), run restore drills
//! (`verify`) and audit the achieved RPO (`audit`).
//!
//! Exit codes ([`walvault_shared::exit`]): 0 success; 1 failure (the message says what and
//! gives a hint); 2 usage error. `wal-fetch` has its own (see `walfetch.rs`): 0 written, 1 not
//! in the archive, 126 could not fetch. `audit` exits 0 when the RPO target is met and there are
//! no gaps, 1 when not, 2 on error; `verify` exits 0 when the drill passed, 1 when it failed.
//!
//! With `--verify-key`, every object any subcommand reads must carry a valid signature by
//! that key (see `shared::archive::sign`); without it, objects are checked for integrity only
//! and `restore`/`verify` say so.

mod audit;
mod cli;
mod list;
mod pgdata;
mod pgtools;
mod rekey;
mod restore;
mod verify;
mod walfetch;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::sign::VerifyKeys;
use walvault_shared::exit::usage;
use walvault_shared::lsn::{Lsn, TimelineId};

use cli::{ArchiveArgs, AuditArgs, Cli, Cmd, RestoreArgs, VerifyArgs};
use pgtools::Owner;
use restore::conf::TargetAction;
use restore::plan::{self, Target};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let what = match &cli.cmd {
        Cmd::WalFetch { walfile, .. } => format!("walvault-recover wal-fetch {walfile}"),
        Cmd::Audit(_) => "walvault-recover audit".into(),
        Cmd::Verify(_) => "walvault-recover verify".into(),
        _ => "walvault-recover".into(),
    };
    let special = match &cli.cmd {
        Cmd::WalFetch { .. } => Some(126),
        Cmd::Audit(_) => Some(2),
        Cmd::Verify(_) => Some(1),
        _ => None,
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            // Subcommands with their own codes map every error to theirs; usage errors are 2.
            match special {
                Some(c) if walvault_shared::exit::code_of(&e) != ExitCode::from(2) => ExitCode::from(c),
                _ => walvault_shared::exit::code_of(&e),
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::List { archive, json } => {
                list::list(&open(&archive).await?, json).await?;
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Audit(a) => do_audit(a).await,
            Cmd::Restore(a) => do_restore(*a).await.map(|_| ExitCode::SUCCESS),
            Cmd::Verify(a) => do_verify(a).await,
            Cmd::WalFetch { archive, prefetch, walfile, dest } => {
                walfetch::run(&open(&archive).await?, &archive, prefetch, &walfile, &dest).await
            }
            Cmd::Rekey(a) => rekey::run(a).await.map(|_| ExitCode::SUCCESS),
            Cmd::ExportBackup(a) => {
                let owner = Owner::resolve(a.owner.as_deref(), true, "export-backup")?;
                let reader = open(&a.archive).await?;
                warn_unverified(&reader);
                let n = restore::export(&reader, &a.backup, &a.dir, owner.as_ref(), a.parallel).await?;
                println!("exported backup {} ({} MiB) into {}", a.backup, n >> 20, a.dir.display());
                Ok(ExitCode::SUCCESS)
            }
            Cmd::WalPrefetch { archive, spool, count, after } => {
                // Best effort, detached: failures show up when PostgreSQL asks for the segment.
                let _ = walfetch::run_prefetch(&open(&archive).await?, &spool, count, &after).await;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Open the archive for reading, with the verify keys and identities given.
async fn open(a: &ArchiveArgs) -> Result<Reader> {
    let keys = VerifyKeys::from_args(&a.verify_keys).map_err(usage)?;
    let identities = a.identities()?;
    let store = walvault_shared::storage::open_existing(&a.archive, &a.s3()).await?;
    Ok(Reader::new(store, keys).with_identities(identities))
}

/// Say once that authenticity is not being checked.
fn warn_unverified(reader: &Reader) {
    if reader.verify_keys().is_none() {
        eprintln!(
            "walvault-recover: note: no --verify-key given: objects are checked for damage, not for who wrote them (see \"Security\" in docs/operations.md)"
        );
    }
}

async fn do_audit(a: AuditArgs) -> Result<ExitCode> {
    let t = |s: &Option<String>| -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        s.as_deref().map(|x| plan::parse_time(x).map(|t| t.with_timezone(&chrono::Utc))).transpose().map_err(usage)
    };
    let opts = audit::AuditOptions { since: t(&a.since)?, until: t(&a.until)?, rpo_target: a.rpo_target };
    let reader = open(&a.archive).await?;
    let t0 = std::time::Instant::now();
    let report = audit::audit(&reader, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", audit::table(&report));
        println!("audit took {:.2} s", t0.elapsed().as_secs_f64());
    }
    if let Some(p) = &a.html {
        std::fs::write(p, audit::html(&report)).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(if report.pass { ExitCode::SUCCESS } else { ExitCode::from(1) })
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

/// restore_command: this binary, by absolute path, `wal-fetch` with the archive flags.
fn restore_command(archive: &ArchiveArgs, prefetch: u32) -> Result<String> {
    let exe = std::env::current_exe()?.canonicalize()?;
    let mut args = vec!["wal-fetch".to_string(), "--prefetch".to_string(), prefetch.to_string()];
    args.extend(archive.args()?);
    restore::conf::restore_command(&exe.to_string_lossy(), &args).map_err(usage)
}

/// Before anything is written: when we are root, `owner` can read the archive, since
/// PostgreSQL will run restore_command (this binary) as that user.
fn check_owner_reads_archive(owner: Option<&Owner>, archive: &ArchiveArgs) -> Result<()> {
    let Some(o) = owner else { return Ok(()) };
    let exe = std::env::current_exe()?;
    let mut c = pgtools::command(&exe, Some(o));
    let out = c.arg("list").args(archive.args()?).output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.starts_with("walvault-recover: note:")).unwrap_or("");
        anyhow::bail!(
            "the user {} cannot read the archive, and PostgreSQL will run restore_command as {}: {}\nHINT: give {} read access to the archive directory and r-x on its parents (or, for S3, the credentials in its environment); this binary must be executable by {} too",
            o.name, o.name, first.trim_start_matches("walvault-recover: "), o.name, o.name
        );
    }
    Ok(())
}

/// The recovery target from the flags.
fn restore_target(a: &RestoreArgs) -> Result<Target> {
    Ok(if let Some(t) = &a.target_time {
        Target::Time(plan::parse_time(t)?)
    } else if let Some(l) = &a.target_lsn {
        Target::Lsn(
            l.parse::<Lsn>().map_err(|e| anyhow::anyhow!("invalid --target-lsn {l:?}: {e}\nHINT: e.g. 0/3000060"))?,
        )
    } else if let Some(x) = a.target_xid {
        Target::Xid(x)
    } else if let Some(n) = &a.target_name {
        plan::check_target_name(n)?;
        Target::Name(n.clone())
    } else if a.latest {
        Target::Latest
    } else {
        anyhow::bail!(
            "no recovery target\nHINT: give exactly one of --target-time, --target-lsn, --target-xid, --target-name, --latest"
        );
    })
}

async fn do_restore(a: RestoreArgs) -> Result<()> {
    // Flags first (exit 2), then the plan, then the disk.
    let target = restore_target(&a).map_err(usage)?;
    let action = TargetAction::parse(&a.target_action).map_err(usage)?;
    let mapping = a
        .tablespace_mapping
        .iter()
        .map(|m| restore::extract::parse_mapping(m))
        .collect::<Result<Vec<_>>>()
        .map_err(usage)?;
    let owner = Owner::resolve(a.owner.as_deref(), a.allow_root_owned && !a.start, "restore")?;
    let archive = archive_for_restore_command(&a.archive)?;
    let reader = open(&archive).await?;
    warn_unverified(&reader);
    let identity = walvault_shared::archive::identity::load_existing(&reader).await?;
    let tools = if a.start {
        Some(pgtools::PgTools::find(a.pg_bin.as_deref(), identity.pg_major, &["pg_ctl", "psql"])?)
    } else {
        None
    };
    check_owner_reads_archive(owner.as_ref(), &archive)?;
    let opts = restore::RestoreOptions {
        pgdata: a.pgdata.clone(),
        target,
        action,
        target_timeline: a.target_timeline.map(TimelineId),
        inclusive: a.inclusive,
        force: a.force,
        owner: owner.clone(),
        backup_id: a.backup.clone(),
        restore_command: restore_command(&archive, a.prefetch)?,
        parallel: a.parallel,
        tablespace_mapping: mapping,
        tablespace_root: None,
    };
    let r = restore::restore(&reader, &opts).await?;
    if let Some((t, xid, lsn, tli)) = r.last_commit {
        println!(
            "the last commit at or before the target: {} (xid {xid}, LSN {lsn}, timeline {tli})",
            walvault_shared::time::text(t)
        );
    }
    if r.chain.len() > 1 {
        println!(
            "backup {} is incremental: combined from its chain of {} ({}), each block written once",
            r.backup.id,
            r.chain.len(),
            r.chain.join(" <- ")
        );
    }
    println!(
        "restored backup {} ({} MiB in {:.1} s, {:.0} MiB/s) into {}; recovery follows timeline {}, whose WAL is archived up to {} on timeline {}.",
        r.backup.id,
        r.bytes >> 20,
        r.seconds,
        (r.bytes as f64 / (1 << 20) as f64) / r.seconds.max(0.001),
        a.pgdata.display(),
        r.timeline,
        r.reachable.1,
        r.reachable.0,
    );
    match &tools {
        Some(t) => println!(
            "{}",
            pgtools::start_and_wait(t, owner.as_ref(), &a.pgdata, a.port, &a.socket_dir, &a.pg_user, action.as_str())?
        ),
        None => println!(
            "Start PostgreSQL on it to recover to the target (on another port and socket directory than a running cluster): {}pg_ctl -D {} -o '-p 5433 -k /tmp' start",
            owner.as_ref().map(|o| format!("runuser -u {} -- ", o.name)).unwrap_or_default(),
            a.pgdata.display()
        ),
    }
    Ok(())
}

async fn do_verify(a: VerifyArgs) -> Result<ExitCode> {
    let owner = Owner::resolve(a.owner.as_deref(), false, "verify")?;
    let archive = archive_for_restore_command(&a.archive)?;
    let reader = open(&archive).await?;
    warn_unverified(&reader);
    let identity = walvault_shared::archive::identity::load_existing(&reader).await?;
    let tools = pgtools::PgTools::find(a.pg_bin.as_deref(), identity.pg_major, &["pg_ctl", "psql", "pg_verifybackup"])?;
    check_owner_reads_archive(owner.as_ref(), &archive)?;
    let workdir = a
        .workdir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("walvault-verify-{}", std::process::id())));
    let restore = restore::RestoreOptions {
        pgdata: workdir.join("data"),
        target: Target::Latest,
        action: TargetAction::Promote,
        target_timeline: None,
        inclusive: true,
        force: false,
        owner: owner.clone(),
        backup_id: a.backup.clone(),
        restore_command: restore_command(&archive, 4)?,
        parallel: a.parallel,
        tablespace_mapping: Vec::new(),
        // A drill writes only into its scratch directory, tablespaces included.
        tablespace_root: Some(workdir.join("tablespaces")),
    };
    // Every check restore makes (plan, keys, destinations) before the drill writes anything.
    restore::check(&reader, &restore).await?;
    let opts = verify::DrillOptions {
        workdir,
        tools,
        owner,
        check_sql: a.check_sql.clone(),
        keep: a.keep,
        timeout: a.timeout,
    };
    let report = verify::drill(&reader, restore, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", verify::text(&report));
    }
    Ok(if report.pass { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
