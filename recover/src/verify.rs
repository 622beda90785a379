//! `walvault-recover verify`: a restore drill. Proves, on this machine and now, that the archive
//! restores: the newest complete backup (or `--backup`) is restored into a scratch directory,
//! checked against the server's own manifest with `pg_verifybackup`, started with PostgreSQL,
//! recovered through `wal-fetch` to the end of the archived WAL, queried, and stopped.
//!
//! Contract:
//! * the scratch directory (`--workdir`, default `$TMPDIR/walvault-verify-<pid>`) must be absent
//!   or empty; nothing outside it is written, and the archive is only read;
//! * the drill server listens on a Unix socket inside the scratch directory only
//!   (`listen_addresses=''`), with `archive_mode=off` so that it never archives anything;
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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use walvault_shared::archive::read::Reader;
use walvault_shared::lsn::Lsn;

use crate::pgtools::{free_port, output_ok, Owner, PgTools};
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
    /// End of the archived WAL on the timeline recovered along.
    pub archived_to: Option<Lsn>,
    pub replayed_to: Option<Lsn>,
    pub last_replayed_commit: Option<String>,
    /// Seconds between the last replayed commit and the end of the drill.
    pub last_commit_age_s: Option<f64>,
    pub checks: Vec<Check>,
}

/// A running drill server, stopped when dropped.
struct Server<'a> {
    tools: &'a PgTools,
    owner: Option<&'a Owner>,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    running: bool,
}

impl Server<'_> {
    fn psql(&self, sql: &str) -> Result<String> {
        let mut c = self.tools.command("psql", self.owner);
        c.arg("-h").arg(&self.sock).args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"]);
        c.args(["-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        output_ok(c, &format!("psql -c {sql:?}"))
    }

    fn stop(&mut self) {
        if self.running {
            let mut c = self.tools.command("pg_ctl", self.owner);
            let _ = c.arg("-D").arg(&self.data).args(["-m", "fast", "-w", "-t", "120", "stop"]).output();
            self.running = false;
        }
    }
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        self.stop();
    }
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
    let result = steps(reader, restore, opts, &mut report).await;
    if let Err(e) = result {
        report.failure = Some(format!("{e:#}"));
    }
    report.pass = report.failure.is_none();
    if report.pass && !opts.keep {
        let _ = std::fs::remove_dir_all(w);
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
) -> Result<()> {
    let data = opts.workdir.join("data");
    let owner = opts.owner.as_ref();
    restore.pgdata = data.clone();
    let r = crate::restore::restore(reader, &restore).await.context("restore")?;
    report.backup = Some(r.backup.id.clone());
    report.backup_stop_time = Some(walvault_shared::time::text(r.backup.stop_time));
    report.restored_mib = Some(r.bytes >> 20);
    report.restore_seconds = Some(r.seconds);
    report.archived_to = Some(r.reachable.1);
    let seg = r.backup.wal_segment_size;

    // The restored files against the server's manifest (recovery settings excepted).
    let mut c = opts.tools.command("pg_verifybackup", owner);
    c.args(["-n", "-i", "postgresql.auto.conf", "-i", "recovery.signal"]);
    if !r.had_postgresql_conf {
        c.args(["-i", "postgresql.conf"]);
    }
    c.arg(&data);
    let v = output_ok(c, "pg_verifybackup").context("pg_verifybackup")?;
    report.pg_verifybackup = Some(v.lines().last().unwrap_or("ok").to_string());

    let port = free_port()?;
    let mut server =
        Server { tools: &opts.tools, owner, data: data.clone(), sock: opts.workdir.clone(), port, running: false };
    let log = opts.workdir.join("postgres.log");
    let o = format!(
        "-p {port} -c listen_addresses='' -c unix_socket_directories='{}' -c archive_mode=off",
        opts.workdir.display()
    );
    let t0 = Instant::now();
    let mut c = opts.tools.command("pg_ctl", owner);
    c.arg("-D").arg(&data).args(["-o", &o, "-l"]).arg(&log).args(["-w", "-t", "600", "start"]);
    server.running = true;
    if let Err(e) = output_ok(c, "pg_ctl start") {
        let tail: Vec<String> =
            std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(15).map(String::from).collect();
        let tail: Vec<String> = tail.into_iter().rev().collect();
        return Err(e.context(format!("start PostgreSQL; its log ends:\n{}", tail.join("\n"))));
    }
    loop {
        if let Ok(s) = server.psql("SELECT pg_is_in_recovery()") {
            if s == "f" {
                break;
            }
        }
        if t0.elapsed() > opts.timeout {
            bail!("recovery did not end within {:?}; see {}", opts.timeout, log.display());
        }
        if !data.join("postmaster.pid").exists() {
            bail!("PostgreSQL stopped during recovery; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.replay_seconds = Some(t0.elapsed().as_secs_f64());
    let row = server.psql(
        "SELECT pg_last_wal_replay_lsn(), coalesce(to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), ''), \
         coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::text, '')",
    )?;
    let cols: Vec<&str> = row.split('|').collect();
    let replayed: Lsn = cols.first().copied().unwrap_or("").parse().context("pg_last_wal_replay_lsn")?;
    report.replayed_to = Some(replayed);
    report.last_replayed_commit = cols.get(1).filter(|s| !s.is_empty()).map(|s| s.to_string());
    report.last_commit_age_s = cols.get(2).and_then(|s| s.parse().ok());
    for sql in std::iter::once("SELECT count(*) FROM pg_database").chain(opts.check_sql.iter().map(String::as_str)) {
        let output = server.psql(sql).with_context(|| format!("check {sql:?}"))?;
        report.checks.push(Check { sql: sql.to_string(), output });
    }
    server.stop();
    let end = r.reachable.1;
    if replayed.0 + seg < end.0 {
        bail!(
            "replay stopped at {replayed}, more than a segment before the archive's end {end}; see {}",
            log.display()
        );
    }
    Ok(())
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
