//! `walvault-recover verify`: a restore drill. Proves, on this machine and now, that the archive
//! restores: the newest complete backup (or `--backup`) is restored into a scratch directory,
//! checked against the server's own manifest with `pg_verifybackup`, started with PostgreSQL,
//! recovered through `wal-fetch` to the end of the archived WAL, queried, and stopped.
//!
//! Contract:
//! * the scratch directory (`--workdir`, default `$TMPDIR/walvault-verify-<pid>`) must be absent
//!   or empty; nothing outside it is written, and the archive is only read;
//! * the drill server listens on a Unix socket inside the scratch directory only
//!   (`listen_addresses=''`), with `archive_mode=off` so that it never archives anything, and
//!   its own `pg_hba.conf` trusting that socket ([`ScratchServer`]);
//! * it passes when every step succeeds and replay reached the last archived segment (the
//!   replayed LSN is at most one segment short of the archive's end: the end itself may be an
//!   incomplete record); `--check-sql` queries must succeed, and their output is reported;
//! * on success the scratch directory is removed (unless `--keep`); on failure it is kept for
//!   inspection and its path reported;
//! * exit status: 0 passed, 1 failed (the report says at which step), 2 usage.
//!
//! The report gives the restore and replay times, the last replayed commit's timestamp, and its
//! age when the drill ended: on a server that commits continuously, that age is the recovery
//! point a real disaster would have had at this moment.
//!
//! Targets: the end of the archive (default); `--target-time` (the drill passes when recovery
//! ended with the last replayed commit at or before that time); a backup's own end (`verify
//! --all-backups` drills each retained backup to the LSN where it becomes consistent).
//!
//! Every drill leaves a record in the archive ([`walvault_shared::archive::drills`]): when,
//! which backup and target, pass or the failure, and the RTO measured as restore + replay +
//! checks, unless `--no-record` (or the archive refuses the write: a warning, not a failure).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use walvault_shared::archive::drills::DrillRecord;
use walvault_shared::archive::read::Reader;
use walvault_shared::lsn::Lsn;

use crate::pgtools::{output_ok, Owner, PgTools, ScratchServer};
use crate::restore::RestoreOptions;

/// What the drill needs besides the archive.
pub struct DrillOptions {
    pub workdir: PathBuf,
    /// pg_ctl, psql and pg_verifybackup of the archive's major.
    pub tools: PgTools,
    pub owner: Option<Owner>,
    pub check_sql: Vec<String>,
    pub keep: bool,
    pub timeout: Duration,
    /// The database user to connect as (a superuser of the restored cluster).
    pub pg_user: String,
    /// What the drill must reach.
    pub target: DrillTarget,
}

/// What a drill recovers to, and how it is judged.
#[derive(Clone, Debug)]
pub enum DrillTarget {
    /// The end of the archived WAL: replay must reach the archive's last segment.
    Latest,
    /// A time: recovery must end with the last replayed commit at or before it.
    Time(chrono::DateTime<chrono::Utc>),
    /// A backup's end (its consistency point): replay must reach it.
    BackupEnd(Lsn),
}

impl std::fmt::Display for DrillTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrillTarget::Latest => write!(f, "latest"),
            DrillTarget::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            DrillTarget::BackupEnd(l) => write!(f, "backup end {l}"),
        }
    }
}

#[derive(Debug, Serialize, Default)]
pub struct Check {
    pub sql: String,
    pub output: String,
}

#[derive(Debug, Serialize, Default)]
pub struct DrillReport {
    pub pass: bool,
    /// The step that failed, and why.
    pub failure: Option<String>,
    pub workdir: String,
    pub workdir_kept: bool,
    pub backup: Option<String>,
    pub backup_stop_time: Option<String>,
    pub restored_mib: Option<u64>,
    pub restore_seconds: Option<f64>,
    pub pg_verifybackup: Option<String>,
    pub replay_seconds: Option<f64>,
    pub checks_seconds: Option<f64>,
    /// End of the archived WAL on the timeline recovered along.
    pub archived_to: Option<Lsn>,
    pub replayed_to: Option<Lsn>,
    pub last_replayed_commit: Option<String>,
    /// Seconds between the last replayed commit and the end of the drill.
    pub last_commit_age_s: Option<f64>,
    pub checks: Vec<Check>,
}

