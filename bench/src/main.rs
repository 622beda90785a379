//! `walvault-bench stream`: WAL streaming under pgbench, walvault-agent vs pg_receivewal, side by
//! side in one run, each on a fresh PostgreSQL 15 cluster with the same workload.
//!
//! Measured for each archiver:
//! * archive lag: every 100 ms the server's flush LSN `L(t)` is sampled; the lag of that sample
//!   is the time until the archiver's reported flush position (pg_stat_replication.flush_lsn:
//!   for walvault the archived watermark, for pg_receivewal what it has fsynced) reaches
//!   `L(t)`. p50/p99/max over all samples; also lag in bytes (`L(t)` − flush) p50/p99/max;
//! * CPU seconds of the archiver process per GiB of WAL, and its peak RSS;
//! * stored bytes per GiB of WAL.
//!
//! Figures are medians of `--runs` runs (default 3); the report prints ratios walvault/anchor.
//! Timings on a shared 2-core machine are noisy: compare only within one run of this tool.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use walvault_shared::lsn::Lsn;
use walvault_tests::pg::{pg_command, pg_program, PgCluster, PgOptions};

#[derive(Parser)]
struct Cli {
    /// walvault-agent binary (default: the release build next to this binary, else debug).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// pgbench -i scale (bulk load phase).
    #[arg(long, default_value_t = 20)]
    scale: u32,
    /// Seconds of pgbench OLTP after the bulk load.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "1s")]
    chunk_interval: String,
    /// Write the report here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
struct RunResult {
    lag_s: Vec<f64>,
    lag_bytes: Vec<f64>,
    cpu_s: f64,
    wal_bytes: u64,
    stored_bytes: u64,
    peak_rss_kib: u64,
    tps: f64,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// utime+stime of a process in seconds, and its peak RSS (KiB).
fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state(0) ... utime(11) stime(12).
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks as f64 / hz, hwm))
}

fn dir_size(p: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                n += dir_size(&e.path());
            } else {
                n += md.len();
            }
        }
    }
    n
}

enum Archiver {
    Walvault { agent: PathBuf, chunk_interval: String },
    PgReceivewal,
}

impl Archiver {
    fn name(&self) -> &'static str {
        match self {
            Archiver::Walvault { .. } => "walvault",
            Archiver::PgReceivewal => "pg_receivewal",
        }
    }
}

