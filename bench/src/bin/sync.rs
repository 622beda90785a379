//! `walvault-bench-sync`: commit latency and TPS with a synchronous archiver, side by side.
//!
//! For each archiver, on a fresh PostgreSQL cluster (the one in `PG_BIN`), with
//! `synchronous_standby_names` naming it where it is synchronous, pgbench runs a one-row INSERT
//! per transaction (`-n -f`, prepared) for `--seconds` at 1, 4 and 16 clients, logging every
//! transaction (`--log`); latency p50/p99 come from those logs, TPS from pgbench:
//! * walvault-agent `--synchronous` into a local directory and into SeaweedFS (S3, 127.0.0.1);
//! * pg_receivewal `--synchronous` as the synchronous standby (fsync to local disk; it neither
//!   compresses nor uploads);
//! * walvault-agent without `--synchronous` (asynchronous: commits do not wait; for scale).
//!
//! The SeaweedFS store's own PUT latency (sequential 16 KiB PUTs through walvault's S3 client)
//! is measured in the same run: the floor a synchronous commit to S3 cannot go below.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use walvault_bench::{bin, percentile, KillOnDrop};
use walvault_shared::storage::ObjectStore;
use walvault_tests::pg::{chown_to_pg, pg_command, pg_program, PgCluster, PgOptions};
use walvault_tests::s3server::S3Server;

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<u32>,
    /// Rounds of every archiver (each round runs them all in turn); the table gives medians.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Only these archivers (for experiments): sync-local, sync-s3, receivewal, async.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    WalvaultSyncLocal,
    WalvaultSyncS3,
    PgReceivewalSync,
    WalvaultAsync,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::WalvaultSyncLocal => "walvault --synchronous, local directory",
            Mode::WalvaultSyncS3 => "walvault --synchronous, SeaweedFS (S3)",
            Mode::PgReceivewalSync => "pg_receivewal --synchronous (synchronous standby, local disk)",
            Mode::WalvaultAsync => "walvault asynchronous (1 s chunks; commits do not wait)",
        }
    }
    fn app(self) -> &'static str {
        if self == Mode::PgReceivewalSync {
            "pg_receivewal"
        } else {
            "walvault"
        }
    }
    fn synchronous(self) -> bool {
        self != Mode::WalvaultAsync
    }
}

/// The archiver process: stopped (SIGTERM) and reaped at the end of its mode, killed if the
/// benchmark fails first.
struct Archiver {
    child: std::process::Child,
    guard: KillOnDrop,
}

impl Archiver {
    fn stop(mut self) {
        // SAFETY: kill(2) on our child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self.guard.disarm();
    }
}

struct Row {
    mode: Mode,
    clients: u32,
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Per-transaction latencies (ms) from pgbench's `--log` files under `dir`.
fn latencies(dir: &Path) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("txlog")) {
            continue;
        }
        for line in std::fs::read_to_string(&p)?.lines() {
            // client_id transaction_no time(µs) script_no time_epoch time_us
            if let Some(us) = line.split_whitespace().nth(2).and_then(|t| t.parse::<f64>().ok()) {
                out.push(us / 1000.0);
            }
        }
    }
    Ok(out)
}