/// Run the drill. Errors before anything was written (a non-empty workdir) are returned;
/// every later failure is in the report.
pub async fn drill(reader: &Reader, restore: RestoreOptions, opts: &DrillOptions) -> Result<DrillReport> {
    let w = &opts.workdir;
    if w.exists() && std::fs::read_dir(w).with_context(|| format!("read {}", w.display()))?.next().is_some() {
        bail!(
            "the drill's directory {} is not empty\nHINT: give an empty or new --workdir; the drill writes only there",
            w.display()
        );
    }
    std::fs::create_dir_all(w).with_context(|| format!("create {}", w.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(w, std::fs::Permissions::from_mode(0o700))?;
    if let Some(o) = &opts.owner {
        std::os::unix::fs::chown(w, Some(o.uid), Some(o.gid))?;
    }
    let mut report = DrillReport { workdir: w.display().to_string(), ..Default::default() };
    let mut lease = None;
    let result = steps(reader, restore, opts, &mut report, &mut lease).await;
    crate::restore::release_lease(reader, lease.as_deref()).await;
    if let Err(e) = result {
        report.failure = Some(format!("{e:#}"));
    }
    report.pass = report.failure.is_none();
    if report.pass && !opts.keep {
        let _ = walvault_shared::fsutil::remove_tree_parallel(w, 4);
    } else {
        report.workdir_kept = true;
    }
    Ok(report)
}

async fn steps(
    reader: &Reader,
    mut restore: RestoreOptions,
    opts: &DrillOptions,
    report: &mut DrillReport,
    lease: &mut Option<String>,
) -> Result<()> {
    let data = opts.workdir.join("data");
    let owner = opts.owner.as_ref();
    restore.pgdata = data.clone();
    let r = crate::restore::restore(reader, &restore).await.context("restore")?;
    lease.clone_from(&r.lease);
    report.backup = Some(r.backup.id.clone());
    report.backup_stop_time = Some(walvault_shared::time::text(r.backup.stop_time));
    report.restored_mib = Some(r.bytes >> 20);
    report.restore_seconds = Some(r.seconds);
    report.archived_to = Some(r.reachable.1);
    let seg = r.backup.wal_segment_size;

    // The restored files against the server's manifest (recovery settings excepted).
    let mut c = opts.tools.command("pg_verifybackup", owner);
    c.args(["-n", "-i", "postgresql.auto.conf", "-i", "recovery.signal", "-i", "standby.signal"]);
    if !r.had_postgresql_conf {
        c.args(["-i", "postgresql.conf"]);
    }
    c.arg(&data);
    let v = output_ok(c, "pg_verifybackup").context("pg_verifybackup")?;
    report.pg_verifybackup = Some(v.lines().last().unwrap_or("ok").to_string());

    let t0 = Instant::now();
    let mut server = ScratchServer::start(&opts.tools, owner, &data, &opts.workdir, &opts.pg_user)?;
    let log = server.log.clone();
    server.wait_recovered(opts.timeout, false).await?;
    report.replay_seconds = Some(t0.elapsed().as_secs_f64());
    let row = server.psql(
        "postgres",
        "SELECT pg_last_wal_replay_lsn(), coalesce(to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), ''), \
         coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::text, '')",
    )?;
    let cols: Vec<&str> = row.split('|').collect();
    let replayed: Lsn = cols.first().copied().unwrap_or("").parse().context("pg_last_wal_replay_lsn")?;
    report.replayed_to = Some(replayed);
    report.last_replayed_commit = cols.get(1).filter(|s| !s.is_empty()).map(|s| s.to_string());
    report.last_commit_age_s = cols.get(2).and_then(|s| s.parse().ok());
    let t1 = Instant::now();
    for sql in std::iter::once("SELECT count(*) FROM pg_database").chain(opts.check_sql.iter().map(String::as_str)) {
        let output = server.psql("postgres", sql).with_context(|| format!("check {sql:?}"))?;
        report.checks.push(Check { sql: sql.to_string(), output });
    }
    report.checks_seconds = Some(t1.elapsed().as_secs_f64());
    server.stop();
    match &opts.target {
        DrillTarget::Latest => {
            let end = r.reachable.1;
            if replayed.0 + seg < end.0 {
                bail!(
                    "replay stopped at {replayed}, more than a segment before the archive's end {end}; see {}",
                    log.display()
                );
            }
        }
        DrillTarget::BackupEnd(l) if replayed < *l => {
            bail!("replay stopped at {replayed}, before the backup's end {l}; see {}", log.display())
        }
        DrillTarget::Time(t) => {
            let last = report.last_replayed_commit.as_deref().and_then(walvault_shared::time::parse);
            if let Some(c) = last.filter(|c| c > t) {
                bail!("recovery replayed a commit of {c} past the target {t}; see {}", log.display());
            }
        }
        _ => {}
    }
    Ok(())
}

/// The drill's record for the archive.
pub fn record(
    report: &DrillReport,
    id: String,
    started: chrono::DateTime<chrono::Utc>,
    target: &DrillTarget,
) -> DrillRecord {
    let rto = match (report.restore_seconds, report.replay_seconds, report.checks_seconds) {
        (Some(a), Some(b), Some(c)) if report.pass => Some(a + b + c),
        _ => None,
    };
    DrillRecord {
        id,
        started_at: started,
        finished_at: walvault_shared::time::now(),
        host: walvault_shared::archive::lease::this_host(),
        pass: report.pass,
        failure: report.failure.clone(),
        backup: report.backup.clone(),
        target: target.to_string(),
        recovered_to: report.replayed_to,
        last_replayed_commit: report.last_replayed_commit.clone(),
        restored_mib: report.restored_mib,
        restore_seconds: report.restore_seconds,
        replay_seconds: report.replay_seconds,
        checks_seconds: report.checks_seconds,
        rto_seconds: rto,
    }
}

/// The report as text.
pub fn text(r: &DrillReport) -> String {
    let mut s = String::new();
    use std::fmt::Write;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "restore drill: {}", if r.pass { "PASSED" } else { "FAILED" });
    if let Some(f) = &r.failure {
        let _ = writeln!(s, "  failed at: {f}");
    }
    let _ = writeln!(s, "  backup:               {} (ended {})", opt(&r.backup), opt(&r.backup_stop_time));
    if let (Some(m), Some(t)) = (r.restored_mib, r.restore_seconds) {
        let _ = writeln!(s, "  restored:             {m} MiB in {t:.1} s");
    }
    let _ = writeln!(s, "  pg_verifybackup:      {}", opt(&r.pg_verifybackup));
    if let Some(t) = r.replay_seconds {
        let _ = writeln!(s, "  recovery:             {t:.1} s from start to promotion");
    }
    if let (Some(a), Some(b), Some(c)) = (r.restore_seconds, r.replay_seconds, r.checks_seconds) {
        let _ =
            writeln!(s, "  RTO measured:         {:.1} s (restore {a:.1} + replay {b:.1} + checks {c:.1})", a + b + c);
    }
    let lsn = |l: &Option<Lsn>| l.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "  replayed to:          {} (archive ends at {})", lsn(&r.replayed_to), lsn(&r.archived_to));
    let _ = writeln!(
        s,
        "  last replayed commit: {}{}",
        opt(&r.last_replayed_commit),
        r.last_commit_age_s.map(|a| format!(" ({a:.1} s before the drill ended)")).unwrap_or_default()
    );
    for c in &r.checks {
        let _ = writeln!(s, "  check {:?}: {}", c.sql, c.output);
    }
    let _ =
        writeln!(s, "  scratch directory:    {}{}", r.workdir, if r.workdir_kept { " (kept)" } else { " (removed)" });
    s
}
