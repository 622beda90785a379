//! `walvault-bench`: WAL archiving under load, walvault-agent against the archivers users
//! compare it with, side by side in one run, each on a fresh PostgreSQL 15 cluster with the
//! same workload; then walvault's commit-to-archive latency at several chunk intervals.
//!
//! ## Part 1: archiving under load
//! Archivers: none (the baseline for throughput), walvault-agent to a local archive,
//! walvault-agent to SeaweedFS (S3 on 127.0.0.1), pg_receivewal (default, and `--synchronous`),
//! and pgBackRest `archive-push` with `archive-async=y`, zstd, a posix repository (process-max 2
//! for archive-push, as in pgBackRest's user guide). Two phases per cluster: a bulk load
//! (`pgbench -i -s BULK_SCALE`) and OLTP at full speed (`pgbench -T SECONDS -c 2`). For each:
//! * archive lag: every 100 ms the server's flush LSN `L(t)` is sampled; the lag of a sample
//!   is the time until the archiver's durable position reaches `L(t)`. The durable position is
//!   pg_stat_replication.flush_lsn for walvault (its archived watermark) and pg_receivewal (what
//!   it has fsynced), and the end of pg_stat_archiver.last_archived_wal for pgBackRest. p50/p99/
//!   max over all samples, and lag in bytes (`L(t)` − durable position). pgBackRest archives
//!   whole segments only, and pg_receivewal without `--synchronous` fsyncs (and reports as
//!   flushed) only at segment ends: for these two the last, partial segment of a phase is closed
//!   with pg_switch_wal() when the load ends (in production archive_timeout does this for
//!   pgBackRest, typically a minute later; nothing does it for pg_receivewal), so the tail of
//!   their figures is favourable;
//! * CPU seconds of the archiver per GiB of WAL and peak RSS (pgBackRest: every archive-push
//!   process, through /usr/bin/time, and the asynchronous ones it detaches, reaped by this
//!   process as their subreaper; see `walvault_bench::Pgbackrest`. The SeaweedFS server's own
//!   CPU is not counted, as a cloud store's would not be);
//! * the load's duration (bulk) or pgbench TPS (OLTP), and their ratio to no archiver;
//! * stored bytes per byte of WAL.
//!
//! ## Part 2: commit-to-archive latency (the achieved RPO)
//! For each chunk interval, on a fresh cluster with walvault-agent archiving locally and pgbench
//! running at a steady `--latency-rate` TPS, a probe commits one row every 100 ms and notes its
//! xid and the instant COMMIT returned. Afterwards pg_waldump (not our WAL reader) finds each
//! probe's commit record; the commit is durable in the archive once the archived watermark
//! (pg_stat_replication.flush_lsn, sampled every 20 ms) reaches the start of the record after
//! it. Latency = that instant − COMMIT's return. `walvault-recover audit` over the same window
//! is shown beside it: what the archive's own metadata claims.
//!
//! Every figure is the median of `--runs` runs with min–max; ratios are ratios of medians from
//! this invocation. Timings on a shared 2-core machine are noisy: compare only within one run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio_postgres::SimpleQueryMessage;
use walvault_bench::{bin, median, mmm, percentile, proc_usage, KillOnDrop, Pgbackrest};
use walvault_shared::lsn::Lsn;
use walvault_shared::storage::ObjectStore;
use walvault_shared::wal::SegmentName;
use walvault_tests::pg::{chown_to_pg, pg_command, pg_program, PgCluster, PgOptions};
use walvault_tests::s3server::S3Server;

