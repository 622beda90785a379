//! `walvault-bench-backup`: base backup, restore and WAL replay, side by side in one run.
//!
//! On one PostgreSQL 15 cluster filled by `pgbench -i -s SCALE`, with walvault-agent streaming
//! into a local archive:
//! 1. base backup: `walvault-agent backup` vs `pg_basebackup -Ft -Z zstd` (client-side zstd, no
//!    WAL) vs `pgbackrest backup --type=full` (zst, process-max 1 and 2; when pgbackrest is
//!    installed): MB/s of database, CPU seconds, peak RSS, stored size;
//! 2. pgbench writes `--wal-mib` of WAL after the backup;
//! 3. restore: `walvault-recover restore --latest` vs `pgbackrest restore` (process-max 2): MB/s
//!    (database bytes / wall time);
//! 4. replay of that WAL by PostgreSQL: through wal-fetch with prefetch, without prefetch, and
//!    with the WAL already in pg_wal (the physical limit): seconds from start to promotion.
//!
//! Each figure is the median of `--runs` runs; ratios are computed within this run only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use walvault_tests::agent::Agent;
use walvault_tests::pg::{pg_command, pg_program, PgCluster, PgOptions};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value_t = 50)]
    scale: u32,
    /// WAL to generate after the backup for the replay measurement (MiB).
    #[arg(long, default_value_t = 512)]
    wal_mib: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe.parent().and_then(|p| p.parent()).context("exe dir")?;
    for profile in ["release", "debug"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not built")
}

/// Run a command, returning (wall seconds, child CPU seconds, peak RSS MiB).
fn measured(mut c: Command) -> Result<(f64, f64, f64)> {
    let t0 = Instant::now();
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id() as i32;
    let mut status = 0i32;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, filling our rusage struct.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r < 0 {
        bail!("wait4 failed");
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("command failed: {err}");
    }
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    Ok((wall, cpu, ru.ru_maxrss as f64 / 1024.0))
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if let Ok(md) = e.metadata() {
                n += if md.is_dir() { dir_size(&e.path()) } else { md.len() };
            }
        }
    }
    n
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Default, Clone)]
struct Run {
    db_mib: f64,
    wv: (f64, f64, f64, f64),    // wall, cpu, rss, stored MiB
    pgb: (f64, f64, f64, f64),   // same for pg_basebackup
    pgbr1: (f64, f64, f64, f64), // pgbackrest process-max 1
    pgbr2: (f64, f64, f64, f64), // pgbackrest process-max 2
    restore_wall: f64,
    pgbr_restore_wall: f64,
    replay_prefetch: f64,
    replay_noprefetch: f64,
    replay_local: f64,
    wal_mib: f64,
}

