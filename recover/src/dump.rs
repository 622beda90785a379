//! `walvault-recover dump`: a logical export (pg_dump) of the database as it was at a point in
//! time, from the archive, in one command.
//!
//! Steps, with progress on stderr:
//! 1. Checks that need nothing downloaded: the flags; the output (absent, or `--force`); the
//!    archive's plan for the target (backup, WAL, keys: everything `restore` checks); the
//!    PostgreSQL programs of the archive's major (pg_ctl, psql, pg_dump, and pg_dumpall or
//!    pg_restore when asked for); the scratch directory (absent or empty); and room for the
//!    recovered copy in the scratch file system: the backup's size (its chain's full backup for
//!    an incremental) plus the WAL recovery keeps at once (at most `max_wal_size`'s default,
//!    1 GiB, or what the archive holds past the backup, if less), plus 64 MiB. A shortfall is
//!    refused with both numbers.
//! 2. Restore into `<scratch>/data` (tablespaces under `<scratch>/tablespaces`) and start a
//!    [`ScratchServer`] (private socket, no TCP, `archive_mode=off`, trust on that socket only)
//!    that recovers through `wal-fetch` to the target and pauses there (`--latest`: to the end
//!    of the archive, then promotes). Reaching the target is checked (PostgreSQL stops when it
//!    cannot), and the last replayed commit is reported.
//! 3. The selection against the recovered catalog: the database must exist; `--rename-table`
//!    promotes the copy and renames there; pg_dump runs with `--strict-names`, so a pattern
//!    that matches nothing is an error. These need the catalog at the target, so they run after
//!    recovery, before any output exists.
//! 4. pg_dump (pg_dumpall `--globals-only` beside one pg_dump per database with `--all`) writes
//!    to `<output>.walvault-partial`, renamed to the output only when complete: a failure
//!    leaves no output behind. With `--into`, the dump (custom format, in the scratch directory)
//!    goes to `pg_restore --dbname` only after it succeeded; the target database is touched
//!    only then, and with `--clean` only when asked.
//! 5. The server is stopped; the scratch directory is removed, or kept on failure (its path is
//!    printed).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use walvault_shared::archive::read::Reader;

use crate::cli::DumpArgs;
use crate::pgtools::{output_ok, Owner, PgTools, ScratchServer};
use crate::restore::conf::TargetAction;
use crate::restore::plan::Target;
use crate::restore::{self, RestoreOptions};

/// pg_dump's output formats.
const FORMATS: [&str; 4] = ["custom", "directory", "plain", "tar"];

/// Flags that make no sense together: refused before anything else (exit 2).
pub fn check_flags(a: &DumpArgs) -> Result<()> {
    if !FORMATS.contains(&a.format.as_str()) {
        bail!("invalid --format {:?}\nHINT: use custom, directory, plain or tar", a.format);
    }
    if a.jobs.is_some_and(|j| j > 1) && a.format != "directory" {
        bail!("--jobs needs --format directory (pg_dump dumps in parallel only into a directory)");
    }
    if a.into.is_some() && a.format != "custom" {
        bail!("--into restores a custom-format dump; drop --format");
    }
    for r in &a.rename_table {
        parse_rename(r)?;
    }
    Ok(())
}

fn parse_rename(r: &str) -> Result<(String, String)> {
    match r.split_once('=') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('.') => Ok((o.to_string(), n.to_string())),
        _ => bail!("invalid --rename-table {r:?}\nHINT: write OLD=NEW (OLD may be schema-qualified; NEW is a name in the same schema)"),
    }
}