#[derive(Parser)]
struct Cli {
    /// pgbench -i scale of the bulk-load phase.
    #[arg(long, default_value_t = 100)]
    bulk_scale: u32,
    /// Seconds of pgbench OLTP (2 clients, full speed) after the bulk load.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// walvault's chunk interval in part 1.
    #[arg(long, default_value = "1s")]
    chunk_interval: String,
    /// Chunk intervals for part 2 (commit-to-archive latency).
    #[arg(long, value_delimiter = ',', default_value = "200ms,1s,5s")]
    latency_intervals: Vec<String>,
    /// Seconds of probing per latency run.
    #[arg(long, default_value_t = 20)]
    latency_seconds: u32,
    /// pgbench TPS (-R) running beside the probe in part 2.
    #[arg(long, default_value_t = 200)]
    latency_rate: u32,
    /// Only these archivers in part 1 (none, walvault, walvault-s3, pg_receivewal,
    /// pg_receivewal-sync, pgbackrest); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip part 2.
    #[arg(long)]
    no_latency: bool,
    /// Write the report here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq)]
enum Archiver {
    None,
    WalvaultLocal,
    WalvaultS3,
    PgReceivewal,
    PgReceivewalSync,
    Pgbackrest,
    /// walvault-agent → local dir, encrypting to an age recipient.
    WalvaultEncrypted,
}

const ARCHIVERS: [Archiver; 7] = [
    Archiver::None,
    Archiver::WalvaultLocal,
    Archiver::WalvaultS3,
    Archiver::PgReceivewal,
    Archiver::PgReceivewalSync,
    Archiver::Pgbackrest,
    Archiver::WalvaultEncrypted,
];

impl Archiver {
    fn key(self) -> &'static str {
        match self {
            Archiver::None => "none",
            Archiver::WalvaultLocal => "walvault",
            Archiver::WalvaultS3 => "walvault-s3",
            Archiver::PgReceivewal => "pg_receivewal",
            Archiver::PgReceivewalSync => "pg_receivewal-sync",
            Archiver::Pgbackrest => "pgbackrest",
            Archiver::WalvaultEncrypted => "walvault-enc",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Archiver::None => "no archiver",
            Archiver::WalvaultLocal => "walvault-agent → local dir",
            Archiver::WalvaultS3 => "walvault-agent → S3 (SeaweedFS)",
            Archiver::PgReceivewal => "pg_receivewal",
            Archiver::PgReceivewalSync => "pg_receivewal --synchronous",
            Archiver::Pgbackrest => "pgbackrest archive-push async",
            Archiver::WalvaultEncrypted => "walvault-agent → local dir, encrypted (age)",
        }
    }
}

/// One phase (bulk load or OLTP) of one run.
#[derive(Debug, Clone, Default)]
struct Phase {
    lag_s: Vec<f64>,
    lag_bytes: Vec<f64>,
    cpu_s: f64,
    wal_bytes: u64,
    stored_bytes: u64,
    peak_rss_kib: u64,
    /// Wall seconds of the workload.
    load_s: f64,
    /// pgbench TPS (OLTP only).
    tps: f64,
}

/// A running archiver.
struct Running {
    kind: Archiver,
    child: Option<Child>,
    guard: KillOnDrop,
    pgbr: Option<Pgbackrest>,
    local_dir: Option<PathBuf>,
    s3: Option<Arc<dyn ObjectStore>>,
    app: &'static str,
    seg_size: u64,
}