async fn replay(archive: &str, prefetch: u32, local_wal: bool) -> Result<f64> {
    let dir = PgCluster::fresh_dir("bench-replay")?;
    let data = dir.join("data");
    let owner = PgCluster::pg_user_name();
    let out = Command::new(bin("walvault-recover")?)
        .args(["restore", "--archive", archive, "--pgdata", data.to_str().unwrap(), "--latest", "--owner", &owner])
        .args(["--prefetch", &prefetch.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("restore failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    if local_wal {
        // Put every archived segment into pg_wal first, and make the archive unreachable.
        let recover = bin("walvault-recover")?;
        let id = walvault_shared::archive::identity::load(
            &*walvault_shared::storage::open_existing(archive, &Default::default()).await?,
        )
        .await?
        .unwrap();
        let cat = walvault_shared::archive::walcat::WalCatalog::load(
            &*walvault_shared::storage::open_existing(archive, &Default::default()).await?,
            id.wal_segment_size,
        )
        .await?;
        for (tli, t) in &cat.timelines {
            for s in &t.segments {
                let name = walvault_shared::wal::SegmentName::new(*tli, *s).file_name(id.wal_segment_size);
                let dest = data.join("pg_wal").join(&name);
                let o = Command::new(&recover)
                    .args(["wal-fetch", "--prefetch", "0", "--archive", archive, &name])
                    .arg(&dest)
                    .output()?;
                if !o.status.success() {
                    bail!("wal-fetch {name}");
                }
                walvault_tests::pg::chown_to_pg(&dest)?;
            }
        }
        let auto = data.join("postgresql.auto.conf");
        let s = std::fs::read_to_string(&auto)?;
        let s: String = s.lines().filter(|l| !l.starts_with("restore_command")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&auto, format!("{s}restore_command = '/bin/false'\n"))?;
    }
    let pg = PgCluster::from_data_dir("bench-replay", dir, data, vec![])?;
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
    }
    Ok(t0.elapsed().as_secs_f64())
}

async fn one(cli: &Cli) -> Result<Run> {
    let pg = PgCluster::start_new(
        "bench-backup",
        PgOptions {
            settings: vec!["max_wal_size = '8GB'".into(), "checkpoint_timeout = '30min'".into()],
            ..Default::default()
        },
    )?;
    let adir = PgCluster::fresh_dir("bench-archive")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&adir, std::fs::Permissions::from_mode(0o755))?;
    let archive = format!("file://{}", adir.join("repo").display());
    let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"])?;
    pg.run_program("pgbench", &["-i", "-s", &cli.scale.to_string(), "-q", "postgres"])?;
    pg.execute("CHECKPOINT").await?;
    let db_bytes: u64 = pg.query_one_text("SELECT sum(pg_database_size(oid)) FROM pg_database").await?.parse()?;
    let agent_bin = bin("walvault-agent")?;
    let mut c = Command::new(&agent_bin);
    c.args(["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    let (w, cpu, rss) = measured(c)?;
    let stored = dir_size(&adir.join("repo/backups"));
    let mut run = Run {
        db_mib: db_bytes as f64 / (1 << 20) as f64,
        wv: (w, cpu, rss, stored as f64 / (1 << 20) as f64),
        ..Default::default()
    };
    // pg_basebackup into a directory the PostgreSQL user owns.
    let bdir = PgCluster::fresh_dir("bench-pgbasebackup")?;
    let mut c = pg_command(&pg_program("pg_basebackup")?)?;
    c.args([
        "-D",
        bdir.join("b").to_str().unwrap(),
        "-Ft",
        "-Z",
        "client-zstd",
        "-X",
        "none",
        "-c",
        "fast",
        "--no-sync",
    ])
    .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres"]);
    let (w, cpu, rss) = measured(c)?;
    run.pgb = (w, cpu, rss, dir_size(&bdir) as f64 / (1 << 20) as f64);
    std::fs::remove_dir_all(&bdir)?;
    // pgBackRest, full backups with zst, 1 and 2 processes; then its restore.
    let pgbr_dir = PgCluster::fresh_dir("bench-pgbackrest")?;
    for pmax in [1, 2] {
        let repo = pgbr_dir.join(format!("repo{pmax}"));
        let conf = pgbr_dir.join(format!("pgbackrest{pmax}.conf"));
        std::fs::write(
            &conf,
            format!(
                "[global]\nrepo1-path={}\ncompress-type=zst\nlog-level-console=error\nlog-level-file=off\nlock-path={}\nspool-path={}\n\
                 start-fast=y\narchive-check=n\nrepo1-retention-full=9\nprocess-max={pmax}\n\n[bench]\npg1-path={}\n\
                 pg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
                repo.display(),
                pgbr_dir.join("lock").display(),
                pgbr_dir.join("spool").display(),
                pg.data.display(),
                pg.port,
                pg.socket_dir.display()
            ),
        )?;
        walvault_tests::pg::chown_to_pg(&conf)?;
        let pgbr = |args: &[&str]| -> Result<Command> {
            let mut c = pg_command(Path::new("/usr/bin/pgbackrest"))?;
            c.arg(format!("--config={}", conf.display())).arg("--stanza=bench").args(args);
            Ok(c)
        };
        let o = pgbr(&["stanza-create"])?.output()?;
        if !o.status.success() {
            bail!("pgbackrest stanza-create: {}", String::from_utf8_lossy(&o.stderr));
        }
        let (w, cpu, rss) = measured(pgbr(&["--type=full", "backup"])?)?;
        let r = (w, cpu, rss, dir_size(&repo) as f64 / (1 << 20) as f64);
        if pmax == 1 {
            run.pgbr1 = r;
        } else {
            run.pgbr2 = r;
            let target = pgbr_dir.join("restore");
            std::fs::create_dir_all(&target)?;
            walvault_tests::pg::chown_to_pg(&target)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))?;
            let (w, _, _) = measured(pgbr(&[&format!("--pg1-path={}", target.display()), "restore"])?)?;
            run.pgbr_restore_wall = w;
        }
    }
    std::fs::remove_dir_all(&pgbr_dir)?;
    // WAL after the backup, for the replay measurement.
    let start: walvault_shared::lsn::Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    let target = start.0 + (cli.wal_mib << 20);
    while pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse::<walvault_shared::lsn::Lsn>()?.0 < target
    {
        pg.run_program("pgbench", &["-T", "5", "-c", "2", "-n", "postgres"])?;
    }
    let end: walvault_shared::lsn::Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    run.wal_mib = (end.0 - start.0) as f64 / (1 << 20) as f64;
    agent.wait_archived(end, Duration::from_secs(600)).await?;
    pg.stop("fast")?;
    agent.stop()?;
    // Restore alone.
    let rdir = PgCluster::fresh_dir("bench-restore")?;
    let t0 = Instant::now();
    let out = Command::new(bin("walvault-recover")?)
        .args(["restore", "--archive", &archive, "--pgdata", rdir.join("data").to_str().unwrap(), "--latest"])
        .output()?;
    if !out.status.success() {
        bail!("restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    run.restore_wall = t0.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&rdir)?;
    run.replay_prefetch = replay(&archive, 4, false).await?;
    run.replay_noprefetch = replay(&archive, 0, false).await?;
    run.replay_local = replay(&archive, 0, true).await?;
    Ok(run)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut runs = Vec::new();
    for i in 0..cli.runs {
        eprintln!("run {}/{} …", i + 1, cli.runs);
        runs.push(one(&cli).await?);
    }
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let db = m(&|r| r.db_mib);
    let mut s = String::new();
    use std::fmt::Write;
    writeln!(s, "# Base backup, restore and replay: walvault vs pg_basebackup and local pg_wal\n")?;
    writeln!(s, "date: {}; machine: {} cores; pgbench scale {} ({:.0} MiB database); {:.0} MiB WAL replayed; medians of {} runs\n", chrono::Utc::now().to_rfc3339(), std::thread::available_parallelism()?.get(), cli.scale, db, m(&|r| r.wal_mib), cli.runs)?;
    writeln!(s, "| backup | seconds | MiB/s of database | CPU s | peak RSS MiB | stored MiB |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|")?;
    let row = |s: &mut String, name: &str, f: &dyn Fn(&Run) -> (f64, f64, f64, f64)| {
        let w = m(&|r| f(r).0);
        let _ = writeln!(
            s,
            "| {name} | {:.1} | {:.0} | {:.1} | {:.0} | {:.0} |",
            w,
            db / w,
            m(&|r| f(r).1),
            m(&|r| f(r).2),
            m(&|r| f(r).3)
        );
    };
    row(&mut s, "walvault-agent backup (zstd 3, 2 parts in parallel)", &|r| r.wv);
    row(&mut s, "pg_basebackup -Ft -Z client-zstd", &|r| r.pgb);
    row(&mut s, "pgbackrest backup --type=full zst, process-max 1", &|r| r.pgbr1);
    row(&mut s, "pgbackrest backup --type=full zst, process-max 2", &|r| r.pgbr2);
    let ratio = |s: &mut String, name: &str, f: &dyn Fn(&Run) -> (f64, f64, f64, f64)| {
        let _ = writeln!(
            s,
            "ratio walvault/{name}: time {:.2}, CPU {:.2}, RSS {:.2}, stored {:.2}",
            m(&|r| r.wv.0) / m(&|r| f(r).0),
            m(&|r| r.wv.1) / m(&|r| f(r).1),
            m(&|r| r.wv.2) / m(&|r| f(r).2),
            m(&|r| r.wv.3) / m(&|r| f(r).3)
        );
    };
    writeln!(s)?;
    ratio(&mut s, "pg_basebackup", &|r| r.pgb);
    ratio(&mut s, "pgbackrest process-max 2", &|r| r.pgbr2);
    writeln!(s, "\n| restore | seconds | MiB/s of database |")?;
    writeln!(s, "|---|---:|---:|")?;
    let (wr, pr) = (m(&|r| r.restore_wall), m(&|r| r.pgbr_restore_wall));
    writeln!(
        s,
        "| walvault-recover restore --latest (local archive, 4 parts in parallel) | {wr:.1} | {:.0} |",
        db / wr
    )?;
    writeln!(s, "| pgbackrest restore (process-max 2) | {pr:.1} | {:.0} |", db / pr)?;
    writeln!(s, "\nratio walvault/pgbackrest restore time: {:.2}", wr / pr)?;
    writeln!(s, "\n| replay of the WAL after the backup | seconds | ratio to pg_wal |")?;
    writeln!(s, "|---|---:|---:|")?;
    let local = m(&|r| r.replay_local);
    writeln!(
        s,
        "| wal-fetch, prefetch 4 | {:.1} | {:.2} |",
        m(&|r| r.replay_prefetch),
        m(&|r| r.replay_prefetch) / local
    )?;
    writeln!(
        s,
        "| wal-fetch, no prefetch | {:.1} | {:.2} |",
        m(&|r| r.replay_noprefetch),
        m(&|r| r.replay_noprefetch) / local
    )?;
    writeln!(s, "| WAL already in pg_wal | {:.1} | 1.00 |", local)?;
    print!("{s}");
    if let Some(p) = &cli.out {
        std::fs::write(p, &s)?;
    }
    Ok(())
}
