//! `walvault-bench-incremental`: incremental backups (PostgreSQL 17+) and the restore of a chain,
//! side by side in one run.
//!
//! One cluster of the major in `PG_BIN` (17 or later; `summarize_wal = on`) is filled by
//! `pgbench -i -s SCALE`; walvault-agent streams its WAL into a local archive. Then:
//! 1. a full backup (`walvault-agent backup`);
//! 2. `--update-percent` of the accounts updated (a contiguous range of `aid`, one statement),
//!    then an incremental backup (`--incremental`); once more (the next range), a second
//!    incremental; then a full backup of the same data: time, CPU, peak RSS and stored bytes of
//!    each, and the ratios incremental / full;
//! 3. restores (files only, no server started): the chain full + 2 incrementals (combined
//!    natively) and the full backup of the same data, and "pg_combinebackup + copy" as the
//!    anchors do it: each backup of the chain copied out of the archive to local disk
//!    (`walvault-recover export-backup`), then `pg_combinebackup` of the three;
//! 4. pgBackRest's incremental on the same workload: pgBackRest 2.45 (Debian 12's) does not
//!    support PostgreSQL 17, so it runs on a PostgreSQL 15 cluster of the same scale (this
//!    binary runs itself again with `--pgbackrest-phase` and `PG_BIN` set to 15): full backup,
//!    the same update, `pgbackrest backup --type=incr` (file-level: changed files are copied
//!    whole).
//!
//! Every figure is from one run (`--runs` repeats and reports medians (min–max)).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use walvault_bench::{bin, dir_size, measured, median, mmm, reap_orphans, KillOnDrop, Pgbackrest, Usage};
use walvault_shared::lsn::Lsn;
use walvault_tests::pg::{pg_command, pg_major, pg_program, PgCluster, PgOptions};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value_t = 300)]
    scale: u32,
    /// Share of the accounts updated between backups (a contiguous range of aid), in percent.
    #[arg(long, default_value_t = 10)]
    update_percent: u32,
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// PostgreSQL 15 programs for the pgBackRest comparison.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pgbackrest_pg_bin: PathBuf,
    #[arg(long)]
    out: Option<PathBuf>,
    /// (internal) run only the pgBackRest part and print its figures as JSON.
    #[arg(long, hide = true)]
    pgbackrest_phase: bool,
}

const MIB: f64 = (1u64 << 20) as f64;

fn pg_opts(summarize: bool) -> PgOptions {
    let mut settings = vec!["max_wal_size = '8GB'".to_string(), "checkpoint_timeout = '30min'".into()];
    if summarize {
        settings.push("summarize_wal = on".into());
    }
    PgOptions { settings, ..Default::default() }
}