impl Running {
    async fn start(kind: Archiver, pg: &PgCluster, s3: Option<&S3Server>, chunk_interval: &str) -> Result<Self> {
        let seg_size = pg.wal_segment_size().await?;
        let mut r = Running {
            kind,
            child: None,
            guard: KillOnDrop(None),
            pgbr: None,
            local_dir: None,
            s3: None,
            app: match kind {
                Archiver::WalvaultLocal | Archiver::WalvaultS3 | Archiver::WalvaultEncrypted => "walvault",
                _ => "pg_receivewal",
            },
            seg_size,
        };
        let out_dir = pg.dir.join("archive");
        match kind {
            Archiver::None => {}
            Archiver::WalvaultLocal | Archiver::WalvaultS3 | Archiver::WalvaultEncrypted => {
                let mut c = Command::new(bin("walvault-agent")?);
                c.args([
                    "run",
                    "--pg-url",
                    &format!("{} application_name=walvault", pg.conn_str("postgres", "postgres")),
                ])
                .args(["--chunk-interval", chunk_interval, "--no-backups", "--listen", "127.0.0.1:0"]);
                if kind == Archiver::WalvaultEncrypted {
                    c.args(["--encrypt-recipient", &walvault_bench::age_recipient(&pg.dir)?]);
                }
                if kind == Archiver::WalvaultS3 {
                    let server = s3.context("no S3 server")?;
                    let bucket = server.new_bucket("bench").await?;
                    c.args(["--archive", &format!("s3://{bucket}/bench")]).args([
                        "--s3-endpoint",
                        &server.endpoint,
                        "--s3-force-path-style",
                    ]);
                    r.s3 = Some(Arc::new(
                        walvault_shared::storage::s3::S3Store::connect(&bucket, "bench", &server.options()).await?,
                    ));
                } else {
                    std::fs::create_dir_all(&out_dir)?;
                    c.args(["--archive", out_dir.to_str().unwrap()]);
                    r.local_dir = Some(out_dir);
                }
                let child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
                r.guard = KillOnDrop(Some(child.id()));
                r.child = Some(child);
            }
            Archiver::PgReceivewal | Archiver::PgReceivewalSync => {
                std::fs::create_dir_all(&out_dir)?;
                chown_to_pg(&out_dir)?;
                pg.execute("SELECT pg_create_physical_replication_slot('bench', true)").await?;
                let mut c = pg_command(&pg_program("pg_receivewal")?)?;
                c.args(["-D", out_dir.to_str().unwrap(), "-S", "bench", "-h", "127.0.0.1", "-n"])
                    .args(["-p", &pg.port.to_string(), "-U", "postgres"])
                    .env("PGAPPNAME", "pg_receivewal")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                if kind == Archiver::PgReceivewalSync {
                    c.arg("--synchronous");
                }
                let child = c.spawn()?;
                r.guard = KillOnDrop(Some(child.id()));
                r.child = Some(child);
                r.local_dir = Some(out_dir);
            }
            Archiver::Pgbackrest => {
                let b = Pgbackrest::new(pg)?;
                b.enable_archiving(pg).await?;
                r.local_dir = Some(b.repo.join("archive"));
                r.pgbr = Some(b);
            }
        }
        let app = r.app;
        if let Some(child) = r.child.as_mut() {
            // Wait until it streams.
            let client = pg.connect().await?;
            let t0 = Instant::now();
            loop {
                let rows = client
                    .simple_query(&format!(
                        "SELECT 1 FROM pg_stat_replication WHERE application_name = '{app}' AND state = 'streaming'"
                    ))
                    .await?;
                if rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))) {
                    break;
                }
                if let Some(st) = child.try_wait()? {
                    bail!("{} exited at start: {st}", kind.name());
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("{} did not start streaming", kind.name());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(r)
    }

    /// SQL returning the server's flush LSN and what tells the archiver's durable position.
    fn sample_sql(&self) -> String {
        let second = match self.kind {
            Archiver::None => "''".to_string(),
            Archiver::Pgbackrest => "coalesce((SELECT last_archived_wal FROM pg_stat_archiver), '')".to_string(),
            _ => format!(
                "coalesce((SELECT max(flush_lsn)::text FROM pg_stat_replication WHERE application_name = '{}'), '0/0')",
                self.app
            ),
        };
        format!("SELECT pg_current_wal_flush_lsn()::text, {second}")
    }

    /// The durable position from the second column of [`Self::sample_sql`] (None: unknown).
    fn durable(&self, text: &str) -> Option<u64> {
        match self.kind {
            Archiver::None => None,
            Archiver::Pgbackrest => {
                SegmentName::parse(text, self.seg_size).ok().map(|s| s.next().start_lsn(self.seg_size).0)
            }
            // Without --synchronous pg_receivewal fsyncs a segment when it completes it (and
            // renames it from .partial), and reports its flush position only every 10 s
            // (--status-interval): its durable position is the end of its last complete segment.
            Archiver::PgReceivewal => std::fs::read_dir(self.local_dir.as_ref()?)
                .ok()?
                .flatten()
                .filter_map(|e| SegmentName::parse(e.file_name().to_str()?, self.seg_size).ok())
                .map(|s| s.next().start_lsn(self.seg_size).0)
                .max(),
            _ => text.parse::<Lsn>().ok().map(|l| l.0),
        }
    }