/// A possibly schema-qualified name as an SQL identifier chain.
fn ident_chain(s: &str) -> String {
    s.split('.').map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// SQL that renames table `old` to `new` and, so that the copy can sit beside the original in
/// one database, the indexes (and with them primary key and unique constraints) and sequences
/// it owns: a name starting with the old table name gets the new one instead, any other gets
/// `_<new>` appended.
fn rename_sql(old: &str, new: &str) -> String {
    let old_rel = old.rsplit('.').next().unwrap_or(old);
    let schema = match old.rsplit_once('.') {
        Some((s, _)) => ident_chain(s) + ".",
        None => String::new(),
    };
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    format!(
        "ALTER TABLE {} RENAME TO {};\n\
         DO $walvault$ DECLARE r record; o text := {}; n text := {}; t regclass := {}::regclass; BEGIN\n\
         FOR r IN SELECT c.relname, ns.nspname, c.relkind FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace\n\
           WHERE c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = t\n\
                           UNION SELECT objid FROM pg_depend WHERE refobjid = t AND classid = 'pg_class'::regclass\n\
                             AND deptype IN ('a', 'i') AND objid IN (SELECT oid FROM pg_class WHERE relkind = 'S')) LOOP\n\
           EXECUTE format('ALTER %s %I.%I RENAME TO %I', CASE WHEN r.relkind = 'S' THEN 'SEQUENCE' ELSE 'INDEX' END,\n\
             r.nspname, r.relname, CASE WHEN left(r.relname, length(o)) = o THEN n || substr(r.relname, length(o) + 1) ELSE r.relname || '_' || n END);\n\
         END LOOP; END $walvault$;",
        ident_chain(old),
        ident_chain(new),
        lit(old_rel),
        lit(new),
        lit(&format!("{schema}{}", ident_chain(new))),
    )
}

/// Free bytes for an unprivileged user on the file system holding `p` (or its nearest
/// existing ancestor).
fn free_bytes(p: &Path) -> Result<u64> {
    let mut at = p.to_path_buf();
    while !at.exists() {
        at = at.parent().context("no existing ancestor")?.to_path_buf();
    }
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs fills the zeroed struct for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!("statvfs {}: {}", at.display(), std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

pub struct DumpPlan<'a> {
    pub args: &'a DumpArgs,
    pub target: Target,
    pub tools: PgTools,
    pub owner: Option<Owner>,
    pub scratch: PathBuf,
    pub restore_command: String,
}

/// Bytes of a file, or of every file under a directory.
fn tree_size(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            std::fs::read_dir(p).map(|rd| rd.flatten().map(|e| tree_size(&e.path())).sum()).unwrap_or(0)
        }
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

fn mib(b: u64) -> u64 {
    b >> 20
}

/// The output path's partial twin.
fn partial(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_os_string();
    s.push(".walvault-partial");
    PathBuf::from(s)
}

fn remove_any(p: &Path) {
    let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
}

/// Run the dump; returns the summary line.
pub async fn run(reader: &Reader, p: DumpPlan<'_>) -> Result<String> {
    let a = p.args;
    if let Some(out) = &a.file {
        if out.exists() && !a.force {
            bail!("{} exists\nHINT: choose another --file, or pass --force to replace it", out.display());
        }
        remove_any(&partial(out));
    }
    if p.scratch.exists() && std::fs::read_dir(&p.scratch)?.next().is_some() {
        bail!("the scratch directory {} is not empty\nHINT: give an empty or new --scratch", p.scratch.display());
    }
    let action = if p.target == Target::Latest { TargetAction::Promote } else { TargetAction::Pause };
    let opts = RestoreOptions {
        pgdata: p.scratch.join("data"),
        target: p.target.clone(),
        action,
        target_timeline: None,
        inclusive: true,
        force: false,
        owner: p.owner.clone(),
        backup_id: None,
        restore_command: p.restore_command.clone(),
        parallel: a.parallel,
        tablespace_mapping: Vec::new(),
        tablespace_root: Some(p.scratch.join("tablespaces")),
        lease: Some(std::time::Duration::from_secs(24 * 3600)),
        purpose: "dump",
    };
    let t0 = Instant::now();
    let checked = restore::check(reader, &opts).await?;
    // Room for the copy.
    let plan = &checked.plan;
    let db = plan.chain.iter().map(|b| b.raw_bytes).max().unwrap_or(0);
    let wal = plan.reachable.1 .0.saturating_sub(plan.backup.start_lsn.0).min(1 << 30);
    let need = db + wal + (64 << 20);
    let free = free_bytes(&p.scratch)?;
    if free < need {
        bail!(
            "not enough room in {} for the recovered copy: {} MiB free, about {} MiB needed (backup {} MiB, WAL kept during recovery {} MiB, 64 MiB margin)\nHINT: give a --scratch on a larger file system",
            p.scratch.display(),
            mib(free),
            mib(need),
            mib(db),
            mib(wal)
        );
    }
    std::fs::create_dir_all(&p.scratch).with_context(|| format!("create {}", p.scratch.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p.scratch, std::fs::Permissions::from_mode(0o700))?;
    }
    if let Some(o) = &p.owner {
        std::os::unix::fs::chown(&p.scratch, Some(o.uid), Some(o.gid))?;
    }
    eprintln!("dump: backup {} chosen in {:.1} s", checked.plan.backup.id, t0.elapsed().as_secs_f64());
    let mut lease = None;
    let result = steps(reader, &p, &opts, checked, &mut lease).await;
    let t1 = Instant::now();
    restore::release_lease(reader, lease.as_deref()).await;
    match result {
        Ok(summary) => {
            let _ = walvault_shared::fsutil::remove_tree_parallel(&p.scratch, 4);
            eprintln!("dump: scratch copy removed in {:.1} s", t1.elapsed().as_secs_f64());
            Ok(summary)
        }
        Err(e) => {
            if let Some(out) = &a.file {
                remove_any(&partial(out));
            }
            Err(e.context(format!("dump failed; the scratch directory {} is kept for inspection", p.scratch.display())))
        }
    }
}

async fn steps(
    reader: &Reader,
    p: &DumpPlan<'_>,
    opts: &RestoreOptions,
    checked: restore::Checked,
    lease: &mut Option<String>,
) -> Result<String> {
    let a = p.args;
    let t0 = Instant::now();
    eprintln!("dump: restoring backup {} into {}", checked.plan.backup.id, opts.pgdata.display());
    let r = restore::apply(reader, opts, checked).await.context("restore")?;
    lease.clone_from(&r.lease);
    eprintln!("dump: restored {} MiB in {:.1} s; recovering to {}", r.bytes >> 20, r.seconds, p.target);
    let t1 = Instant::now();
    let server = ScratchServer::start(&p.tools, p.owner.as_ref(), &opts.pgdata, &p.scratch, &a.pg_user)?;
    server.wait_recovered(a.timeout, true).await.context("recovery to the target")?;
    let last = server.psql(
        "postgres",
        "SELECT coalesce(to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US \"UTC\"'), 'none'), pg_is_in_recovery()",
    )?;
    let (last_commit, in_recovery) = last.split_once('|').unwrap_or((&last, "t"));
    eprintln!("dump: recovered in {:.1} s; last replayed commit: {last_commit}", t1.elapsed().as_secs_f64());
    // The selection, against the catalog at the target.
    let dbs: Vec<String> = server
        .psql("postgres", "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")?
        .lines()
        .map(String::from)
        .collect();
    if !a.all && !dbs.contains(&a.dbname) {
        bail!("database {:?} did not exist at the target\nHINT: databases then: {}", a.dbname, dbs.join(", "));
    }
    let mut tables = a.table.clone();
    if !a.rename_table.is_empty() {
        if in_recovery == "t" {
            server.psql("postgres", "SELECT pg_promote(true, 300)")?;
        }
        for r in &a.rename_table {
            let (old, new) = parse_rename(r)?;
            server
                .psql(&a.dbname, &rename_sql(&old, &new))
                .with_context(|| format!("rename {old} to {new} in the recovered copy"))?;
            let renamed = match old.rsplit_once('.') {
                Some((schema, _)) => format!("{schema}.{new}"),
                None => new.clone(),
            };
            for t in tables.iter_mut().filter(|t| **t == old) {
                *t = renamed.clone();
            }
        }
    }
    let t2 = Instant::now();
    let summary = if a.all {
        dump_all(&server, p, &dbs)?
    } else if let Some(into) = &a.into {
        let file = p.scratch.join("dump.custom");
        pg_dump(&server, p, &a.dbname, &tables, &file, "custom")?;
        let size = tree_size(&file);
        eprintln!(
            "dump: {} MiB dumped in {:.1} s; restoring into the target database",
            size >> 20,
            t2.elapsed().as_secs_f64()
        );
        let mut c = std::process::Command::new(p.tools.path("pg_restore"));
        c.args(["--dbname", into, "--exit-on-error", "--no-owner"]);
        if a.clean {
            c.args(["--clean", "--if-exists"]);
        }
        c.arg(&file);
        output_ok(c, "pg_restore").context("pg_restore into the target database")?;
        format!("restored the dump of {:?} as of {last_commit} into the target database", a.dbname)
    } else {
        let out = a.file.as_ref().expect("--file or --into");
        let part = partial(out);
        pg_dump(&server, p, &a.dbname, &tables, &part, &a.format)?;
        if out.exists() {
            remove_any(out);
        }
        std::fs::rename(&part, out).with_context(|| format!("rename {} to {}", part.display(), out.display()))?;
        let size = tree_size(out);
        format!(
            "wrote {} ({} MiB, {} format) of {:?} as of {last_commit}",
            out.display(),
            size >> 20,
            a.format,
            a.dbname
        )
    };
    let t3 = Instant::now();
    drop(server);
    eprintln!(
        "dump: server stopped in {:.1} s; {:.1} s since the restore began",
        t3.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(summary)
}

/// pg_dump of `db` (with the selection flags) into `out`, as the invoking user.
fn pg_dump(server: &ScratchServer, p: &DumpPlan, db: &str, tables: &[String], out: &Path, format: &str) -> Result<()> {
    let a = p.args;
    let mut c = std::process::Command::new(p.tools.path("pg_dump"));
    c.args(server.conn_args()).args(["--format", format, "--file"]).arg(out).arg("--strict-names");
    for t in tables {
        c.args(["--table", t]);
    }
    for s in &a.schema {
        c.args(["--schema", s]);
    }
    for t in &a.exclude_table {
        c.args(["--exclude-table", t]);
    }
    if a.schema_only {
        c.arg("--schema-only");
    }
    if a.data_only {
        c.arg("--data-only");
    }
    if let Some(j) = a.jobs {
        c.args(["--jobs", &j.to_string()]);
    }
    c.args(["--dbname", db]).env("LC_ALL", "C").stdin(std::process::Stdio::null());
    eprintln!("dump: pg_dump of {db:?} ({format} format)");
    output_ok(c, "pg_dump")?;
    Ok(())
}

/// `--all`: globals and one custom-format dump per database, into the output directory.
fn dump_all(server: &ScratchServer, p: &DumpPlan, dbs: &[String]) -> Result<String> {
    let out = p.args.file.as_ref().expect("--all needs --file");
    let part = partial(out);
    std::fs::create_dir_all(&part)?;
    let mut c = std::process::Command::new(p.tools.path("pg_dumpall"));
    c.args(server.conn_args()).args(["--globals-only", "--file"]).arg(part.join("globals.sql"));
    output_ok(c, "pg_dumpall --globals-only")?;
    for db in dbs {
        pg_dump(server, p, db, &[], &part.join(format!("{db}.dump")), "custom")?;
    }
    if out.exists() {
        remove_any(out);
    }
    std::fs::rename(&part, out)?;
    Ok(format!(
        "wrote {}: globals.sql and {} database dumps ({}), {} MiB",
        out.display(),
        dbs.len(),
        dbs.join(", "),
        tree_size(out) >> 20
    ))
}

/// The programs a dump needs.
pub fn programs(a: &DumpArgs) -> Vec<&'static str> {
    let mut v = vec!["pg_ctl", "psql", "pg_dump"];
    if a.all {
        v.push("pg_dumpall");
    }
    if a.into.is_some() {
        v.push("pg_restore");
    }
    v
}

/// Default scratch directory.
pub fn default_scratch() -> PathBuf {
    std::env::temp_dir().join(format!("walvault-dump-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_renames() {
        assert_eq!(ident_chain("public.t"), "\"public\".\"t\"");
        assert_eq!(ident_chain("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(parse_rename("public.t=t_restored").unwrap(), ("public.t".into(), "t_restored".into()));
        assert!(parse_rename("t=other.x").is_err() && parse_rename("t").is_err() && parse_rename("=x").is_err());
        assert_eq!(partial(Path::new("/x/y.dump")), PathBuf::from("/x/y.dump.walvault-partial"));
        assert!(free_bytes(Path::new("/nonexistent/deeper")).unwrap() > 0, "nearest existing ancestor");
    }
}