/// Update `percent` % of the accounts, the `k`-th such range.
async fn update_accounts(pg: &PgCluster, scale: u32, percent: u32, k: u32) -> Result<()> {
    let n = scale as u64 * 100_000;
    let span = n * percent as u64 / 100;
    let from = (k as u64 * span) % n + 1;
    pg.execute(&format!(
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN {from} AND {}",
        from + span - 1
    ))
    .await?;
    pg.execute("CHECKPOINT").await
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct PgbrFigures {
    full: Vec<(f64, f64, f64)>,
    incr: Vec<(f64, f64, f64)>,
}

/// pgBackRest full, update, incr on a PostgreSQL 15 cluster: (seconds, CPU s, stored MiB).
async fn pgbackrest_phase(cli: &Cli) -> Result<PgbrFigures> {
    let pg = PgCluster::start_new(
        "bench-incr-pgbr",
        PgOptions {
            settings: vec![
                "max_wal_size = '8GB'".into(),
                "checkpoint_timeout = '30min'".into(),
                "archive_mode = on".into(),
                "archive_command = '/bin/true'".into(),
            ],
            ..Default::default()
        },
    )?;
    pg.run_program("pgbench", &["-i", "-s", &cli.scale.to_string(), "-q", "postgres"])?;
    pg.execute("CHECKPOINT").await?;
    let pgbr = Pgbackrest::new(&pg)?;
    pgbr.enable_archiving(&pg).await?;
    let mut f = PgbrFigures::default();
    for i in 0..cli.runs {
        let size = || dir_size(&pgbr.repo.join("backup")) as f64 / MIB;
        let before = size();
        let u = measured(pgbr.command(&["--type=full", "--process-max=2", "backup"])?)?;
        reap_orphans(&["pgbackrest", "postgres"]);
        f.full.push((u.wall_s, u.cpu_s, size() - before));
        update_accounts(&pg, cli.scale, cli.update_percent, 2 * i as u32).await?;
        let before = size();
        let u = measured(pgbr.command(&["--type=incr", "--process-max=2", "backup"])?)?;
        reap_orphans(&["pgbackrest", "postgres"]);
        f.incr.push((u.wall_s, u.cpu_s, size() - before));
    }
    pgbr.wait_idle(Duration::from_secs(60)).await;
    Ok(f)
}

#[derive(Default)]
struct Results {
    /// full, incr 1, incr 2, full of the same data: (usage, stored MiB)
    backup: [Vec<(Usage, f64)>; 4],
    /// chain (combined), full of the same data, export ×3 + pg_combinebackup
    restore: [Vec<f64>; 3],
    db_mib: f64,
}

async fn time_restore(archive: &str, id: &str) -> Result<f64> {
    let dir = PgCluster::fresh_dir("bench-incr-restore")?;
    walvault_bench::settle();
    let t0 = Instant::now();
    let out = Command::new(bin("walvault-recover")?)
        .args(["restore", "--archive", archive, "--backup", id, "--latest"])
        .args(["--pgdata", dir.join("data").to_str().unwrap(), "--owner", &PgCluster::pg_user_name()])
        .output()?;
    if !out.status.success() {
        bail!("restore of {id}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let s = t0.elapsed().as_secs_f64();
    // The restore's phase lines (chain check, each backup of the chain, the manifest).
    for l in String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains(" in ") && l.starts_with("restore: ")) {
        eprintln!("  [{id}] {l}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(s)
}

/// The anchors' way: every backup of the chain to local disk, then pg_combinebackup.
fn time_export_and_combine(archive: &str, ids: &[String]) -> Result<f64> {
    let dir = PgCluster::fresh_dir("bench-incr-combine")?;
    walvault_bench::settle();
    let t0 = Instant::now();
    let mut dirs = Vec::new();
    for id in ids {
        let d = dir.join(id);
        let out = Command::new(bin("walvault-recover")?)
            .args(["export-backup", "--archive", archive, "--backup", id, "--dir", d.to_str().unwrap()])
            .args(["--owner", &PgCluster::pg_user_name()])
            .output()?;
        if !out.status.success() {
            bail!("export-backup {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        dirs.push(d);
    }
    let mut c = pg_command(&pg_program("pg_combinebackup")?)?;
    c.args(&dirs).arg("-o").arg(dir.join("combined"));
    let o = c.output()?;
    if !o.status.success() {
        bail!("pg_combinebackup: {}", String::from_utf8_lossy(&o.stderr));
    }
    let s = t0.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir)?;
    Ok(s)
}

fn backup_cmd(agent: &Path, pg: &PgCluster, archive: &str, incremental: bool) -> Command {
    let mut c = Command::new(agent);
    c.args(["backup", "--pg-url", &pg.url(), "--archive", archive]);
    if incremental {
        c.arg("--incremental");
    }
    c
}

/// The id of the newest backup in the archive.
fn newest_id(archive: &str) -> Result<String> {
    let out = Command::new(bin("walvault-recover")?).args(["list", "--archive", archive, "--json"]).output()?;
    let l: serde_json::Value = serde_json::from_slice(&out.stdout).context("list --json")?;
    Ok(l["backups"].as_array().and_then(|b| b.last()).and_then(|b| b["id"].as_str()).context("no backup")?.to_string())
}

async fn run(cli: &Cli) -> Result<Results> {
    if pg_major() < 17 {
        bail!("PG_BIN must point at PostgreSQL 17 or later (incremental backups); it is {}", pg_major());
    }
    let pg = PgCluster::start_new("bench-incr", pg_opts(true))?;
    let t_load = Instant::now();
    pg.run_program("pgbench", &["-i", "-s", &cli.scale.to_string(), "-q", "postgres"])?;
    pg.execute("CHECKPOINT").await?;
    eprintln!("[bulk load of scale {} took {:.0} s]", cli.scale, t_load.elapsed().as_secs_f64());
    let db_bytes: u64 = pg.query_one_text("SELECT sum(pg_database_size(oid)) FROM pg_database").await?.parse()?;
    let adir = PgCluster::fresh_dir("bench-incr-archive")?;
    let archive = walvault_bench::shared_archive(&adir)?;
    let agent_bin = bin("walvault-agent")?;
    let mut agent = Command::new(&agent_bin)
        .args(["run", "--pg-url", &pg.url(), "--archive", &archive, "--no-backups"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut guard = KillOnDrop(Some(agent.id()));
    let mut res = Results { db_mib: db_bytes as f64 / MIB, ..Default::default() };
    let mut restore_sets = Vec::new();
    for i in 0..cli.runs {
        eprintln!("backups, run {}/{} …", i + 1, cli.runs);
        let stored = || dir_size(&adir.join("repo/backups")) as f64 / MIB;
        let mut ids = Vec::new();
        for (k, incremental) in [(0, false), (1, true), (2, true), (3, false)] {
            if k == 1 || k == 2 {
                update_accounts(&pg, cli.scale, cli.update_percent, 2 * i as u32 + k as u32 - 1).await?;
            }
            let before = stored();
            let u = measured(backup_cmd(&agent_bin, &pg, &archive, incremental))?;
            res.backup[k].push((u, stored() - before));
            ids.push(newest_id(&archive)?);
        }
        restore_sets.push(ids);
    }
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    eprintln!("[WAL up to {end}]");
    pg.stop("fast")?;
    // SAFETY: kill(2) on our child, not yet reaped.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    guard.disarm();
    for (i, ids) in restore_sets.iter().enumerate() {
        eprintln!("restores, run {}/{} …", i + 1, cli.runs);
        res.restore[0].push(time_restore(&archive, &ids[2]).await?);
        res.restore[1].push(time_restore(&archive, &ids[3]).await?);
        res.restore[2].push(time_export_and_combine(&archive, &ids[..3])?);
    }
    let _ = std::fs::remove_dir_all(&adir);
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    walvault_bench::become_subreaper()?;
    if cli.pgbackrest_phase {
        let f = pgbackrest_phase(&cli).await?;
        println!("{}", serde_json::to_string(&f)?);
        return Ok(());
    }
    let t_all = Instant::now();
    let r = run(&cli).await.context("incremental benchmark")?;
    eprintln!("pgBackRest on PostgreSQL 15 …");
    let me = std::env::current_exe()?;
    let out = Command::new(&me)
        .args(["--pgbackrest-phase", "--scale", &cli.scale.to_string()])
        .args(["--update-percent", &cli.update_percent.to_string(), "--runs", &cli.runs.to_string()])
        .env("PG_BIN", &cli.pgbackrest_pg_bin)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("the pgBackRest phase failed");
    }
    let pgbr: PgbrFigures = serde_json::from_slice(&out.stdout).context("pgBackRest phase output")?;
    let mut s = String::new();
    use std::fmt::Write;
    let major = pg_major();
    writeln!(s, "## 4. Incremental backups (PostgreSQL {major}) and the restore of a chain\n")?;
    writeln!(
        s,
        "date: {}; pgbench scale {} ({:.0} MiB database); {} % of the accounts (a contiguous aid range) updated before each incremental; {} run(s); {:.0} s in all\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%MZ"),
        cli.scale,
        r.db_mib,
        cli.update_percent,
        cli.runs,
        t_all.elapsed().as_secs_f64()
    )?;
    writeln!(s, "| backup | seconds | CPU s | peak RSS MiB | stored MiB |")?;
    writeln!(s, "|---|---:|---:|---:|---:|")?;
    let col = |k: usize, f: &dyn Fn(&(Usage, f64)) -> f64| r.backup[k].iter().map(f).collect::<Vec<f64>>();
    for (k, name) in [
        (0, "walvault full"),
        (1, "walvault incremental 1 (after the first update)"),
        (2, "walvault incremental 2 (after the second update)"),
        (3, "walvault full of the same data as incremental 2"),
    ] {
        writeln!(
            s,
            "| {name} | {} | {} | {} | {} |",
            mmm(&col(k, &|x| x.0.wall_s), 1),
            mmm(&col(k, &|x| x.0.cpu_s), 1),
            mmm(&col(k, &|x| x.0.peak_rss_mib), 0),
            mmm(&col(k, &|x| x.1), 1)
        )?;
    }
    let pcol = |v: &[(f64, f64, f64)], f: &dyn Fn(&(f64, f64, f64)) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    writeln!(
        s,
        "| pgBackRest 2.45 full, PostgreSQL 15, process-max 2 | {} | {} | – | {} |",
        mmm(&pcol(&pgbr.full, &|x| x.0), 1),
        mmm(&pcol(&pgbr.full, &|x| x.1), 1),
        mmm(&pcol(&pgbr.full, &|x| x.2), 1)
    )?;
    writeln!(
        s,
        "| pgBackRest 2.45 `--type=incr`, PostgreSQL 15, process-max 2 | {} | {} | – | {} |",
        mmm(&pcol(&pgbr.incr, &|x| x.0), 1),
        mmm(&pcol(&pgbr.incr, &|x| x.1), 1),
        mmm(&pcol(&pgbr.incr, &|x| x.2), 1)
    )?;
    let m = |k: usize, f: &dyn Fn(&(Usage, f64)) -> f64| median(&col(k, f));
    let t = |x: &(Usage, f64)| x.0.wall_s;
    let b = |x: &(Usage, f64)| x.1;
    writeln!(s)?;
    writeln!(
        s,
        "- incremental 1 / full: time **{:.2}×** (goal ≤ 0.25), stored bytes **{:.3}×** (goal ≤ 0.15)",
        m(1, &t) / m(0, &t),
        m(1, &b) / m(0, &b)
    )?;
    writeln!(
        s,
        "- incremental 2 / the full backup of the same data (what it replaces): time **{:.2}×**, stored bytes **{:.3}×**",
        m(2, &t) / m(3, &t),
        m(2, &b) / m(3, &b)
    )?;
    writeln!(
        s,
        "- incremental 1 / pgBackRest incr (same workload, PostgreSQL 15): time **{:.2}×**, stored bytes **{:.2}×** (goal ≤ 1.0)",
        m(1, &t) / median(&pcol(&pgbr.incr, &|x| x.0)),
        m(1, &b) / median(&pcol(&pgbr.incr, &|x| x.2))
    )?;
    writeln!(s, "\n| restore (files only) | seconds | MiB/s of database |")?;
    writeln!(s, "|---|---:|---:|")?;
    let speed = |v: &[f64]| v.iter().map(|w| r.db_mib / w).collect::<Vec<f64>>();
    for (k, name) in [
        (0, "walvault-recover restore of full + 2 incrementals (combined while streaming)"),
        (1, "walvault-recover restore of a full backup of the same data"),
        (2, "the 3 backups copied to disk (export-backup) + pg_combinebackup"),
    ] {
        writeln!(s, "| {name} | {} | {} |", mmm(&r.restore[k], 1), mmm(&speed(&r.restore[k]), 0))?;
    }
    writeln!(
        s,
        "\n- chain restore / full restore: **{:.2}×** (goal ≤ 1.2); chain restore / (copy + pg_combinebackup): **{:.2}×** (goal ≤ 0.6)",
        median(&r.restore[0]) / median(&r.restore[1]),
        median(&r.restore[0]) / median(&r.restore[2])
    )?;
    print!("{s}");
    if let Some(p) = &cli.out {
        std::fs::write(p, &s)?;
    }
    Ok(())
}