    /// CPU seconds so far and peak RSS (KiB).
    fn usage(&self) -> Result<(f64, u64)> {
        if let Some(c) = &self.child {
            let (own, hwm) = proc_usage(c.id())?;
            return Ok((own, hwm));
        }
        if let Some(b) = &self.pgbr {
            return Ok(b.usage_so_far());
        }
        Ok((0.0, 0))
    }

    async fn stored(&self) -> Result<u64> {
        if let Some(s) = &self.s3 {
            return Ok(s.list_all("").await?.iter().map(|o| o.size).sum());
        }
        Ok(self.local_dir.as_deref().map(walvault_bench::dir_size).unwrap_or(0))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
            self.guard.disarm();
        }
    }
}

fn first_row(msgs: &[SimpleQueryMessage]) -> Option<&tokio_postgres::SimpleQueryRow> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })
}

/// Run pgbench as the PostgreSQL user; stdout.
fn pgbench(pg_sock: &std::path::Path, port: u16, args: &[&str]) -> Result<String> {
    let mut c = pg_command(&pg_program("pgbench")?)?;
    c.args(args).env("PGHOST", pg_sock).env("PGPORT", port.to_string()).env("PGUSER", "postgres");
    let o = c.output()?;
    if !o.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn tps_of(out: &str) -> f64 {
    out.lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Run `args` (pgbench) while sampling the archive lag; wait for the archiver to catch up.
async fn phase(pg: &PgCluster, r: &Running, args: Vec<String>) -> Result<Phase> {
    walvault_bench::settle();
    let client = pg.connect().await?;
    let start: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    let (cpu0, _) = r.usage()?;
    let stored0 = r.stored().await?;
    let (sock, port) = (pg.socket_dir.clone(), pg.port);
    let load = std::thread::spawn(move || -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = pgbench(&sock, port, &a)?;
        Ok((t0.elapsed().as_secs_f64(), tps_of(&out)))
    });
    let sql = r.sample_sql();
    let mut samples: Vec<(Instant, u64, Option<u64>)> = Vec::new();
    // When the load ended, and the server's flush LSN the archiver must then reach. (Not the
    // latest sample's: autovacuum and checkpoints keep writing a little WAL after the load,
    // which a segment-at-a-time archiver would only archive at the next segment switch.)
    let mut done: Option<(Instant, u64)> = None;
    let mut durable = Some(0);
    loop {
        let now = Instant::now();
        let rows = client.simple_query(&sql).await?;
        if let Some(row) = first_row(&rows) {
            let s: Lsn = row.get(0).unwrap_or("0/0").parse()?;
            // Keep the last known position when this sample tells none (a history file).
            durable = if r.kind == Archiver::None { None } else { r.durable(row.get(1).unwrap_or("")).or(durable) };
            samples.push((now, s.0, durable));
        }
        if let Some(b) = &r.pgbr {
            b.collect();
        }
        if done.is_none() && load.is_finished() {
            if matches!(r.kind, Archiver::Pgbackrest | Archiver::PgReceivewal) {
                client.simple_query("SELECT pg_switch_wal()").await?;
            }
            let target: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
            done = Some((now, target.0));
        }
        if let Some((d, target)) = done {
            if durable.is_none_or(|f| f >= target) {
                break;
            }
            if now - d > Duration::from_secs(300) {
                bail!("{} did not catch up within 300 s of the load's end", r.kind.name());
            }
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(now + Duration::from_millis(100))).await;
    }
    let (load_s, tps) = load.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    if let Some(b) = &r.pgbr {
        if !b.wait_idle(Duration::from_secs(60)).await {
            eprintln!("warning: pgbackrest processes still running after 60 s; their CPU counts in the next phase");
        }
    }
    let (cpu1, rss) = r.usage()?;
    let mut p = Phase {
        cpu_s: cpu1 - cpu0,
        wal_bytes: end.0 - start.0,
        stored_bytes: r.stored().await?.saturating_sub(stored0),
        peak_rss_kib: rss,
        load_s,
        tps,
        ..Default::default()
    };
    if r.kind != Archiver::None {
        for (i, &(t, s, _)) in samples.iter().enumerate() {
            let Some(f) = samples[i].2 else { continue };
            p.lag_bytes.push(s.saturating_sub(f) as f64);
            if let Some(&(t2, _, _)) = samples[i..].iter().find(|x| x.2.is_some_and(|f2| f2 >= s)) {
                p.lag_s.push((t2 - t).as_secs_f64());
            }
        }
    }
    Ok(p)
}

async fn one_run(a: Archiver, cli: &Cli, s3: Option<&S3Server>) -> Result<(Phase, Phase)> {
    let mut settings = vec!["max_wal_size = '4GB'".to_string()];
    if a == Archiver::Pgbackrest {
        settings.push("archive_mode = on".into());
    }
    let pg = PgCluster::start_new("bench", PgOptions { settings, ..Default::default() })?;
    let mut r = Running::start(a, &pg, s3, &cli.chunk_interval).await?;
    let bulk =
        phase(&pg, &r, vec!["-i".into(), "-s".into(), cli.bulk_scale.to_string(), "-q".into(), "postgres".into()])
            .await?;
    let oltp = phase(
        &pg,
        &r,
        vec!["-T".into(), cli.seconds.to_string(), "-c".into(), "2".into(), "-n".into(), "postgres".into()],
    )
    .await?;
    r.stop();
    Ok((bulk, oltp))
}

// ---- part 2 ----

#[derive(Default)]
struct LatencyRun {
    latencies: Vec<f64>,
    audit_p99: f64,
    audit_max: f64,
}

/// (record start LSN, xid, is a commit) of every record pg_waldump prints in `start..end`.
fn waldump_records(pg: &PgCluster, start: Lsn, end: Lsn) -> Result<Vec<(u64, u32, bool)>> {
    let o = pg.run_program(
        "pg_waldump",
        &["-p", pg.data.join("pg_wal").to_str().unwrap(), "-s", &start.to_string(), "-e", &end.to_string()],
    )?;
    parse_waldump(&String::from_utf8_lossy(&o.stdout))
}

/// (record start LSN, xid, is a commit) of each record line of pg_waldump's output.
fn parse_waldump(text: &str) -> Result<Vec<(u64, u32, bool)>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let field = |name: &str| {
            line.split_once(name).and_then(|(_, rest)| rest.split_whitespace().next()).map(|v| v.trim_end_matches(','))
        };
        let (Some(tx), Some(lsn)) = (field("tx:"), field("lsn:")) else { continue };
        let commit = line.contains("rmgr: Transaction") && line.contains("desc: COMMIT");
        out.push((lsn.parse::<Lsn>()?.0, tx.parse::<u32>()?, commit));
    }
    Ok(out)
}

