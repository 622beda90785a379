//! `walvault-bench-dump`: a logical export of one table at a point in time, side by side in one
//! run.
//!
//! One cluster (the one in `PG_BIN`) is filled by `pgbench -i -s SCALE`; walvault-agent streams
//! its WAL into a local archive and takes a full backup; then a short pgbench run changes rows and
//! the target time is taken. Then, for `pgbench_branches` as of that time:
//! 1. `walvault-recover dump --target-time T --table pgbench_branches` (custom format): restore
//!    into a scratch directory, recover to T and pause, pg_dump, clean up;
//! 2. the manual path with the same tools: `walvault-recover restore --target-time T
//!    --target-action pause`, `pg_ctl start`, wait until replay is paused at the target,
//!    `pg_dump --table`, `pg_ctl stop`, remove the directory;
//! 3. `pg_dump --table pgbench_branches` of the live database (for scale: no point in time).
//!
//! Every figure is wall time from the command to a finished dump file and a removed scratch
//! copy; `sync` runs before each path (untimed) so none pays for the previous one's writeback,
//! and the two paths take turns going first. `--runs` repeats and reports medians (min–max).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use walvault_bench::{bin, median, mmm};
use walvault_tests::pg::{pg_command, pg_program, PgCluster, PgOptions};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value_t = 300)]
    scale: u32,
    #[arg(long, default_value_t = 1)]
    runs: usize,
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn ok(mut c: Command, what: &str) -> Result<String> {
    let o = c.output().with_context(|| format!("run {what}"))?;
    if !o.status.success() {
        bail!("{what}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `pg_dump -Fc --table pgbench_branches` of `pg` over its socket.
fn pg_dump_table(pg: &PgCluster, out: &Path, what: &str) -> Result<()> {
    let mut c = pg_command(&pg_program("pg_dump")?)?;
    c.args(["-Fc", "--table", "pgbench_branches", "-f", out.to_str().unwrap()]);
    c.args(["-h", pg.socket_dir.to_str().unwrap(), "-p", &pg.port.to_string(), "-U", "postgres", "postgres"]);
    ok(c, what).map(|_| ())
}

fn walvault_dump(archive: &str, target: &str, out: &Path) -> Result<f64> {
    let scratch = PgCluster::fresh_dir("bench-dump-scratch")?;
    walvault_bench::settle();
    let t0 = Instant::now();
    let mut c = Command::new(bin("walvault-recover")?);
    c.args(["dump", "--archive", archive, "--target-time", target, "--table", "pgbench_branches"])
        .args(["--file", out.to_str().unwrap(), "--owner", &PgCluster::pg_user_name()])
        .args(["--scratch", scratch.join("s").to_str().unwrap()]);
    let o = c.output().context("run walvault-recover dump")?;
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        bail!("walvault-recover dump: {err}");
    }
    // Its phases (restore, recovery, dump), for the log of the run.
    for l in err.lines().filter(|l| l.starts_with("dump:")) {
        eprintln!("  {l}");
    }
    let s = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(s)
}

async fn manual_path(archive: &str, target: &str, out: &Path) -> Result<f64> {
    let dir = PgCluster::fresh_dir("bench-dump-manual")?;
    let data = dir.join("data");
    walvault_bench::settle();
    let t0 = Instant::now();
    let mut c = Command::new(bin("walvault-recover")?);
    c.args(["restore", "--archive", archive, "--target-time", target, "--target-action", "pause"]).args([
        "--pgdata",
        data.to_str().unwrap(),
        "--owner",
        &PgCluster::pg_user_name(),
        "--lease",
        "0s",
    ]);
    ok(c, "walvault-recover restore")?;
    let t_restored = t0.elapsed().as_secs_f64();
    let pg = PgCluster::from_data_dir("bench-dump-manual", dir.clone(), data, vec![])?;
    pg.start()?;
    loop {
        if let Ok(s) = pg.query_one_text("SELECT pg_get_wal_replay_pause_state()").await {
            if s == "paused" {
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("the manual path's server did not pause at the target");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_paused = t0.elapsed().as_secs_f64();
    pg_dump_table(&pg, out, "pg_dump (manual path)")?;
    pg.stop("immediate")?;
    let t_stopped = t0.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir)?;
    let t = t0.elapsed().as_secs_f64();
    eprintln!(
        "  manual: restored at {t_restored:.1} s, paused at {t_paused:.1} s, dumped and stopped at {t_stopped:.1} s, removed at {t:.1} s"
    );
    Ok(t)
}

fn live_dump(pg: &PgCluster, out: &Path) -> Result<f64> {
    let t0 = Instant::now();
    pg_dump_table(pg, out, "pg_dump (live)")?;
    Ok(t0.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let t_all = Instant::now();
    let pg = PgCluster::start_new(
        "bench-dump",
        PgOptions { settings: vec!["max_wal_size = '8GB'".into()], ..Default::default() },
    )?;
    pg.run_program("pgbench", &["-i", "-s", &cli.scale.to_string(), "-q", "postgres"])?;
    pg.execute("CHECKPOINT").await?;
    let db_bytes: u64 = pg.query_one_text("SELECT pg_database_size('postgres')").await?.parse()?;
    let adir = PgCluster::fresh_dir("bench-dump-archive")?;
    let archive = walvault_bench::shared_archive(&adir)?;
    let mut agent = Command::new(bin("walvault-agent")?)
        .args(["run", "--pg-url", &pg.url(), "--archive", &archive, "--no-backups"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let guard = walvault_bench::KillOnDrop(Some(agent.id()));
    let mut c = Command::new(bin("walvault-agent")?);
    c.args(["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    ok(c, "walvault-agent backup")?;
    pg.run_program("pgbench", &["-n", "-T", "10", "-c", "2", "postgres"])?;
    let target = pg
        .query_one_text("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    pg.execute("UPDATE pgbench_branches SET bbalance = bbalance + 1").await?;
    pg.switch_wal().await?;
    // Everything up to the target (and past it) archived before measuring, and the source's own
    // checkpoint done (a spread checkpoint writing behind the first measured path skews it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.execute("CHECKPOINT").await?;
    let out_dir = PgCluster::fresh_dir("bench-dump-out")?;
    let (mut ours, mut manual, mut live) = (Vec::new(), Vec::new(), Vec::new());
    // Each path starts with nothing left to write back (the load, the backup, the previous
    // path's removal), and the two paths take turns going first.
    let settle = || {
        // SAFETY: sync(2) has no arguments and cannot fail.
        unsafe { libc::sync() };
    };
    for i in 0..cli.runs {
        let ours_out = out_dir.join(format!("ours-{i}.dump"));
        let manual_out = out_dir.join(format!("manual-{i}.dump"));
        if i % 2 == 0 {
            settle();
            ours.push(walvault_dump(&archive, &target, &ours_out)?);
            settle();
            manual.push(manual_path(&archive, &target, &manual_out).await?);
        } else {
            settle();
            manual.push(manual_path(&archive, &target, &manual_out).await?);
            settle();
            ours.push(walvault_dump(&archive, &target, &ours_out)?);
        }
        live.push(live_dump(&pg, &out_dir.join(format!("live-{i}.dump")))?);
        eprintln!(
            "run {i}: walvault dump {:.1} s, manual path {:.1} s, live pg_dump {:.2} s",
            ours[i], manual[i], live[i]
        );
    }
    // unsafe-free stop: SIGTERM through kill(1).
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
    drop(guard);
    let text = format!(
        "## 6. Logical export of one table at a point in time\n\n\
         date: {}; pgbench scale {} ({:.1} GiB database) on PostgreSQL {}, one full backup, 10 s of pgbench after it, target = the time after that; \
         `pgbench_branches` as of the target, custom format; {} run(s), {:.0} s in all\n\n\
         | path | seconds |\n|---|---:|\n\
         | `walvault-recover dump --target-time T --table pgbench_branches` | {} |\n\
         | manual: `restore --target-action pause`, `pg_ctl start`, wait for the pause, `pg_dump --table`, stop, remove | {} |\n\
         | `pg_dump --table` of the live database (no point in time; for scale) | {} |\n\n\
         - walvault dump / manual path: **{:.2}×** (goal ≤ 1.0×); / live pg_dump: {:.0}×\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%MZ"),
        cli.scale,
        db_bytes as f64 / (1u64 << 30) as f64,
        walvault_tests::pg::pg_major(),
        cli.runs,
        t_all.elapsed().as_secs_f64(),
        mmm(&ours, 1),
        mmm(&manual, 1),
        mmm(&live, 2),
        median(&ours) / median(&manual),
        median(&ours) / median(&live).max(0.001),
    );
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_dir_all(&adir);
    match &cli.out {
        Some(p) => std::fs::write(p, &text)?,
        None => print!("{text}"),
    }
    Ok(())
}