async fn start_archiver(mode: Mode, pg: &PgCluster, s3: &S3Server) -> Result<Archiver> {
    let child = match mode {
        Mode::PgReceivewalSync => {
            let out = pg.dir.join("receivewal");
            std::fs::create_dir_all(&out)?;
            chown_to_pg(&out)?;
            pg.execute("SELECT pg_create_physical_replication_slot('bench', true)").await?;
            let mut c = pg_command(&pg_program("pg_receivewal")?)?;
            c.args(["-D", out.to_str().unwrap(), "-S", "bench", "-h", "127.0.0.1", "-n", "--synchronous"])
                .args(["-p", &pg.port.to_string(), "-U", "postgres"])
                .env("PGAPPNAME", "pg_receivewal")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c.spawn()?
        }
        _ => {
            let mut c = Command::new(bin("walvault-agent")?);
            c.args(["run", "--pg-url", &pg.url(), "--no-backups", "--listen", "127.0.0.1:0"]);
            if mode.synchronous() {
                c.arg("--synchronous");
                // Extra agent flags for the synchronous runs (tuning experiments).
                if let Ok(extra) = std::env::var("WALVAULT_BENCH_SYNC_AGENT_ARGS") {
                    c.args(extra.split_whitespace());
                }
            }
            if mode == Mode::WalvaultSyncS3 {
                let bucket = s3.new_bucket("sync").await?;
                let _ = s3.options();
                c.args(["--archive", &format!("s3://{bucket}/bench"), "--s3-endpoint", &s3.endpoint])
                    .arg("--s3-force-path-style");
            } else {
                let dir = pg.dir.join("archive");
                std::fs::create_dir_all(&dir)?;
                c.args(["--archive", dir.to_str().unwrap()]);
            }
            c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?
        }
    };
    let guard = Archiver { guard: KillOnDrop(Some(child.id())), child };
    let t0 = Instant::now();
    let want = if mode.synchronous() { "sync" } else { "async" };
    loop {
        let state = pg
            .query_one_text(&format!(
                "SELECT coalesce((SELECT sync_state FROM pg_stat_replication WHERE application_name = '{}' AND state = 'streaming'), '')",
                mode.app()
            ))
            .await?;
        if state == want {
            return Ok(guard);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{}: not streaming as {want} after 60 s (state {state:?})", mode.name());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_mode(mode: Mode, cli: &Cli, s3: &S3Server) -> Result<Vec<Row>> {
    let settings = vec!["max_wal_size = '4GB'".to_string()];
    let pg = PgCluster::start_new("bench-sync", PgOptions { settings, ..Default::default() })?;
    pg.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await?;
    // Named only now: with the name set before the archiver connects, the CREATE TABLE above
    // would wait for it forever.
    if mode.synchronous() {
        pg.execute(&format!("ALTER SYSTEM SET synchronous_standby_names = '{}'", mode.app())).await?;
        pg.execute("SELECT pg_reload_conf()").await?;
    }
    eprintln!("{}: starting the archiver", mode.name());
    let archiver = start_archiver(mode, &pg, s3).await?;
    let script = pg.dir.join("insert.sql");
    std::fs::write(&script, "INSERT INTO t (v) VALUES (1);\n")?;
    chown_to_pg(&script)?;
    let mut rows = Vec::new();
    for &c in &cli.clients {
        let logs = pg.dir.join(format!("logs-{c}"));
        std::fs::create_dir_all(&logs)?;
        chown_to_pg(&logs)?;
        let jobs = c.clamp(1, 2).to_string();
        let mut cmd = pg_command(&pg_program("pgbench")?)?;
        cmd.current_dir(&logs)
            .args(["-n", "-M", "prepared", "-f", script.to_str().unwrap(), "-c", &c.to_string(), "-j", &jobs])
            .args(["-T", &cli.seconds.to_string(), "--log", "--log-prefix", "txlog"])
            .args(["-h", pg.socket_dir.to_str().unwrap(), "-p", &pg.port.to_string(), "-U", "postgres", "postgres"]);
        let o = cmd.output()?;
        if !o.status.success() {
            bail!("pgbench: {}", String::from_utf8_lossy(&o.stderr));
        }
        let out = String::from_utf8_lossy(&o.stdout);
        let tps = out
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse::<f64>().ok())
            .context("pgbench printed no tps")?;
        let lat = latencies(&logs)?;
        rows.push(Row { mode, clients: c, tps, p50_ms: percentile(&lat, 50.0), p99_ms: percentile(&lat, 99.0) });
        eprintln!("{}: {c} clients: {tps:.0} TPS, p99 {:.2} ms", mode.name(), percentile(&lat, 99.0));
    }
    archiver.stop();
    Ok(rows)
}

/// Sequential PUTs of 16 KiB objects to the store: latency p50/p99 in ms.
async fn put_latency(s3: &S3Server) -> Result<(f64, f64)> {
    let bucket = s3.new_bucket("puts").await?;
    let store = walvault_shared::storage::s3::S3Store::connect(&bucket, "p", &s3.options()).await?;
    let body = bytes::Bytes::from(vec![7u8; 16 << 10]);
    let mut lat = Vec::new();
    for i in 0..300 {
        let t0 = Instant::now();
        store.put(&format!("o{i}"), body.clone(), walvault_shared::storage::PutMode::IfAbsent).await?;
        if i >= 20 {
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok((percentile(&lat, 50.0), percentile(&lat, 99.0)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    walvault_bench::become_subreaper()?;
    let t_all = Instant::now();
    let s3 = S3Server::start().await?;
    let (put50, put99) = put_latency(&s3).await?;
    let mut all = Vec::new();
    for _ in 0..cli.runs.max(1) {
        for (mode, short) in [
            (Mode::WalvaultSyncLocal, "sync-local"),
            (Mode::WalvaultSyncS3, "sync-s3"),
            (Mode::PgReceivewalSync, "receivewal"),
            (Mode::WalvaultAsync, "async"),
        ] {
            if !cli.only.is_empty() && !cli.only.iter().any(|o| o == short) {
                continue;
            }
            all.extend(run_mode(mode, &cli, &s3).await.with_context(|| mode.name())?);
        }
    }
    // Medians over the rounds, per archiver and client count (in the order first run).
    let mut rows: Vec<(Row, f64, f64)> = Vec::new();
    for r in &all {
        if rows.iter().any(|(x, _, _)| x.mode == r.mode && x.clients == r.clients) {
            continue;
        }
        let same: Vec<&Row> = all.iter().filter(|x| x.mode == r.mode && x.clients == r.clients).collect();
        let med = |f: fn(&Row) -> f64| percentile(&same.iter().map(|x| f(x)).collect::<Vec<_>>(), 50.0);
        let tps: Vec<f64> = same.iter().map(|x| x.tps).collect();
        let (lo, hi) = tps.iter().fold((f64::MAX, f64::MIN), |(a, b), &t| (a.min(t), b.max(t)));
        let row = Row {
            mode: r.mode,
            clients: r.clients,
            tps: med(|x| x.tps),
            p50_ms: med(|x| x.p50_ms),
            p99_ms: med(|x| x.p99_ms),
        };
        rows.push((row, lo, hi));
    }
    let rows_only: Vec<&Row> = rows.iter().map(|(r, _, _)| r).collect();
    let mut s = String::new();
    use std::fmt::Write;
    writeln!(s, "## 5. Synchronous mode: commit latency and TPS\n")?;
    writeln!(
        s,
        "date: {}; one-row INSERT per transaction (`pgbench -n -M prepared -f`), {} s per cell, {} round(s) of every archiver in turn, medians (TPS range in brackets); latencies from pgbench's per-transaction log; SeaweedFS PUT of 16 KiB through walvault's S3 client: p50 {put50:.2} ms, p99 {put99:.2} ms; {:.0} s in all\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%MZ"),
        cli.seconds,
        cli.runs.max(1),
        t_all.elapsed().as_secs_f64()
    )?;
    writeln!(s, "| archiver | clients | TPS | latency p50 ms | p99 ms |")?;
    writeln!(s, "|---|---:|---:|---:|---:|")?;
    for (r, lo, hi) in &rows {
        let range = if cli.runs > 1 { format!(" ({lo:.0}–{hi:.0})") } else { String::new() };
        writeln!(s, "| {} | {} | {:.0}{range} | {:.2} | {:.2} |", r.mode.name(), r.clients, r.tps, r.p50_ms, r.p99_ms)?;
    }
    let get = |m: Mode, c: u32| rows_only.iter().copied().find(|r| r.mode == m && r.clients == c);
    writeln!(s)?;
    if let (Some(w), Some(p)) = (get(Mode::WalvaultSyncLocal, 16), get(Mode::PgReceivewalSync, 16)) {
        writeln!(
            s,
            "- 16 clients, local: walvault / pg_receivewal p99 **{:.2}×** (goal ≤ 1.5), TPS **{:.2}×** (goal ≥ 0.8)",
            w.p99_ms / p.p99_ms,
            w.tps / p.tps
        )?;
    }
    if let Some(w) = get(Mode::WalvaultSyncS3, 1) {
        writeln!(
            s,
            "- SeaweedFS, 1 client: p99 {:.2} ms against the store's PUT p99 {put99:.2} ms + 5 ms = {:.2} ms (goal: at most that)",
            w.p99_ms,
            put99 + 5.0
        )?;
    }
    for m in [Mode::WalvaultSyncLocal, Mode::WalvaultSyncS3] {
        if let (Some(a), Some(b)) = (get(m, 1), get(m, 16)) {
            writeln!(
                s,
                "- {}: TPS at 16 clients / 1 client **{:.1}×** (goal ≥ 6: group commit)",
                m.name(),
                b.tps / a.tps
            )?;
        }
    }
    if let (Some(a), Some(b)) = (get(Mode::PgReceivewalSync, 1), get(Mode::PgReceivewalSync, 16)) {
        writeln!(
            s,
            "- {} (for scale: what this host allows the anchor): TPS at 16 clients / 1 client {:.1}×",
            Mode::PgReceivewalSync.name(),
            b.tps / a.tps
        )?;
    }
    print!("{s}");
    if let Some(p) = &cli.out {
        std::fs::write(p, &s)?;
    }
    Ok(())
}