async fn latency_run(interval: &str, cli: &Cli) -> Result<LatencyRun> {
    let pg = PgCluster::start_new(
        "bench-latency",
        PgOptions {
            settings: vec!["max_wal_size = '4GB'".into(), "checkpoint_timeout = '30min'".into()],
            ..Default::default()
        },
    )?;
    let archive_dir = pg.dir.join("archive");
    let archive = format!("file://{}", archive_dir.display());
    let mut agent = Command::new(bin("walvault-agent")?)
        .args(["run", "--pg-url", &format!("{} application_name=walvault", pg.conn_str("postgres", "postgres"))])
        .args(["--archive", &archive, "--chunk-interval", interval, "--no-backups", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut guard = KillOnDrop(Some(agent.id()));
    pgbench(&pg.socket_dir, pg.port, &["-i", "-s", "10", "-q", "postgres"])?;
    pg.execute("CREATE TABLE probe (n int)").await?;
    let flushed_sql =
        "SELECT pg_current_wal_flush_lsn()::text, coalesce((SELECT max(flush_lsn)::text FROM pg_stat_replication WHERE application_name = 'walvault'), '0/0')";
    let client = pg.connect().await?;
    // Caught up before measuring.
    let t0 = Instant::now();
    loop {
        let rows = client.simple_query(flushed_sql).await?;
        let row = first_row(&rows).context("no row")?;
        if row.get(1).unwrap_or("0/0").parse::<Lsn>()? >= row.get(0).unwrap_or("0/0").parse::<Lsn>()? {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("walvault-agent did not catch up after the load");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    let since = chrono::Utc::now();
    // Sampler: (instant, archived watermark) every 20 ms, on its own connection.
    let sampler_client = pg.connect().await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut v: Vec<(Instant, u64)> = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let next = Instant::now() + Duration::from_millis(20);
            let rows = sampler_client.simple_query(flushed_sql).await?;
            if let Some(row) = first_row(&rows) {
                v.push((Instant::now(), row.get(1).unwrap_or("0/0").parse::<Lsn>()?.0));
            }
            tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        }
        anyhow::Ok(v)
    });
    let (sock, port, secs, rate) = (pg.socket_dir.clone(), pg.port, cli.latency_seconds, cli.latency_rate);
    let load = std::thread::spawn(move || {
        pgbench(&sock, port, &["-T", &secs.to_string(), "-R", &rate.to_string(), "-c", "2", "-n", "postgres"])
    });
    let mut probes: Vec<(u32, Instant)> = Vec::new();
    let mut n = 0;
    while !load.is_finished() {
        let next = Instant::now() + Duration::from_millis(100);
        n += 1;
        let rows = client
            .simple_query(&format!("INSERT INTO probe VALUES ({n}) RETURNING pg_current_xact_id()::text"))
            .await?;
        let done = Instant::now();
        let xid: u64 = first_row(&rows).and_then(|r| r.get(0)).context("xid")?.parse()?;
        probes.push((xid as u32, done));
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
    }
    load.join().map_err(|_| anyhow::anyhow!("pgbench thread panicked"))??;
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    let until = chrono::Utc::now();
    // Wait until the archive has all of it, plus one more sample.
    let t0 = Instant::now();
    loop {
        let rows = client.simple_query(flushed_sql).await?;
        if first_row(&rows).and_then(|r| r.get(1)).unwrap_or("0/0").parse::<Lsn>()? >= end {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("walvault-agent did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await??;
    // SAFETY: kill(2) on our child, not yet reaped.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    guard.disarm();
    // Each probe's commit record, and where the next record starts (the commit's end).
    let recs = waldump_records(&pg, start, end)?;
    let mut out = LatencyRun::default();
    for (xid, done) in &probes {
        let Some(i) = recs.iter().position(|r| r.2 && r.1 == *xid) else {
            bail!("pg_waldump shows no commit for probe xid {xid}");
        };
        let commit_end = recs.get(i + 1).map(|r| r.0).unwrap_or(end.0);
        let Some(&(t, _)) = samples.iter().find(|(t, w)| *w >= commit_end && t >= done) else {
            bail!("probe xid {xid} never seen archived");
        };
        out.latencies.push((t - *done).as_secs_f64());
    }
    // What the archive's own metadata says about the same window.
    let o = Command::new(bin("walvault-recover")?)
        .args([
            "audit",
            "--archive",
            &archive,
            "--json",
            "--since",
            &since.to_rfc3339(),
            "--until",
            &until.to_rfc3339(),
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("audit output: {}", String::from_utf8_lossy(&o.stderr)))?;
    out.audit_p99 = v["p99_rpo_s"].as_f64().unwrap_or(f64::NAN);
    out.audit_max = v["max_rpo_s"].as_f64().unwrap_or(f64::NAN);
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    walvault_bench::become_subreaper()?;
    let agent = bin("walvault-agent")?;
    let s3 = S3Server::start().await?;
    let mut results: Vec<Vec<(Phase, Phase)>> = vec![Vec::new(); ARCHIVERS.len()];
    let t_all = Instant::now();
    for run in 0..cli.runs {
        for (i, &a) in ARCHIVERS.iter().enumerate() {
            if !cli.only.is_empty() && !cli.only.iter().any(|k| k == a.key()) {
                continue;
            }
            eprintln!("[{:>4.0} s] run {}/{}: {} …", t_all.elapsed().as_secs_f64(), run + 1, cli.runs, a.name());
            results[i].push(one_run(a, &cli, Some(&s3)).await.with_context(|| a.name())?);
            // Stopped servers are our zombies now (see become_subreaper).
            walvault_bench::reap_orphans(&["postgres"]);
        }
    }
    let mut latency: Vec<Vec<LatencyRun>> = cli.latency_intervals.iter().map(|_| Vec::new()).collect();
    for run in 0..if cli.no_latency { 0 } else { cli.runs } {
        for (i, iv) in cli.latency_intervals.iter().enumerate() {
            eprintln!(
                "[{:>4.0} s] latency run {}/{}: chunk interval {iv} …",
                t_all.elapsed().as_secs_f64(),
                run + 1,
                cli.runs
            );
            latency[i].push(latency_run(iv, &cli).await?);
            walvault_bench::reap_orphans(&["postgres"]);
        }
    }
    drop(s3);

    let mut report = String::new();
    use std::fmt::Write;
    let gib = (1u64 << 30) as f64;
    let mib = (1u64 << 20) as f64;
    writeln!(report, "## 1. WAL archiving under load\n")?;
    writeln!(
        report,
        "date: {}; {} cores; agent: {}; walvault chunk_interval {}; medians (min–max) of {} runs; {:.0} s in all\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%MZ"),
        std::thread::available_parallelism()?.get(),
        agent.display(),
        cli.chunk_interval,
        cli.runs,
        t_all.elapsed().as_secs_f64()
    )?;
    for (pi, title) in [
        (0, format!("Bulk load: `pgbench -i -s {}`", cli.bulk_scale)),
        (1, format!("OLTP: `pgbench -T {} -c 2` (full speed)", cli.seconds)),
    ] {
        let ph = |i: usize| -> Vec<&Phase> { results[i].iter().map(|(b, o)| if pi == 0 { b } else { o }).collect() };
        let all: Vec<&Phase> = (0..ARCHIVERS.len()).flat_map(ph).collect();
        let wal = median(&all.iter().map(|p| p.wal_bytes as f64 / mib).collect::<Vec<_>>());
        writeln!(report, "### {title}: about {wal:.0} MiB of WAL per run\n")?;
        let last = if pi == 0 { "load s" } else { "pgbench TPS" };
        writeln!(report, "| archiver | lag p50 s | lag p99 s | lag max s | lag p50 MiB | lag p99 MiB | lag max MiB | CPU s / GiB WAL | peak RSS MiB | stored / WAL | {last} | {last} vs none |")?;
        writeln!(report, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        let base = median(&ph(0).iter().map(|p| if pi == 0 { p.load_s } else { p.tps }).collect::<Vec<_>>());
        let mut med = Vec::new();
        for (i, &a) in ARCHIVERS.iter().enumerate() {
            let ps = ph(i);
            if ps.is_empty() {
                med.push(vec![f64::NAN; 10]);
                continue;
            }
            let col = |f: &dyn Fn(&Phase) -> f64| ps.iter().map(|p| f(p)).collect::<Vec<f64>>();
            let speed = col(&|p| if pi == 0 { p.load_s } else { p.tps });
            let cells = [
                col(&|p| percentile(&p.lag_s, 50.0)),
                col(&|p| percentile(&p.lag_s, 99.0)),
                col(&|p| percentile(&p.lag_s, 100.0)),
                col(&|p| percentile(&p.lag_bytes, 99.0) / mib),
                col(&|p| percentile(&p.lag_bytes, 100.0) / mib),
                col(&|p| if a == Archiver::None { f64::NAN } else { p.cpu_s / (p.wal_bytes as f64 / gib) }),
                col(&|p| if a == Archiver::None { f64::NAN } else { p.peak_rss_kib as f64 / 1024.0 }),
                col(&|p| if a == Archiver::None { f64::NAN } else { p.stored_bytes as f64 / p.wal_bytes as f64 }),
                col(&|p| percentile(&p.lag_bytes, 50.0) / mib),
            ];
            writeln!(
                report,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
                a.name(),
                mmm(&cells[0], 2),
                mmm(&cells[1], 2),
                mmm(&cells[2], 2),
                mmm(&cells[8], 1),
                mmm(&cells[3], 1),
                mmm(&cells[4], 1),
                mmm(&cells[5], 2),
                mmm(&cells[6], 0),
                mmm(&cells[7], 3),
                mmm(&speed, if pi == 0 { 1 } else { 0 }),
                median(&speed) / base
            )?;
            med.push(cells.iter().map(|c| median(c)).chain([median(&speed)]).collect::<Vec<f64>>());
        }
        writeln!(report)?;
        let w = &med[1];
        for (j, name) in
            [(2, "walvault → S3"), (3, "pg_receivewal"), (4, "pg_receivewal --synchronous"), (5, "pgbackrest async")]
        {
            let o = &med[j];
            if w[0].is_nan() || o.iter().all(|x| x.is_nan()) {
                continue;
            }
            let speed = if pi == 0 { "load time" } else { "TPS" };
            writeln!(
                report,
                "- ratio walvault → local / {name}: lag p99 {:.2}, lag max {:.2}, CPU per GiB {:.2}, peak RSS {:.2}, stored {:.2}, {speed} {:.2}",
                w[1] / o[1],
                w[2] / o[2],
                w[5] / o[5],
                w[6] / o[6],
                w[7] / o[7],
                w[9] / o[9]
            )?;
        }
        let e = &med[6];
        if !w[5].is_nan() && !e[5].is_nan() {
            writeln!(
                report,
                "- ratio walvault → local encrypted / unencrypted: CPU per GiB {:.2}, peak RSS {:.2}, stored {:.2}, lag p99 {:.2}",
                e[5] / w[5],
                e[6] / w[6],
                e[7] / w[7],
                e[1] / w[1]
            )?;
        }
        writeln!(report)?;
    }
    writeln!(report, "## 2. Commit-to-archive latency (achieved RPO), walvault-agent → local dir\n")?;
    writeln!(
        report,
        "pgbench -R {} -c 2 for {} s beside a probe committing every 100 ms; latency = COMMIT returned → archived watermark past the commit record (found by pg_waldump), sampled every 20 ms. `audit` = what `walvault-recover audit` reports for the same window from the archive's metadata. Medians (min–max) of {} runs.\n",
        cli.latency_rate, cli.latency_seconds, cli.runs
    )?;
    writeln!(
        report,
        "| chunk interval | probes per run | latency p50 s | p99 s | max s | audit p99 s | audit max s |"
    )?;
    writeln!(report, "|---|---:|---:|---:|---:|---:|---:|")?;
    for (i, iv) in cli.latency_intervals.iter().enumerate() {
        let l = &latency[i];
        let col = |f: &dyn Fn(&LatencyRun) -> f64| l.iter().map(f).collect::<Vec<f64>>();
        writeln!(
            report,
            "| {iv} | {} | {} | {} | {} | {} | {} |",
            mmm(&col(&|x| x.latencies.len() as f64), 0),
            mmm(&col(&|x| percentile(&x.latencies, 50.0)), 2),
            mmm(&col(&|x| percentile(&x.latencies, 99.0)), 2),
            mmm(&col(&|x| percentile(&x.latencies, 100.0)), 2),
            mmm(&col(&|x| x.audit_p99), 2),
            mmm(&col(&|x| x.audit_max), 2),
        )?;
    }
    print!("{report}");
    if let Some(p) = cli.out {
        std::fs::write(p, &report)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waldump_lines() {
        let text = "rmgr: Heap        len (rec/tot):     54/   150, tx:        735, lsn: 0/0153A340, prev 0/0153A308, desc: INSERT off 3 flags 0x00, blkref #0: rel 1663/5/16384 blk 0 FPW\n\
rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/0153A3D8, prev 0/0153A340, desc: COMMIT 2026-11-26 17:00:00.123456 UTC\n\
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/0153A400, prev 0/0153A3D8, desc: RUNNING_XACTS nextXid 736\n\
rmgr: Transaction len (rec/tot):     34/    34, tx:        736, lsn: 0/0153A438, prev 0/0153A400, desc: ABORT 2026-11-26 17:00:00.2 UTC\n\
pg_waldump: error: error in WAL record at 0/0153A460: invalid record length\n";
        let r = parse_waldump(text).unwrap();
        assert_eq!(
            r,
            vec![(0x0153A340, 735, false), (0x0153A3D8, 735, true), (0x0153A400, 0, false), (0x0153A438, 736, false)]
        );
    }
}
