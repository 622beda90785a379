//! `walvault-bench-backup`: base backup, restore and WAL replay, side by side in one run.
//!
//! One PostgreSQL 15 cluster is filled once by `pgbench -i -s SCALE`; walvault-agent streams its
//! WAL into a local archive and pgBackRest archives it too (archive-push, async, zstd, posix
//! repository). Then, `--runs` times each, interleaved:
//! 1. base backup: `walvault-agent backup` vs `pg_basebackup -Ft -Z client-zstd -X none` vs
//!    `pgbackrest backup --type=full` (zst, process-max 1 and 2): seconds, MiB/s of database,
//!    CPU seconds (of the process and what it reaped), peak RSS, stored size;
//! 2. (once) pgbench writes `--wal-mib` of WAL after the backups;
//! 3. restore: `walvault-recover restore --latest` vs `pgbackrest restore` (process-max 2):
//!    MiB/s of database (the files only; no server started);
//! 4. replay of that WAL by PostgreSQL, from start to the end of recovery (promotion): through
//!    `walvault-recover wal-fetch` with prefetch 4 and without, through `pgbackrest archive-get`
//!    (async, process-max 2), and with the WAL already in pg_wal (the physical limit); and
//!    through `wal-fetch` with prefetch 4 from SeaweedFS (S3 on 127.0.0.1), holding a copy of
//!    the walvault archive made with `walvault-agent copy --once` before the replays. Each
//!    replays from its own tool's newest backup, taken minutes apart with nothing but the other
//!    backups between them, so the WAL replayed differs by a few mostly empty segments.
//!
//! Each figure is the median (min–max) of the runs; ratios are ratios of medians from this run.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use walvault_bench::{bin, dir_size, measured, median, mmm, reap_orphans, KillOnDrop, Pgbackrest, Usage};
use walvault_shared::lsn::Lsn;
use walvault_tests::pg::{chown_to_pg, pg_command, pg_program, PgCluster, PgOptions};
use walvault_tests::s3server::S3Server;

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value_t = 300)]
    scale: u32,
    /// WAL to generate after the backups for the replay measurement (MiB).
    #[arg(long, default_value_t = 1024)]
    wal_mib: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

const MIB: f64 = (1u64 << 20) as f64;

#[derive(Default)]
struct Results {
    /// (usage, stored MiB) per tool, per run.
    backup: [Vec<(Usage, f64)>; 5],
    restore_wv: Vec<f64>,
    restore_pgbr: Vec<f64>,
    /// prefetch, no prefetch, pgbackrest archive-get, pg_wal, prefetch from S3
    replay: [Vec<f64>; 5],
}

const BACKUPS: [&str; 5] = [
    "walvault-agent backup (zstd 3, 2 parts in parallel)",
    "pg_basebackup -Ft -Z client-zstd -X none",
    "pgbackrest backup --type=full zst, process-max 1",
    "pgbackrest backup --type=full zst, process-max 2",
    "walvault-agent backup, encrypted (age)",
];

