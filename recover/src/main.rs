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
mod dump;
mod list;
mod pgdata;
mod pgtools;
mod rekey;
mod report;
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
        Cmd::Report(_) => Some(2),
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
    // A segment the prefetcher already spooled: a rename, no runtime, no archive.
    if let Cmd::WalFetch { archive, prefetch, walfile, dest } = &cli.cmd {
        if let Some(code) = walfetch::serve_from_spool(archive, *prefetch, walfile, dest) {
            return Ok(code);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::List { archive, json, restore_points } => {
                list::list(&open(&archive).await?, json, restore_points).await?;
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Audit(a) => do_audit(a).await,
            Cmd::Restore(a) => do_restore(*a).await.map(|_| ExitCode::SUCCESS),
            Cmd::Verify(a) => do_verify(a).await,
            Cmd::WalFetch { archive, prefetch, walfile, dest } => {
                walfetch::run(&open(&archive).await?, &archive, prefetch, &walfile, &dest).await
            }
            Cmd::Rekey(a) => rekey::run(a).await.map(|_| ExitCode::SUCCESS),
            Cmd::GenerateDocs { dir } => {
                use clap::CommandFactory;
                walvault_shared::cligen::generate_docs(Cli::command(), &dir)?;
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Dump(a) => do_dump(*a).await.map(|_| ExitCode::SUCCESS),
            Cmd::Report(a) => do_report(a).await,
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
                let _ = walfetch::run_prefetch(&open(&archive).await?, &archive, &spool, count, &after).await;
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
fn restore_target(a: &cli::TargetArgs) -> Result<Target> {
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
    let target = restore_target(&a.target).map_err(usage)?;
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
        lease: (!a.lease.is_zero()).then_some(a.lease),
        purpose: "restore",
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
        Some(t) => {
            let replayed =
                pgtools::start_and_wait(t, owner.as_ref(), &a.pgdata, a.port, &a.socket_dir, &a.pg_user, action.as_str());
            // Replay is over (or failed): the archive need not hold anything for it any more.
            restore::release_lease(&reader, r.lease.as_deref()).await;
            println!("{}", replayed?);
        }
        None => println!(
            "Start PostgreSQL on it to recover to the target (on another port and socket directory than a running cluster): {}pg_ctl -D {} -o '-p 5433 -k /tmp' start",
            owner.as_ref().map(|o| format!("runuser -u {} -- ", o.name)).unwrap_or_default(),
            a.pgdata.display()
        ),
    }
    Ok(())
}

async fn do_report(a: cli::ReportArgs) -> Result<ExitCode> {
    let reader = open(&a.archive).await?;
    let copy = match &a.copy {
        Some(url) => {
            let args = ArchiveArgs {
                archive: url.clone(),
                s3_endpoint: a.copy_s3_endpoint.clone().or(a.archive.s3_endpoint.clone()),
                ..a.archive.clone()
            };
            Some(open(&args).await?)
        }
        None => None,
    };
    let since = walvault_shared::time::now() - chrono::Duration::from_std(a.period).map_err(usage)?;
    let opts = report::ReportOptions {
        since,
        rpo_target: a.rpo_target,
        rto_target: a.rto_target,
        max_drill_age: a.max_drill_age,
    };
    let r = report::report(&reader, copy.as_ref(), &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report::text(&r));
    }
    if let Some(p) = &a.html {
        std::fs::write(p, report::html(&r)).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(if r.pass { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn do_dump(a: cli::DumpArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let target = restore_target(&a.target).map_err(usage)?;
    dump::check_flags(&a).map_err(usage)?;
    let owner = Owner::resolve(a.owner.as_deref(), false, "dump")?;
    let archive = archive_for_restore_command(&a.archive)?;
    let reader = open(&archive).await?;
    warn_unverified(&reader);
    let identity = walvault_shared::archive::identity::load_existing(&reader).await?;
    let tools = pgtools::PgTools::find(a.pg_bin.as_deref(), identity.pg_major, &dump::programs(&a))?;
    check_owner_reads_archive(owner.as_ref(), &archive)?;
    eprintln!("dump: archive, tools and owner checked in {:.1} s", t0.elapsed().as_secs_f64());
    let plan = dump::DumpPlan {
        args: &a,
        target,
        tools,
        owner,
        scratch: a.scratch.clone().unwrap_or_else(dump::default_scratch),
        restore_command: restore_command(&archive, 4)?,
    };
    let summary = dump::run(&reader, plan).await?;
    println!("{summary}");
    Ok(())
}

async fn do_verify(a: VerifyArgs) -> Result<ExitCode> {
    let owner = Owner::resolve(a.owner.as_deref(), false, "verify")?;
    let target_time = a
        .target_time
        .as_deref()
        .map(|t| plan::parse_time(t).map(|t| t.with_timezone(&chrono::Utc)))
        .transpose()
        .map_err(usage)?;
    let signer = a
        .signing_key
        .as_deref()
        .map(walvault_shared::archive::sign::SigningKey::load)
        .transpose()
        .map_err(usage)?
        .map(std::sync::Arc::new);
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
    // Which drills: one (newest backup, or --backup, to the end or --target-time), or one per
    // backup to its own end.
    let drills: Vec<(Option<String>, verify::DrillTarget)> = if a.all_backups {
        walvault_shared::archive::backup::complete(&reader, identity.wal_segment_size)
            .await?
            .into_iter()
            .map(|b| (Some(b.id.clone()), verify::DrillTarget::BackupEnd(b.stop_lsn)))
            .collect()
    } else {
        let t = match target_time {
            Some(t) => verify::DrillTarget::Time(t),
            None => verify::DrillTarget::Latest,
        };
        vec![(a.backup.clone(), t)]
    };
    let mut all_pass = true;
    for (backup_id, target) in drills {
        let restore = restore::RestoreOptions {
            pgdata: workdir.join("data"),
            target: match &target {
                verify::DrillTarget::Latest => Target::Latest,
                verify::DrillTarget::Time(t) => Target::Time(t.fixed_offset()),
                verify::DrillTarget::BackupEnd(l) => Target::Lsn(*l),
            },
            action: TargetAction::Promote,
            target_timeline: None,
            inclusive: true,
            force: false,
            owner: owner.clone(),
            backup_id,
            restore_command: restore_command(&archive, 4)?,
            parallel: a.parallel,
            tablespace_mapping: Vec::new(),
            // A drill writes only into its scratch directory, tablespaces included.
            tablespace_root: Some(workdir.join("tablespaces")),
            lease: Some(std::time::Duration::from_secs(24 * 3600)),
            purpose: "verify",
        };
        // Every check restore makes (plan, keys, destinations) before the drill writes anything.
        restore::check(&reader, &restore).await?;
        let opts = verify::DrillOptions {
            workdir: workdir.clone(),
            tools: tools.clone(),
            owner: owner.clone(),
            check_sql: a.check_sql.clone(),
            keep: a.keep,
            timeout: a.timeout,
            pg_user: a.pg_user.clone(),
            target: target.clone(),
        };
        let started = walvault_shared::time::now();
        let report = verify::drill(&reader, restore, &opts).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", verify::text(&report));
        }
        if !a.no_record {
            let rec = verify::record(&report, walvault_shared::archive::drills::new_id(started), started, &target);
            let writer = walvault_shared::archive::write::Writer::new(reader.store().clone(), signer.clone());
            match walvault_shared::archive::drills::write(&writer, &rec).await {
                Ok(()) => eprintln!("verify: recorded as drills/{} in the archive", rec.id),
                Err(e) => eprintln!("verify: warning: could not record the drill in the archive: {e:#}"),
            }
        }
        all_pass &= report.pass;
        if report.workdir_kept && a.all_backups {
            break; // the next drill needs the scratch directory empty
        }
    }
    Ok(if all_pass { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