async fn one_run(a: &Archiver, scale: u32, seconds: u32) -> Result<RunResult> {
    let pg = PgCluster::start_new(
        "bench",
        PgOptions { settings: vec!["max_wal_size = '4GB'".into()], ..Default::default() },
    )?;
    let out_dir = pg.dir.join("archive");
    std::fs::create_dir_all(&out_dir)?;
    walvault_tests::pg::chown_to_pg(&out_dir)?;
    let app = a.name();
    let mut child: Child = match a {
        Archiver::Walvault { agent, chunk_interval } => Command::new(agent)
            .args(["run", "--pg-url", &format!("{} application_name={app}", pg.conn_str("postgres", "postgres"))])
            .args(["--archive", out_dir.to_str().unwrap(), "--chunk-interval", chunk_interval, "--no-backups"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
        Archiver::PgReceivewal => {
            pg.execute("SELECT pg_create_physical_replication_slot('bench', true)").await?;
            let mut c = pg_command(&pg_program("pg_receivewal")?)?;
            c.args([
                "-D",
                out_dir.to_str().unwrap(),
                "-S",
                "bench",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-n",
            ])
            .env("PGAPPNAME", app)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            c.spawn()?
        }
    };
    let pid = child.id();
    // Stop the archiver even when this run fails half way.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let guard = KillOnDrop(pid);
    let client = pg.connect().await?;
    // Wait for the archiver to stream.
    let t0 = Instant::now();
    loop {
        let rows = client
            .simple_query(&format!(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = '{app}' AND state = 'streaming'"
            ))
            .await?;
        if rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{app} did not start streaming");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start_lsn: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    let (cpu0, _) = proc_usage(pid)?;
    // Workload in the background: bulk load, then OLTP.
    let sock = pg.socket_dir.clone();
    let port = pg.port;
    let load = std::thread::spawn(move || -> Result<f64> {
        let run = |args: &[&str]| -> Result<String> {
            let mut c = pg_command(&pg_program("pgbench")?)?;
            c.args(args).env("PGHOST", &sock).env("PGPORT", port.to_string()).env("PGUSER", "postgres");
            let o = c.output()?;
            if !o.status.success() {
                bail!("pgbench failed: {}", String::from_utf8_lossy(&o.stderr));
            }
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        };
        run(&["-i", "-s", &scale.to_string(), "-q", "postgres"])?;
        let out = run(&["-T", &seconds.to_string(), "-c", "2", "-n", "postgres"])?;
        let tps = out
            .lines()
            .find(|l| l.starts_with("tps"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        Ok(tps)
    });
    // Sample (time, server flush, archiver flush) every 100 ms.
    let mut samples: Vec<(Instant, u64, u64)> = Vec::new();
    let q = format!(
        "SELECT pg_current_wal_flush_lsn()::text, coalesce((SELECT max(flush_lsn)::text FROM pg_stat_replication WHERE application_name = '{app}'), '0/0')"
    );
    let mut done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let rows = client.simple_query(&q).await?;
        if let Some(r) = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        }) {
            let s: Lsn = r.get(0).unwrap_or("0/0").parse()?;
            let f: Lsn = r.get(1).unwrap_or("0/0").parse()?;
            samples.push((now, s.0, f.0));
        }
        if load.is_finished() && done_at.is_none() {
            done_at = Some(now);
        }
        // After the load, wait until caught up (or 60 s).
        if let Some(d) = done_at {
            let caught_up = samples.last().is_some_and(|&(_, s, f)| f >= s);
            if caught_up || now - d > Duration::from_secs(60) {
                break;
            }
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(now + Duration::from_millis(100))).await;
    }
    let tps = load.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let end_lsn: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    let (cpu1, rss) = proc_usage(pid)?;
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    // Reaped: its PID may be reused, so the guard must not fire.
    std::mem::forget(guard);
    let mut lag_s = Vec::new();
    let mut lag_bytes = Vec::new();
    for (i, &(t, s, f)) in samples.iter().enumerate() {
        lag_bytes.push(s.saturating_sub(f) as f64);
        if let Some(&(t2, _, _)) = samples[i..].iter().find(|&&(_, _, f2)| f2 >= s) {
            lag_s.push((t2 - t).as_secs_f64());
        }
    }
    Ok(RunResult {
        lag_s,
        lag_bytes,
        cpu_s: cpu1 - cpu0,
        wal_bytes: end_lsn.0 - start_lsn.0,
        stored_bytes: dir_size(&out_dir),
        peak_rss_kib: rss,
        tps,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let agent = match cli.agent {
        Some(a) => a,
        None => {
            let exe = std::env::current_exe()?;
            let target = exe.parent().and_then(|p| p.parent()).context("exe dir")?;
            let rel = target.join("release/walvault-agent");
            if rel.exists() {
                rel
            } else {
                target.join("debug/walvault-agent")
            }
        }
    };
    let archivers = [
        Archiver::Walvault { agent: agent.clone(), chunk_interval: cli.chunk_interval.clone() },
        Archiver::PgReceivewal,
    ];
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(), Vec::new()];
    for run in 0..cli.runs {
        for (i, a) in archivers.iter().enumerate() {
            eprintln!("run {}/{}: {} …", run + 1, cli.runs, a.name());
            results[i].push(one_run(a, cli.scale, cli.seconds).await?);
        }
    }
    let mut report = String::new();
    use std::fmt::Write;
    let gib = (1u64 << 30) as f64;
    writeln!(report, "# WAL streaming under pgbench: walvault-agent vs pg_receivewal\n")?;
    writeln!(
        report,
        "date: {}; machine: {} cores; agent: {}",
        chrono::Utc::now().to_rfc3339(),
        std::thread::available_parallelism()?.get(),
        agent.display()
    )?;
    writeln!(
        report,
        "workload: pgbench -i -s {} then pgbench -T {} -c 2; walvault chunk_interval {}; medians of {} runs\n",
        cli.scale, cli.seconds, cli.chunk_interval, cli.runs
    )?;
    writeln!(report, "| archiver | lag p50 s | lag p99 s | lag max s | lag p99 MiB | lag max MiB | CPU s/GiB WAL | peak RSS MiB | stored/WAL | pgbench tps |")?;
    writeln!(report, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut rows = Vec::new();
    for (i, a) in archivers.iter().enumerate() {
        let r = &results[i];
        let m = |f: &dyn Fn(&RunResult) -> f64| median(r.iter().map(f).collect());
        let row = [
            m(&|x| percentile(&x.lag_s, 50.0)),
            m(&|x| percentile(&x.lag_s, 99.0)),
            m(&|x| percentile(&x.lag_s, 100.0)),
            m(&|x| percentile(&x.lag_bytes, 99.0) / (1 << 20) as f64),
            m(&|x| percentile(&x.lag_bytes, 100.0) / (1 << 20) as f64),
            m(&|x| x.cpu_s / (x.wal_bytes as f64 / gib)),
            m(&|x| x.peak_rss_kib as f64 / 1024.0),
            m(&|x| x.stored_bytes as f64 / x.wal_bytes as f64),
            m(&|x| x.tps),
        ];
        writeln!(
            report,
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.0} | {:.3} | {:.0} |",
            a.name(),
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8]
        )?;
        rows.push(row);
    }
    writeln!(report, "\nratios walvault / pg_receivewal: lag p99 {:.2}, lag max {:.2}, CPU per GiB {:.2}, peak RSS {:.2}, stored bytes {:.2}, tps {:.2}",
        rows[0][1] / rows[1][1], rows[0][2] / rows[1][2], rows[0][5] / rows[1][5], rows[0][6] / rows[1][6], rows[0][7] / rows[1][7], rows[0][8] / rows[1][8])?;
    writeln!(
        report,
        "WAL per run (median): {:.0} MiB",
        median(results[0].iter().map(|x| x.wal_bytes as f64 / (1 << 20) as f64).collect())
    )?;
    print!("{report}");
    if let Some(p) = cli.out {
        std::fs::write(p, &report)?;
    }
    Ok(())
}