/// Start the restored cluster in `dir`/data and time it until recovery ends.
async fn time_recovery(dir: PathBuf) -> Result<f64> {
    let data = dir.join("data");
    // The source's archive_command (pgBackRest) must not run on the restored server.
    let pg = PgCluster::from_data_dir("bench-replay", dir, data, vec!["archive_mode = off".into()])?;
    walvault_bench::settle();
    let t0 = Instant::now();
    pg.start()?;
    loop {
        if let Ok(r) = pg.query_one_text("SELECT pg_is_in_recovery()").await {
            if r == "f" {
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("replay did not finish");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        reap_orphans(&["pgbackrest"]);
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// walvault restore --latest, then replay through wal-fetch (or with every segment copied into
/// pg_wal first and no restore_command).
/// `s3_args`: the S3 options of an `s3://` archive (they go into the restore_command too; the
/// server inherits the AWS_* credentials of this process).
async fn replay_walvault(archive: &str, s3_args: &[&str], prefetch: u32, local_wal: bool) -> Result<f64> {
    let dir = PgCluster::fresh_dir("bench-replay")?;
    let data = dir.join("data");
    let out = Command::new(bin("walvault-recover")?)
        .args(["restore", "--archive", archive, "--pgdata", data.to_str().unwrap(), "--latest"])
        .args(["--owner", &PgCluster::pg_user_name(), "--prefetch", &prefetch.to_string()])
        .args(s3_args)
        .output()?;
    if !out.status.success() {
        bail!("restore failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    if local_wal {
        let store = walvault_shared::storage::open_existing(archive, &Default::default()).await?;
        let reader = walvault_shared::archive::read::Reader::new(store.clone(), None);
        let id = walvault_shared::archive::identity::load_existing(&reader).await?;
        let cat = reader.wal_listing(id.wal_segment_size).await?.catalog;
        let recover = bin("walvault-recover")?;
        for (tli, t) in &cat.timelines {
            for s in &t.segments {
                let name = walvault_shared::wal::SegmentName::new(*tli, *s).file_name(id.wal_segment_size);
                let dest = data.join("pg_wal").join(&name);
                let o = Command::new(&recover)
                    .args(["wal-fetch", "--prefetch", "0", "--archive", archive, &name])
                    .arg(&dest)
                    .output()?;
                if !o.status.success() {
                    bail!("wal-fetch {name}: {}", String::from_utf8_lossy(&o.stderr));
                }
                chown_to_pg(&dest)?;
            }
        }
        let auto = data.join("postgresql.auto.conf");
        let s = std::fs::read_to_string(&auto)?;
        let s: String = s.lines().filter(|l| !l.starts_with("restore_command")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&auto, format!("{s}restore_command = '/bin/false'\n"))?;
    }
    time_recovery(dir).await
}

/// A fresh, empty restore target for pgBackRest (owned by the PostgreSQL user, 0700).
fn pgbr_target() -> Result<PathBuf> {
    let dir = PgCluster::fresh_dir("bench-pgbr-restore")?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    chown_to_pg(&data)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

async fn archived_lsn(pg: &PgCluster) -> Result<(Lsn, Lsn)> {
    let w: Lsn = pg
        .query_one_text("SELECT coalesce((SELECT max(flush_lsn)::text FROM pg_stat_replication WHERE application_name = 'walvault'), '0/0')")
        .await?
        .parse()?;
    let seg = pg.wal_segment_size().await?;
    let last = pg.query_one_text("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").await?;
    let p = walvault_shared::wal::SegmentName::parse(&last, seg).map(|s| s.next().start_lsn(seg)).unwrap_or(Lsn(0));
    Ok((w, p))
}

async fn run(cli: &Cli) -> Result<(Results, f64, f64, String)> {
    let pg = PgCluster::start_new(
        "bench-backup",
        PgOptions {
            settings: vec![
                "max_wal_size = '8GB'".into(),
                "checkpoint_timeout = '30min'".into(),
                "archive_mode = on".into(),
                // Until pgBackRest is set up (after the bulk load).
                "archive_command = '/bin/true'".into(),
            ],
            ..Default::default()
        },
    )?;
    let t_load = Instant::now();
    pg.run_program("pgbench", &["-i", "-s", &cli.scale.to_string(), "-q", "postgres"])?;
    pg.execute("CHECKPOINT").await?;
    eprintln!("[bulk load of scale {} took {:.0} s]", cli.scale, t_load.elapsed().as_secs_f64());
    let db_bytes: u64 = pg.query_one_text("SELECT sum(pg_database_size(oid)) FROM pg_database").await?.parse()?;
    let db_mib = db_bytes as f64 / MIB;
    let adir = PgCluster::fresh_dir("bench-archive")?;
    let archive = walvault_bench::shared_archive(&adir)?;
    let agent_bin = bin("walvault-agent")?;
    let mut agent = Command::new(&agent_bin)
        .args(["run", "--pg-url", &format!("{} application_name=walvault", pg.conn_str("postgres", "postgres"))])
        .args(["--archive", &archive, "--no-backups", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut guard = KillOnDrop(Some(agent.id()));
    // A second, encrypted archive, streamed by a second agent on its own slot.
    let edir = PgCluster::fresh_dir("bench-archive-enc")?;
    let earchive = walvault_bench::shared_archive(&edir)?;
    let recipient = walvault_bench::age_recipient(&edir)?;
    let mut eagent = Command::new(&agent_bin)
        .args(["run", "--pg-url", &format!("{} application_name=walvault-enc", pg.conn_str("postgres", "postgres"))])
        .args(["--archive", &earchive, "--no-backups", "--listen", "127.0.0.1:0", "--slot", "walvault_enc"])
        .args(["--encrypt-recipient", &recipient])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut eguard = KillOnDrop(Some(eagent.id()));
    let pgbr = Pgbackrest::new(&pg)?;
    pgbr.enable_archiving(&pg).await?;
    let mut res = Results::default();
    for i in 0..cli.runs {
        eprintln!("backups, run {}/{} …", i + 1, cli.runs);
        let before = dir_size(&adir.join("repo/backups"));
        let mut c = Command::new(&agent_bin);
        c.args(["backup", "--pg-url", &pg.url(), "--archive", &archive]);
        let u = measured(c)?;
        res.backup[0].push((u, (dir_size(&adir.join("repo/backups")) - before) as f64 / MIB));

        let before = dir_size(&edir.join("repo/backups"));
        let mut c = Command::new(&agent_bin);
        c.args(["backup", "--pg-url", &pg.url(), "--archive", &earchive, "--encrypt-recipient", &recipient]);
        let u = measured(c)?;
        res.backup[4].push((u, (dir_size(&edir.join("repo/backups")) - before) as f64 / MIB));

        let bdir = PgCluster::fresh_dir("bench-pgbasebackup")?;
        let mut c = pg_command(&pg_program("pg_basebackup")?)?;
        c.args(["-D", bdir.join("b").to_str().unwrap(), "-Ft", "-Z", "client-zstd", "-X", "none", "-c", "fast"])
            .args(["--no-sync", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres"]);
        let u = measured(c)?;
        res.backup[1].push((u, dir_size(&bdir) as f64 / MIB));
        std::fs::remove_dir_all(&bdir)?;

        for (k, pmax) in [(2, "1"), (3, "2")] {
            let before = dir_size(&pgbr.repo.join("backup"));
            let u = measured(pgbr.command(&["--type=full", &format!("--process-max={pmax}"), "backup"])?)?;
            reap_orphans(&["pgbackrest", "postgres"]);
            res.backup[k].push((u, (dir_size(&pgbr.repo.join("backup")) - before) as f64 / MIB));
        }
    }
    // The encrypted archive is done with: its agent and slot go, so they do not weigh on what
    // follows.
    // SAFETY: kill(2) on our child, not yet reaped.
    unsafe { libc::kill(eagent.id() as i32, libc::SIGTERM) };
    let _ = eagent.wait();
    eguard.disarm();
    pg.execute("SELECT pg_drop_replication_slot('walvault_enc')").await?;
    // WAL after the backups, for the replay measurement.
    let start: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    while pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse::<Lsn>()?.0
        < start.0 + (cli.wal_mib << 20)
    {
        pg.run_program("pgbench", &["-T", "5", "-c", "2", "-n", "postgres"])?;
        reap_orphans(&["pgbackrest"]);
    }
    pg.execute("SELECT pg_switch_wal()").await?;
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    let wal_mib = (end.0 - start.0) as f64 / MIB;
    let t0 = Instant::now();
    loop {
        let (w, p) = archived_lsn(&pg).await?;
        if w >= end && p >= end {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("WAL up to {end} not archived by both after 600 s (walvault {w}, pgbackrest {p})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        reap_orphans(&["pgbackrest"]);
    }
    pg.stop("fast")?;
    // SAFETY: kill(2) on our child, not yet reaped.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    guard.disarm();
    pgbr.wait_idle(Duration::from_secs(60)).await;
    let versions = format!(
        "{}; {}",
        String::from_utf8_lossy(&Command::new(&agent_bin).arg("--version").output()?.stdout).trim(),
        String::from_utf8_lossy(&Command::new("/usr/bin/pgbackrest").arg("version").output()?.stdout).trim()
    );

    for i in 0..cli.runs {
        eprintln!("restores, run {}/{} …", i + 1, cli.runs);
        let rdir = PgCluster::fresh_dir("bench-restore")?;
        walvault_bench::settle();
        let t0 = Instant::now();
        let out = Command::new(bin("walvault-recover")?)
            .args(["restore", "--archive", &archive, "--pgdata", rdir.join("data").to_str().unwrap(), "--latest"])
            .args(["--owner", &PgCluster::pg_user_name()])
            .output()?;
        if !out.status.success() {
            bail!("restore: {}", String::from_utf8_lossy(&out.stderr));
        }
        res.restore_wv.push(t0.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&rdir)?;

        let t = pgbr_target()?;
        let pg1 = format!("--pg1-path={}", t.join("data").display());
        let u = measured(pgbr.command(&[&pg1, "--process-max=2", "restore"])?)?;
        res.restore_pgbr.push(u.wall_s);
        std::fs::remove_dir_all(&t)?;
    }
    // The same archive in SeaweedFS, for replay through wal-fetch from S3.
    let s3 = S3Server::start().await?;
    walvault_tests::s3server::set_credentials_env();
    let s3_archive = format!("s3://{}/bench", s3.new_bucket("replay").await?);
    let s3_args = ["--s3-endpoint", s3.endpoint.as_str(), "--s3-force-path-style"];
    let out = Command::new(&agent_bin)
        .args(["copy", "--once", "--from", &archive, "--to", &s3_archive])
        .args(["--to-s3-endpoint", &s3.endpoint, "--to-s3-force-path-style"])
        .output()?;
    if !out.status.success() {
        bail!("copy to SeaweedFS: {}", String::from_utf8_lossy(&out.stderr));
    }
    for i in 0..cli.runs {
        eprintln!("replays, run {}/{} …", i + 1, cli.runs);
        res.replay[0].push(replay_walvault(&archive, &[], 4, false).await?);
        res.replay[4].push(replay_walvault(&s3_archive, &s3_args, 4, false).await?);
        res.replay[1].push(replay_walvault(&archive, &[], 0, false).await?);
        let t = pgbr_target()?;
        let pg1 = format!("--pg1-path={}", t.join("data").display());
        pgbr.run(&[&pg1, "--process-max=2", "restore"])?;
        res.replay[2].push(time_recovery(t).await?);
        res.replay[3].push(replay_walvault(&archive, &[], 0, true).await?);
        reap_orphans(&["pgbackrest", "postgres"]);
    }
    let _ = std::fs::remove_dir_all(&adir);
    Ok((res, db_mib, wal_mib, versions))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    walvault_bench::become_subreaper()?;
    let t_all = Instant::now();
    let (r, db, wal_mib, versions) = run(&cli).await.context("backup benchmark")?;
    let mut s = String::new();
    use std::fmt::Write;
    writeln!(s, "## 3. Base backup, restore and replay\n")?;
    writeln!(
        s,
        "date: {}; {} cores; {versions}; pgbench scale {} ({db:.0} MiB database); {wal_mib:.0} MiB of WAL replayed; medians (min–max) of {} runs; {:.0} s in all\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%MZ"),
        std::thread::available_parallelism()?.get(),
        cli.scale,
        cli.runs,
        t_all.elapsed().as_secs_f64()
    )?;
    writeln!(s, "| backup | seconds | MiB/s of database | CPU s | peak RSS MiB | stored MiB |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|")?;
    let col = |k: usize, f: &dyn Fn(&(Usage, f64)) -> f64| r.backup[k].iter().map(f).collect::<Vec<f64>>();
    for (k, name) in BACKUPS.iter().enumerate() {
        writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} |",
            mmm(&col(k, &|x| x.0.wall_s), 1),
            mmm(&col(k, &|x| db / x.0.wall_s), 0),
            mmm(&col(k, &|x| x.0.cpu_s), 1),
            mmm(&col(k, &|x| x.0.peak_rss_mib), 0),
            mmm(&col(k, &|x| x.1), 0),
        )?;
    }
    writeln!(s)?;
    let m = |k: usize, f: &dyn Fn(&(Usage, f64)) -> f64| median(&col(k, f));
    writeln!(
        s,
        "- ratio walvault encrypted / unencrypted: time {:.2}, CPU {:.2}, peak RSS {:.2}, stored {:.2}",
        m(4, &|x| x.0.wall_s) / m(0, &|x| x.0.wall_s),
        m(4, &|x| x.0.cpu_s) / m(0, &|x| x.0.cpu_s),
        m(4, &|x| x.0.peak_rss_mib) / m(0, &|x| x.0.peak_rss_mib),
        m(4, &|x| x.1) / m(0, &|x| x.1),
    )?;
    for (k, name) in [(1, "pg_basebackup"), (2, "pgbackrest process-max 1"), (3, "pgbackrest process-max 2")] {
        writeln!(
            s,
            "- ratio walvault / {name}: time {:.2}, CPU {:.2}, peak RSS {:.1}, stored {:.2}",
            m(0, &|x| x.0.wall_s) / m(k, &|x| x.0.wall_s),
            m(0, &|x| x.0.cpu_s) / m(k, &|x| x.0.cpu_s),
            m(0, &|x| x.0.peak_rss_mib) / m(k, &|x| x.0.peak_rss_mib),
            m(0, &|x| x.1) / m(k, &|x| x.1),
        )?;
    }
    writeln!(s, "\n| restore (files only) | seconds | MiB/s of database |")?;
    writeln!(s, "|---|---:|---:|")?;
    let speed = |v: &[f64]| v.iter().map(|w| db / w).collect::<Vec<f64>>();
    writeln!(
        s,
        "| walvault-recover restore --latest (local archive, 4 parts in parallel) | {} | {} |",
        mmm(&r.restore_wv, 1),
        mmm(&speed(&r.restore_wv), 0)
    )?;
    writeln!(
        s,
        "| pgbackrest restore (process-max 2) | {} | {} |",
        mmm(&r.restore_pgbr, 1),
        mmm(&speed(&r.restore_pgbr), 0)
    )?;
    writeln!(
        s,
        "\n- ratio walvault / pgbackrest restore time: {:.2}",
        median(&r.restore_wv) / median(&r.restore_pgbr)
    )?;
    writeln!(
        s,
        "\n| replay of {wal_mib:.0} MiB of WAL after the backup | seconds | ratio to pg_wal | ratio to pgbackrest |"
    )?;
    writeln!(s, "|---|---:|---:|---:|")?;
    let (local, pgbr) = (median(&r.replay[3]), median(&r.replay[2]));
    for (k, name) in [
        (0, "walvault-recover wal-fetch, prefetch 4"),
        (4, "walvault-recover wal-fetch from SeaweedFS (S3), prefetch 4"),
        (1, "walvault-recover wal-fetch, no prefetch"),
        (2, "pgbackrest archive-get, async, process-max 2"),
        (3, "WAL already in pg_wal (no restore_command)"),
    ] {
        let v = median(&r.replay[k]);
        writeln!(s, "| {name} | {} | {:.2} | {:.2} |", mmm(&r.replay[k], 1), v / local, v / pgbr)?;
    }
    print!("{s}");
    if let Some(p) = &cli.out {
        std::fs::write(p, &s)?;
    }
    Ok(())
}
