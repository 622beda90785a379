//! Base backups and point-in-time restore, end to end, against real PostgreSQL (each major of
//! the matrix): the agent streams and backs up; `walvault-recover restore` rebuilds a data
//! directory; PostgreSQL replays the archived WAL through `walvault-recover wal-fetch`; the data itself is the oracle (rows
//! committed at or before the target exist, later ones do not), with pg_verifybackup on the
//! restored base.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walvault_shared::lsn::Lsn;
use walvault_tests::agent::{workspace_binary, Agent};
use walvault_tests::pg::{PgCluster, PgOptions};

/// `track_commit_timestamp`: time targets are taken from PostgreSQL's own commit times
/// (`pg_xact_commit_timestamp`), exact to the microsecond.
fn opts() -> PgOptions {
    PgOptions {
        settings: vec!["wal_keep_size = '1GB'".into(), "track_commit_timestamp = on".into()],
        ..Default::default()
    }
}

fn local_archive() -> (tempfile::TempDir, String) {
    // restore_command runs as the PostgreSQL user: the archive is shared with its group.
    let (dir, url, _) = walvault_tests::local_archive().unwrap();
    (dir, url)
}

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_binary(bin).unwrap()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn flush_lsn(pg: &PgCluster) -> Lsn {
    pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap()
}

/// Restore into a fresh directory, check the base with pg_verifybackup, start it, wait for
/// recovery to finish, and return the cluster.
async fn restore_and_start(archive: &str, target: &[&str]) -> PgCluster {
    restore_and_start_with_output(archive, target).await.0
}

async fn restore_and_start_with_output(archive: &str, target: &[&str]) -> (PgCluster, String) {
    let dir = PgCluster::fresh_dir("restored").unwrap();
    let data = dir.join("data");
    let owner = PgCluster::pg_user_name();
    // No lease: the helper waits for the replay itself (the lease test takes one explicitly).
    let mut args =
        vec!["restore", "--archive", archive, "--pgdata", data.to_str().unwrap(), "--owner", &owner, "--lease", "0s"];
    args.extend_from_slice(target);
    let (code, out, err) = run("walvault-recover", &args);
    assert_eq!(code, 0, "restore failed:\n{out}\n{err}");
    // The restored base matches the server's manifest (we changed only the recovery settings).
    let verify = walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pg_verifybackup").unwrap())
        .unwrap()
        .args(["-n", "-i", "postgresql.auto.conf", "-i", "recovery.signal", "-i", "standby.signal"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "pg_verifybackup: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let pg = PgCluster::from_data_dir("restored", dir, data, vec![]).unwrap();
    pg.start().unwrap();
    for _ in 0..1200 {
        if let Ok(r) = pg.query_one_text("SELECT pg_is_in_recovery()").await {
            if r == "f" {
                return (pg, out);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "restored cluster still in recovery after 120 s; log:\n{}",
        std::fs::read_to_string(&pg.log).unwrap_or_default()
    );
}

/// Whether a `wal-prefetch` process for `spool` runs (its command line names the spool).
fn prefetcher_running(spool: &Path) -> bool {
    let needle = spool.display().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c).contains("wal-prefetch") && String::from_utf8_lossy(&c).contains(&needle)
            })
            .unwrap_or(false)
    })
}

/// wal-fetch's background prefetcher (`wal-prefetch --spool DATA/pg_wal/walvault-prefetch`)
/// exits and removes its spool once recovery has ended (`why`, for the message).
async fn prefetcher_gone_after_recovery(data: &Path, why: &str) {
    let spool = data.join("pg_wal").join("walvault-prefetch");
    if walvault_tests::eventually(Duration::from_secs(10), || !spool.exists() && !prefetcher_running(&spool)).await {
        return;
    }
    panic!(
        "10 s after {why}: prefetcher running {}, spool {} present {}",
        prefetcher_running(&spool),
        spool.display(),
        spool.exists()
    );
}

/// `walvault-agent backup` under a test fault file (debug builds), returned once it holds its
/// lock, with its uploads then held (`hang put`): write "" to the returned file to release them.
/// Returns the process, the fault file and the backup's id.
async fn backup_held_after_its_lock(pg_url: &str, archive: &str) -> (std::process::Child, PathBuf, String) {
    let faults = walvault_tests::test_root().unwrap().join(format!("faults-{:08x}", rand::random::<u32>()));
    std::fs::write(&faults, "").unwrap();
    let mut running = Command::new(workspace_binary("walvault-agent").unwrap())
        .args(["backup", "--pg-url", pg_url, "--archive", archive])
        .env("WALVAULT_TEST_FAULTS", &faults)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let root = Path::new(archive.strip_prefix("file://").unwrap()).join("backups");
    for _ in 0..600 {
        let locked = std::fs::read_dir(&root).ok().and_then(|d| {
            d.filter_map(|e| e.ok())
                .find(|e| e.path().join("backup.lock").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
        });
        if let Some(id) = locked {
            std::fs::write(&faults, "hang put").unwrap();
            // In force once the agent says so (it reads the fault file every 100 ms).
            if walvault_tests::fault_applied(&faults, "hang put", Duration::from_secs(12)).await {
                return (running, faults, id);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = running.kill();
    let _ = running.wait();
    panic!("the backup never took its lock, or never put the held uploads in force");
}

/// Lease objects in a local archive.
fn leases(archive: &str) -> usize {
    let dir = Path::new(archive.strip_prefix("file://").unwrap()).join("leases");
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

async fn ids(pg: &PgCluster) -> Vec<i64> {
    let c = pg.connect().await.unwrap();
    c.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get::<_, i32>(0) as i64).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_then_point_in_time_restores() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("pitr", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())").await.unwrap();
    pg.execute("INSERT INTO t (id) SELECT generate_series(1, 5)").await.unwrap();
    // The archive exists (the agent has created it and archived these rows) ...
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    // ... but before any backup a restore is refused with the reason.
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            "/tmp/walvault-tests/never",
            "--latest",
            "--owner",
            &PgCluster::pg_user_name(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no complete base backup") && err.contains("HINT"), "{err}");
    assert!(!Path::new("/tmp/walvault-tests/never").exists(), "nothing written");

    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    let desc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let backup_stop: Lsn = desc["stop_lsn"].as_str().unwrap().parse().unwrap();
    let before_backup_end = Lsn(backup_stop.0 - 1).to_string();

    // One row per transaction, each with its own commit-time clock, across segment switches.
    let c = pg.connect().await.unwrap();
    let mut times = Vec::new();
    for id in 6..=40 {
        c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
        let row =
            c.query_one("SELECT pg_xact_commit_timestamp(xmin)::text FROM t WHERE id = $1", &[&id]).await.unwrap();
        times.push((id, row.get::<_, String>(0)));
        if id % 12 == 0 {
            pg.switch_wal().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let lsn_after_40: Lsn = {
        // A target LSN: just after row 30's commit is certainly past it; use the LSN when 30 was
        // the newest row by inserting a marker afterwards and reading its position first.
        let r = pg.query_one_text("SELECT pg_current_wal_insert_lsn()").await.unwrap();
        r.parse().unwrap()
    };
    for id in 41..=45 {
        c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
    }
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();

    // list shows the backup and the window.
    let (code, out, err) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
    assert_eq!(code, 0, "{err}");
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["backups"].as_array().unwrap().len(), 1, "{l}");
    let to: Lsn = l["timelines"][0]["recoverable_to_lsn"].as_str().unwrap().parse().unwrap();
    assert!(to >= end, "recoverable to {to}, archived {end}");
    // ... by time too: from the first commit after the backup to the last archived commit.
    let from_t = walvault_shared::time::parse(l["timelines"][0]["recoverable_from_time"].as_str().unwrap()).unwrap();
    let to_t = walvault_shared::time::parse(l["timelines"][0]["recoverable_to_time"].as_str().unwrap()).unwrap();
    assert!(from_t < to_t, "{l}");
    assert!(chrono::Utc::now() - to_t < chrono::Duration::seconds(30), "the last archived commit is recent: {l}");
    assert!(l["backups"][0]["stop_time"].is_string(), "{l}");
    let (_, text, _) = run("walvault-recover", &["list", "--archive", &archive]);
    assert!(text.contains("recoverable from 20") && text.contains(" UTC"), "{text}");

    // Target time between row 20 and row 21 (inside the newest segments, some only as chunks).
    let t20 = chrono::DateTime::parse_from_str(&times[14].1, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap();
    let t21 = chrono::DateTime::parse_from_str(&times[15].1, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap();
    assert_eq!(times[14].0, 20);
    let target = t20 + (t21 - t20) / 2;
    let (r, out) = restore_and_start_with_output(&archive, &["--target-time", &target.to_rfc3339()]).await;
    assert_eq!(ids(&r).await, (1..=20).collect::<Vec<_>>(), "exactly the rows committed by the target time");
    // Restore names the last commit at or before the target, found in the archived WAL: row
    // 20's commit, to the microsecond PostgreSQL recorded for it.
    let line = out
        .lines()
        .find(|l| l.starts_with("the last commit at or before the target: "))
        .unwrap_or_else(|| panic!("{out}"));
    let t = chrono::DateTime::parse_from_rfc3339(line.split(": ").nth(1).unwrap().split(' ').next().unwrap()).unwrap();
    assert_eq!(t, t20, "the last commit before the target is row 20's");
    drop(r);

    // --start: restore starts the server itself, waits for the target and reports the last
    // replayed commit (row 20's).
    let dir = PgCluster::fresh_dir("restored-start").unwrap();
    let data = dir.join("data");
    let port = walvault_tests::free_port().unwrap().to_string();
    let owner = PgCluster::pg_user_name();
    let pg_bin = walvault_tests::pg::pg_bin();
    let (code, out, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            data.to_str().unwrap(),
            "--owner",
            &owner,
            "--target-time",
            &target.to_rfc3339(),
            "--start",
            "--pg-bin",
            pg_bin.to_str().unwrap(),
            "--port",
            &port,
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    // It held a lease while it replayed, and released it when the replay was over.
    assert!(err.contains("lease leases/"), "{err}");
    assert_eq!(leases(&archive), 0, "the lease of restore --start is released");
    let line = out.lines().find(|l| l.contains("last replayed commit: ")).unwrap_or_else(|| panic!("{out}"));
    let replayed = line.split("last replayed commit: ").nth(1).unwrap().trim();
    let replayed = chrono::DateTime::parse_from_str(replayed, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap();
    assert!(replayed >= t20 && replayed <= target, "last replayed commit {replayed} is row 20's");
    let stop = walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pg_ctl").unwrap())
        .unwrap()
        .arg("-D")
        .arg(&data)
        .args(["-m", "immediate", "-w", "stop"])
        .output()
        .unwrap();
    assert!(stop.status.success());
    std::fs::remove_dir_all(&dir).unwrap();

    // Target LSN after row 40's commit position (before 41).
    let r = restore_and_start(&archive, &["--target-lsn", &lsn_after_40.to_string()]).await;
    assert_eq!(ids(&r).await, (1..=40).collect::<Vec<_>>());
    drop(r);

    // Everything archived.
    let r = restore_and_start(&archive, &["--latest"]).await;
    assert_eq!(ids(&r).await, (1..=45).collect::<Vec<_>>());
    drop(r);

    // Bad input: a target before the backup ends names the window; nothing is written.
    let never = PgCluster::fresh_dir("never").unwrap().join("data");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            never.to_str().unwrap(),
            "--target-lsn",
            &before_backup_end,
            "--owner",
            &owner,
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("recoverable window"), "{err}");
    assert!(!never.exists(), "nothing written for an unreachable target");
    // A time after the newest archived WAL.
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            never.to_str().unwrap(),
            "--target-time",
            "2999-01-01T00:00:00Z",
            "--owner",
            &owner,
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("after the newest archived WAL"), "{err}");
    // A non-empty PGDATA is refused.
    let full = PgCluster::fresh_dir("full").unwrap();
    std::fs::write(full.join("precious"), b"x").unwrap();
    let (code, _, err) = run(
        "walvault-recover",
        &["restore", "--archive", &archive, "--pgdata", full.to_str().unwrap(), "--latest", "--owner", &owner],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not empty") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(full.join("precious")).unwrap(), b"x");
    // A wrong archive URL.
    let (code, _, err) = run("walvault-recover", &["list", "--archive", "/tmp/walvault-tests/no-such-archive"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_corrupt_wal_is_reported() {
    let pg = PgCluster::start_new("gaps", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let repo = PathBuf::from(archive.trim_start_matches("file://"));
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())").await.unwrap();
    let (code, _, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{err}");
    for i in 1..=3 {
        pg.execute(&format!("INSERT INTO t (id) VALUES ({i})")).await.unwrap();
        pg.switch_wal().await.unwrap();
    }
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    // Delete a segment in the middle: restore names the missing LSN before writing anything.
    let mut segs: Vec<PathBuf> = std::fs::read_dir(repo.join("wal/00000001"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 24)
        .collect();
    segs.sort();
    let victim = segs[segs.len() - 2].clone();
    let saved = std::fs::read(&victim).unwrap();
    std::fs::remove_file(&victim).unwrap();
    let never = PgCluster::fresh_dir("never").unwrap().join("data");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            never.to_str().unwrap(),
            "--latest",
            "--owner",
            &PgCluster::pg_user_name(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing WAL") && err.contains("resumes at"), "{err}");
    assert!(!never.exists());
    // Put it back with one bit flipped: wal-fetch refuses it with exit 126 (fatal for recovery).
    let mut bad = saved.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x10;
    std::fs::write(&victim, &bad).unwrap();
    let dest = PgCluster::fresh_dir("walfetch").unwrap().join("seg");
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let (code, _, err) = run("walvault-recover", &["wal-fetch", "--archive", &archive, &name, dest.to_str().unwrap()]);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("corrupt") || err.contains("checksum"), "{err}");
    assert!(!dest.exists(), "a corrupt file is never handed over");
    std::fs::write(&victim, &saved).unwrap();
    let (code, _, err) = run("walvault-recover", &["wal-fetch", "--archive", &archive, &name, dest.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        pg.read_pg_wal(&name).unwrap(),
        "wal-fetch gives back the server's segment"
    );
    // Not in the archive: exit 1 (end of archived WAL).
    let (code, _, _) = run(
        "walvault-recover",
        &["wal-fetch", "--archive", &archive, "0000000100000000000000FE", dest.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    let (code, _, _) =
        run("walvault-recover", &["wal-fetch", "--archive", &archive, "00000009.history", dest.to_str().unwrap()]);
    assert_eq!(code, 1);
}

fn pgbench_scale() -> String {
    std::env::var("WALVAULT_TEST_PGBENCH_SCALE").unwrap_or_else(|_| "10".into())
}

fn pgbench_in_background(
    pg: &PgCluster,
    args: &'static [&'static str],
) -> std::thread::JoinHandle<std::process::Output> {
    let sock = pg.socket_dir.clone();
    let port = pg.port;
    std::thread::spawn(move || {
        let mut c = walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pgbench").unwrap()).unwrap();
        c.args(args).env("PGHOST", sock).env("PGPORT", port.to_string()).env("PGUSER", "postgres");
        c.output().unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_during_pgbench_restores_consistent() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("bench-backup", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"]).unwrap();
    pg.run_program("pgbench", &["-i", "-s", &pgbench_scale(), "-q", "postgres"]).unwrap();
    let load = pgbench_in_background(&pg, &["-T", "12", "-c", "2", "-n", "postgres"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, out, err) =
        run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive, "--backup-part-size", "16MiB"]);
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    let desc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(desc["archives"][0]["parts"].as_array().unwrap().len() > 1, "several parts: {desc}");
    eprintln!(
        "backup of {} MiB in {:.1} s (stored {} MiB)",
        desc["raw_bytes"].as_u64().unwrap() >> 20,
        desc["duration_seconds"].as_f64().unwrap(),
        desc["stored_bytes"].as_u64().unwrap() >> 20
    );
    assert!(load.join().unwrap().status.success());
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    let r = restore_and_start(&archive, &["--latest"]).await;
    prefetcher_gone_after_recovery(&r.data, "recovery ended").await;
    // pgbench's own invariant: every transaction adds the same delta to one account, teller and
    // branch, and logs it in the history.
    let sums = r
        .query_one_text(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::text || ',' || (SELECT sum(bbalance) FROM pgbench_branches)::text \
             || ',' || (SELECT sum(tbalance) FROM pgbench_tellers)::text || ',' || (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::text",
        )
        .await
        .unwrap();
    let v: Vec<&str> = sums.split(',').collect();
    assert!(v.iter().all(|x| *x == v[0]), "pgbench balances disagree after restore: {sums}");
    let n_hist = r.query_one_text("SELECT count(*) FROM pgbench_history").await.unwrap();
    let n_orig = pg.query_one_text("SELECT count(*) FROM pgbench_history").await.unwrap();
    assert_eq!(n_hist, n_orig, "every committed pgbench transaction is restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_backup_leaves_no_complete_backup() {
    let pg = PgCluster::start_new("backup-kill", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let repo = PathBuf::from(archive.trim_start_matches("file://"));
    let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"]).unwrap();
    pg.run_program("pgbench", &["-i", "-s", &pgbench_scale(), "-q", "postgres"]).unwrap();
    let mut child = Command::new(workspace_binary("walvault-agent").unwrap())
        .args(["backup", "--pg-url", &pg.url(), "--archive", &archive, "--backup-part-size", "1MiB"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some parts are stored.
    let parts = || -> usize {
        walkdir(&repo.join("backups"))
            .iter()
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("part-"))
            .count()
    };
    for _ in 0..600 {
        if parts() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(parts() >= 3, "the backup stored parts");
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, out, _) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
    assert_eq!(code, 0);
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(l["backups"].as_array().unwrap().is_empty(), "no complete-looking backup: {l}");
    let abandoned = l["incomplete_backups"][0].as_str().unwrap().to_string();
    // The next backup succeeds and removes the leftovers.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!repo.join("backups").join(&abandoned).exists(), "leftovers of {abandoned} removed");
    let (_, out, _) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["backups"].as_array().unwrap().len(), 1);
    assert!(l["incomplete_backups"].as_array().unwrap().is_empty());
    assert_eq!(agent.stop().unwrap(), 0);
}

fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walkdir(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_kept_backups_need() {
    let pg = PgCluster::start_new("retention", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let repo = PathBuf::from(archive.trim_start_matches("file://"));
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (v int)").await.unwrap();
    let mut backups = Vec::new();
    for i in 0..3 {
        for _ in 0..2 {
            pg.execute(&format!("INSERT INTO t VALUES ({i})")).await.unwrap();
            pg.switch_wal().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1100)).await; // backup ids are per second
        let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
        assert_eq!(code, 0, "{err}");
        let d: serde_json::Value = serde_json::from_str(&out).unwrap();
        backups.push((d["id"].as_str().unwrap().to_string(), d["start_lsn"].as_str().unwrap().parse::<Lsn>().unwrap()));
    }
    pg.switch_wal().await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    // Stop the agent before counting: after a segment is consolidated it deletes that segment's
    // chunks in the background, which would change the count under the dry run (seen once on 18).
    assert_eq!(agent.stop().unwrap(), 0);
    let wal_before = walkdir(&repo.join("wal")).len();
    // Dry run: says what it would delete, deletes nothing.
    let (code, out, err) =
        run("walvault-agent", &["expire", "--archive", &archive, "--retain-full", "2", "--dry-run", "--json"]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["deleted_backups"], serde_json::json!([backups[0].0]));
    assert!(r["deleted_wal_objects"].as_u64().unwrap() > 0);
    assert!(repo.join("backups").join(&backups[0].0).exists());
    assert_eq!(walkdir(&repo.join("wal")).len(), wal_before);
    // For real.
    let (code, _, err) = run("walvault-agent", &["expire", "--archive", &archive, "--retain-full", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(!repo.join("backups").join(&backups[0].0).exists(), "oldest backup removed");
    assert!(repo.join("backups").join(&backups[1].0).join("backup.json").exists());
    let store: std::sync::Arc<dyn walvault_shared::storage::ObjectStore> =
        std::sync::Arc::new(walvault_shared::storage::local::LocalStore::open_existing(&repo).unwrap());
    let cat = walvault_tests::agent::catalog(&store, 16 << 20).await.unwrap();
    let tli = walvault_shared::lsn::TimelineId(1);
    let cutoff = backups[1].1.segment_start(16 << 20);
    let ranges = cat.ranges(tli);
    assert_eq!(ranges.len(), 1, "one contiguous range remains: {ranges:?}");
    assert!(
        ranges[0].0 <= cutoff && ranges[0].0 >= Lsn(cutoff.0.saturating_sub(16 << 20)),
        "WAL below the oldest kept backup removed: {ranges:?}, cutoff {cutoff}"
    );
    assert!(ranges[0].1 >= end, "everything a kept backup needs is still there");
    // Restore from the oldest kept backup still works from the listing's point of view.
    let (code, out, _) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
    assert_eq!(code, 0);
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["backups"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_and_wal_volume_backups_fire() {
    let pg = PgCluster::start_new("schedule", opts()).unwrap();
    let (_keep, archive) = local_archive();
    // First backup because there is none; then every 4 s.
    let mut agent = Agent::start(&pg.url(), &archive, &["--backup-interval", "4s", "--retain-full", "2"]).unwrap();
    let count = || async {
        let (_, out, _) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|l| l["backups"].as_array().map(|a| a.len()))
            .unwrap_or(0)
    };
    let mut taken = 0;
    for _ in 0..300 {
        let s = agent.status().await.ok();
        taken = s.as_ref().and_then(|s| s["backups_taken"].as_u64()).unwrap_or(0);
        if taken >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken >= 3, "initial + 2 interval backups within 30 s:\n{}", agent.log_text());
    // Retention runs after the backup is counted: wait for it rather than race it.
    let mut kept = count().await;
    for _ in 0..100 {
        if kept == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        kept = count().await;
    }
    assert_eq!(kept, 2, "retention after each backup keeps 2");
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    assert!(metrics.contains("walvault_last_backup_timestamp_seconds"), "{metrics}");
    assert_eq!(agent.stop().unwrap(), 0);

    // WAL-volume trigger: no interval; a new backup once 2 MiB of WAL are archived.
    let mut agent = Agent::start(&pg.url(), &archive, &["--backup-wal-volume", "2MiB"]).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agent.status().await.unwrap()["backups_taken"], 0, "archive already has backups: none at start");
    pg.execute("CREATE TABLE big AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g").await.unwrap();
    let mut fired = false;
    for _ in 0..300 {
        if agent.status().await.unwrap()["backups_taken"].as_u64().unwrap_or(0) >= 1 {
            fired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fired, "WAL-volume backup:\n{}", agent.log_text());
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_across_a_promotion() {
    walvault_tests::init_logging();
    let primary = PgCluster::start_new("pitr-primary", opts()).unwrap();
    primary
        .execute("CREATE TABLE t (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())")
        .await
        .unwrap();
    primary.execute("INSERT INTO t (id) SELECT generate_series(-2, 0)").await.unwrap();
    let standby = PgCluster::start_standby_of(&primary, "pitr-standby").unwrap();
    let (_keep, archive) = local_archive();
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres target_session_attrs=read-write connect_timeout=5",
        primary.port, standby.port
    );
    let mut agent = Agent::start(&url, &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &primary.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{err}");
    let desc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let backup_stop = desc["stop_lsn"].as_str().unwrap().to_string();
    let mut times = std::collections::BTreeMap::new();
    let insert = |pg: &PgCluster, id: i32| {
        let url = pg.conn_str("postgres", "postgres");
        async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
            let at: String = c
                .query_one("SELECT pg_xact_commit_timestamp(xmin)::text FROM t WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            chrono::DateTime::parse_from_str(&at, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap()
        }
    };
    for id in 1..=10 {
        times.insert(id, insert(&primary, id).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lsn = flush_lsn(&primary).await;
    agent.wait_archived(lsn, Duration::from_secs(60)).await.unwrap();
    let mut replayed = false;
    for _ in 0..600 {
        if standby.query_one_text("SELECT count(*) FROM t").await.unwrap() == "13" {
            replayed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replayed, "the standby replayed the primary's rows within 30 s");
    primary.stop("fast").unwrap();
    standby.promote().unwrap();
    for id in 11..=20 {
        times.insert(id, insert(&standby, id).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end = flush_lsn(&standby).await;
    agent.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    assert_eq!(agent.status().await.unwrap()["timeline"], 2);
    let mid = |a: i32| {
        let (x, y) = (times[&a], times[&(a + 1)]);
        (x + (y - x) / 2).to_rfc3339()
    };
    // Just after the backup: only the rows committed before it.
    let r = restore_and_start(&archive, &["--target-lsn", &backup_stop]).await;
    assert_eq!(ids(&r).await, vec![-2, -1, 0]);
    drop(r);
    // Before the promotion (timeline 1 part of timeline 2's history).
    let r = restore_and_start(&archive, &["--target-time", &mid(5)]).await;
    assert_eq!(ids(&r).await, (-2..=5).collect::<Vec<_>>());
    drop(r);
    // After the promotion, on timeline 2.
    let r = restore_and_start(&archive, &["--target-time", &mid(15)]).await;
    assert_eq!(ids(&r).await, (-2..=15).collect::<Vec<_>>());
    drop(r);
    let r = restore_and_start(&archive, &["--latest"]).await;
    assert_eq!(ids(&r).await, (-2..=20).collect::<Vec<_>>());
    drop(r);
    // Along timeline 1 only (--target-timeline): everything the old primary committed, nothing
    // of the new one's.
    let r = restore_and_start(&archive, &["--latest", "--target-timeline", "1"]).await;
    assert_eq!(ids(&r).await, (-2..=10).collect::<Vec<_>>());
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_points_are_listed_checked_and_the_first_of_two_is_picked() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("rp", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())").await.unwrap();
    let (code, _, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{err}");
    for id in 1..=3 {
        pg.execute(&format!("INSERT INTO t (id) VALUES ({id})")).await.unwrap();
    }
    pg.execute("SELECT pg_create_restore_point('before-migration')").await.unwrap();
    pg.execute("INSERT INTO t (id) VALUES (4)").await.unwrap();
    pg.execute("SELECT pg_create_restore_point('twice')").await.unwrap();
    pg.execute("INSERT INTO t (id) VALUES (5)").await.unwrap();
    pg.execute("SELECT pg_create_restore_point('twice')").await.unwrap();
    pg.execute("INSERT INTO t (id) VALUES (6)").await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    // Listed, in WAL order, with LSN and time.
    let (code, out, err) = run("walvault-recover", &["list", "--archive", &archive, "--restore-points", "--json"]);
    assert_eq!(code, 0, "{err}");
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> =
        l["restore_points"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["before-migration", "twice", "twice"], "{l}");
    assert_eq!(l["restore_points_complete"], true);
    let (_, text, _) = run("walvault-recover", &["list", "--archive", &archive, "--restore-points"]);
    assert!(text.contains("\"before-migration\"") && text.contains("timeline 1"), "{text}");
    // A name that is not there: refused before anything is written.
    let dir = PgCluster::fresh_dir("rp-none").unwrap().join("data");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            dir.to_str().unwrap(),
            "--owner",
            &PgCluster::pg_user_name(),
            "--target-name",
            "nope",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no restore point \"nope\"") && err.contains("before-migration"), "{err}");
    assert!(!dir.exists());
    // One: exactly the rows before it.
    let (r, _) = restore_and_start_with_output(&archive, &["--target-name", "before-migration"]).await;
    assert_eq!(ids(&r).await, vec![1, 2, 3]);
    drop(r);
    // Twice: the first after the backup is where PostgreSQL stops, and restore says so.
    let dir = PgCluster::fresh_dir("rp-twice").unwrap();
    let data = dir.join("data");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            data.to_str().unwrap(),
            "--owner",
            &PgCluster::pg_user_name(),
            "--target-name",
            "twice",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exists 2 times") && err.contains("stops at the first"), "{err}");
    let r = walvault_tests::cli::start_recovered(dir, data).await.unwrap();
    assert_eq!(ids(&r).await, vec![1, 2, 3, 4]);
}

/// Targets at the edges: exactly on a segment boundary (the first byte of the segment after a
/// switch), by transaction id (inclusive), and among several backups left after `expire`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_on_a_segment_boundary_by_xid_inside_a_record_and_after_expire() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("edges", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let backup = |n: usize| {
        for _ in 0..n {
            let (code, _, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
            assert_eq!(code, 0, "{err}");
        }
    };
    backup(1);
    pg.execute("INSERT INTO t SELECT generate_series(1, 5)").await.unwrap();
    // The switch ends the segment: the next record starts at the next segment's first byte.
    pg.switch_wal().await.unwrap();
    let boundary: Lsn = pg.query_one_text("SELECT pg_current_wal_insert_lsn()").await.unwrap().parse().unwrap();
    let seg = pg.wal_segment_size().await.unwrap();
    // After a switch the insert position is reported past the new segment's page header.
    let boundary = Lsn(boundary.0 / seg * seg);
    pg.execute("INSERT INTO t SELECT generate_series(6, 8)").await.unwrap();
    // A transaction whose id is the target.
    let c = pg.connect().await.unwrap();
    let xid: String =
        c.query_one("WITH i AS (INSERT INTO t VALUES (9)) SELECT txid_current()::text", &[]).await.unwrap().get(0);
    c.execute("INSERT INTO t VALUES (10)", &[]).await.unwrap();
    // Two more backups, then expire down to one full backup.
    backup(2);
    c.execute("INSERT INTO t VALUES (11)", &[]).await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    // On the boundary: rows 1..5 (committed before the switch), none after.
    let r = restore_and_start(&archive, &["--target-lsn", &boundary.to_string()]).await;
    assert_eq!(ids(&r).await, (1..=5).collect::<Vec<_>>(), "target {boundary} on a segment boundary");
    drop(r);
    let r = restore_and_start(&archive, &["--target-xid", &xid]).await;
    assert_eq!(ids(&r).await, (1..=9).collect::<Vec<_>>(), "up to and including xid {xid}");
    drop(r);
    // A transaction that never ended in the archived WAL: refused before anything is written.
    let unknown = (xid.parse::<u64>().unwrap() + 100_000).to_string();
    let nowhere = PgCluster::fresh_dir("edges-xid").unwrap().join("data");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            nowhere.to_str().unwrap(),
            "--owner",
            &PgCluster::pg_user_name(),
            "--target-xid",
            &unknown,
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("transaction {unknown} does not commit or abort")) && err.contains("HINT"), "{err}");
    assert!(!nowhere.exists(), "nothing written for a refused xid target");
    let (code, out, err) = run("walvault-agent", &["expire", "--archive", &archive, "--retain-full", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["deleted_backups"].as_array().unwrap().len(), 2, "{rep}");
    // The boundary is now before the only backup: refused with the window; latest works.
    let never = PgCluster::fresh_dir("edges-never").unwrap().join("data");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--pgdata",
            never.to_str().unwrap(),
            "--owner",
            &PgCluster::pg_user_name(),
            "--target-lsn",
            &boundary.to_string(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("recoverable window"), "{err}");
    // A target inside a record that spans many pages (a continuation record at the target):
    // PostgreSQL replays that record and the next one, and stops before row 13's commit.
    c.execute("INSERT INTO t VALUES (12)", &[]).await.unwrap();
    let msg_end: Lsn = pg
        .query_one_text("SELECT pg_logical_emit_message(false, 'walvault-test', repeat('y', 2 * 1024 * 1024))::text")
        .await
        .unwrap()
        .parse()
        .unwrap();
    c.execute("INSERT INTO t VALUES (13)", &[]).await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let inside = Lsn(msg_end.0 - (1 << 20));
    let r = restore_and_start(&archive, &["--target-lsn", &inside.to_string()]).await;
    assert_eq!(
        ids(&r).await,
        (1..=12).collect::<Vec<_>>(),
        "target {inside} inside a 2 MiB record ending at {msg_end}"
    );
    drop(r);
    let r = restore_and_start(&archive, &["--latest"]).await;
    assert_eq!(ids(&r).await, (1..=13).collect::<Vec<_>>());
    assert_eq!(agent.stop().unwrap(), 0);
}

/// A base backup taken from a standby (BASE_BACKUP on a server in recovery), the WAL streamed
/// from the primary: it restores, with every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_taken_from_a_standby_restores() {
    walvault_tests::init_logging();
    let primary = PgCluster::start_new("sb-primary", opts()).unwrap();
    let (_keep, archive) = local_archive();
    // The agent first: the archive then holds the WAL from before the standby's own start.
    let mut agent = Agent::start(&primary.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    primary.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)").await.unwrap();
    agent.wait_archived(flush_lsn(&primary).await, Duration::from_secs(60)).await.unwrap();
    let standby = PgCluster::start_standby_of(&primary, "sb-standby").unwrap();
    for _ in 0..600 {
        if standby.query_one_text("SELECT count(*) FROM t").await.map(|c| c == "100").unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(standby.query_one_text("SELECT count(*) FROM t").await.unwrap(), "100", "the standby replays");
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &standby.url(), "--archive", &archive]);
    assert_eq!(code, 0, "backup from the standby: {out}{err}");
    primary.execute("INSERT INTO t SELECT generate_series(101, 120)").await.unwrap();
    let end = flush_lsn(&primary).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    let r = restore_and_start(&archive, &["--latest"]).await;
    assert_eq!(ids(&r).await, (1..=120).collect::<Vec<_>>());
}

/// Expire racing a restore and a backup. A plain restore leaves a lease for the replay that
/// follows it: `expire --retain-full 1` then keeps the restored (older) backup and the WAL after
/// it, and the replay, started after the expire, finds everything. A backup in progress (its
/// uploads held) is not taken for an abandoned one by an expire meanwhile, completes, and
/// restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_racing_a_restore_and_a_backup() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("leases", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    // Enough data that a backup takes a while.
    pg.run_program("pgbench", &["-i", "-s", "5", "-q", "postgres"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let backup = || {
        let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
        assert_eq!(code, 0, "{err}");
        let d = serde_json::from_str::<serde_json::Value>(&out).unwrap();
        (d["id"].as_str().unwrap().to_string(), d["start_lsn"].as_str().unwrap().parse::<Lsn>().unwrap())
    };
    let (a, a_start) = backup();
    pg.execute("INSERT INTO t SELECT generate_series(1, 5)").await.unwrap();
    let (b, _) = backup();
    pg.execute("INSERT INTO t SELECT generate_series(6, 10)").await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();

    // Restore the older backup (A), as an operator would, and start it only later.
    let dir = PgCluster::fresh_dir("leased").unwrap();
    let data = dir.join("data");
    let owner = PgCluster::pg_user_name();
    let (code, out, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--backup",
            &a,
            "--latest",
            "--pgdata",
            data.to_str().unwrap(),
            "--owner",
            &owner,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("lease leases/") && err.contains(&format!("keeps backup {a}")), "{err}");
    assert_eq!(leases(&archive), 1);
    let (code, out, err) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
    assert_eq!(code, 0, "{err}");
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["leases"][0]["backups"], serde_json::json!([a]), "list shows the lease: {l}");
    // Expire meanwhile: A would go (one full backup kept), but the lease keeps it and its WAL.
    let (code, out, err) = run("walvault-agent", &["expire", "--archive", &archive, "--retain-full", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["deleted_backups"].as_array().unwrap().len(), 0, "{rep}");
    assert_eq!(rep["leased_backups"], serde_json::json!([a]), "{rep}");
    let cutoff: Lsn = rep["wal_cutoff"].as_str().unwrap().parse().unwrap();
    assert!(cutoff <= a_start, "WAL from the leased backup's start ({a_start}) is kept: {rep}");
    let r = PgCluster::from_data_dir("leased", dir, data, vec![]).unwrap();
    r.start().unwrap();
    for _ in 0..1200 {
        if r.query_one_text("SELECT pg_is_in_recovery()").await.map(|v| v == "f").unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ids(&r).await, (1..=10).collect::<Vec<_>>(), "the replay after the expire found A's WAL");
    drop(r);

    // A backup whose uploads hang (the fault file of debug builds) while an expire runs.
    let (running, faults, c_id) = backup_held_after_its_lock(&pg.url(), &archive).await;
    let root = Path::new(archive.strip_prefix("file://").unwrap()).join("backups");
    let (code, out, err) = run("walvault-agent", &["expire", "--archive", &archive, "--retain-full", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(root.join(&c_id).join("backup.lock").exists(), "expire left the running backup alone: {out}");
    std::fs::write(&faults, "").unwrap();
    let done = running.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let c: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(c["id"], c_id);
    let (code, out, _) = run("walvault-recover", &["list", "--archive", &archive]);
    assert_eq!(code, 0);
    assert!(out.contains(&c_id) && out.contains(&b), "{out}");
    pg.execute("INSERT INTO t VALUES (11)").await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let r = restore_and_start(&archive, &["--backup", &c_id, "--latest"]).await;
    assert_eq!(ids(&r).await, (1..=11).collect::<Vec<_>>());
    assert_eq!(agent.stop().unwrap(), 0);
}

/// A time target when the agent's clock is 10 s behind the server's (debug builds honour
/// `WALVAULT_TEST_CLOCK_SKEW_MS`): the newer backup's recorded end is then earlier than its real
/// one, and the agent's clock alone would choose it although it already holds a commit after
/// the target. The server's commit times choose the older backup, and the rows are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_target_with_the_agents_clock_behind_the_servers() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("skew", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let backup = |skew_ms: &str| {
        let out = Command::new(workspace_binary("walvault-agent").unwrap())
            .args(["backup", "--pg-url", &pg.url(), "--archive", &archive])
            .env("WALVAULT_TEST_CLOCK_SKEW_MS", skew_ms)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    backup("0");
    let c = pg.connect().await.unwrap();
    let commit = |id: i32| {
        let c = &c;
        async move {
            c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
            let at: String = c
                .query_one("SELECT pg_xact_commit_timestamp(xmin)::text FROM t WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            chrono::DateTime::parse_from_str(&at, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap()
        }
    };
    for id in 1..5 {
        commit(id).await;
    }
    let c5 = commit(5).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c6 = commit(6).await;
    let b = backup("-10000");
    let b_stop = chrono::DateTime::parse_from_rfc3339(b["stop_time"].as_str().unwrap()).unwrap();
    let target = c5 + (c6 - c5) / 2;
    assert!(b_stop < target, "the skewed agent stamped backup B's end ({b_stop}) before the target ({target})");
    commit(7).await;
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let (r, out) = restore_and_start_with_output(&archive, &["--target-time", &target.to_rfc3339()]).await;
    assert_eq!(ids(&r).await, (1..=5).collect::<Vec<_>>(), "rows at {target}: {out}");
    assert_eq!(agent.stop().unwrap(), 0);
}

/// A timeline switch during a backup: the standby a backup is taken from is promoted while the
/// backup's uploads are held. PostgreSQL fails the backup ("the standby was promoted during
/// online backup"); `walvault-agent backup` exits non-zero saying so, and the archive lists no
/// complete backup from it (the next backup or expire removes its leftovers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_promoted_during_its_backup_fails_the_backup_cleanly() {
    walvault_tests::init_logging();
    let primary = PgCluster::start_new("tlb-primary", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&primary.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    // Enough data that the backup is still streaming when the standby is promoted.
    primary.run_program("pgbench", &["-i", "-s", "10", "-q", "postgres"]).unwrap();
    agent.wait_archived(flush_lsn(&primary).await, Duration::from_secs(60)).await.unwrap();
    let standby = PgCluster::start_standby_of(&primary, "tlb-standby").unwrap();
    let want = flush_lsn(&primary).await;
    for _ in 0..600 {
        let at: Option<Lsn> =
            standby.query_one_text("SELECT pg_last_wal_replay_lsn()").await.ok().and_then(|s| s.parse().ok());
        if at.is_some_and(|l| l >= want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (running, faults, _) = backup_held_after_its_lock(&standby.url(), &archive).await;
    standby.promote().unwrap();
    std::fs::write(&faults, "").unwrap();
    let done = running.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(!done.status.success(), "a backup across a promotion must fail: {err}");
    assert!(err.contains("promoted"), "the reason is PostgreSQL's: {err}");
    let (code, out, lerr) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
    assert_eq!(code, 0, "{lerr}");
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["backups"].as_array().unwrap().len(), 0, "no complete backup: {l}");
    assert_eq!(agent.stop().unwrap(), 0);
}

/// `wal-fetch --prefetch N` in a data directory in recovery: the first fetch starts one
/// background prefetcher, which spools the next N whole segments (byte for byte what wal-fetch
/// itself serves); a spooled segment is served from the spool and the window moves on; the
/// prefetcher exits and removes the spool when recovery ends (recovery.signal gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetcher_spools_ahead_serves_and_leaves_with_recovery() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("prefetch", opts()).unwrap();
    let (_keep, archive) = local_archive();
    let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (v int)").await.unwrap();
    let mut segs = Vec::new();
    for i in 0..7 {
        pg.execute(&format!("INSERT INTO t VALUES ({i})")).await.unwrap();
        segs.push(pg.switch_wal().await.unwrap());
    }
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0, "a clean stop leaves every finished segment whole");

    // A stand-in data directory in recovery, as PostgreSQL's restore_command sees it.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(data.join("recovery.signal"), "").unwrap();
    let spool = data.join("pg_wal").join("walvault-prefetch");
    let dest = data.join("pg_wal").join("RECOVERYXLOG");
    let fetch = |seg: &str, prefetch: &str, to: &Path| {
        let (code, out, err) = run(
            "walvault-recover",
            &["wal-fetch", "--archive", &archive, "--prefetch", prefetch, seg, to.to_str().unwrap()],
        );
        assert_eq!(code, 0, "wal-fetch {seg}:\n{out}\n{err}");
        std::fs::read(to).unwrap()
    };
    let direct = |seg: &str| fetch(seg, "0", &dir.path().join("direct"));

    assert_eq!(fetch(&segs[0], "3", &dest), direct(&segs[0]));
    assert!(!spool.join(&segs[0]).exists());
    let spooled = |n: &[String]| n.iter().all(|s| spool.join(s).is_file());
    let wait = Duration::from_secs(30);
    assert!(walvault_tests::eventually(wait, || spooled(&segs[1..4])).await, "the next 3 segments spooled");
    assert!(!spool.join(&segs[4]).exists(), "no more than 3 ahead");
    assert!(prefetcher_running(&spool));
    // Served from the spool: the spooled file is moved into place, and it is the archive's.
    let spooled_copy = std::fs::read(spool.join(&segs[1])).unwrap();
    assert_eq!(fetch(&segs[1], "3", &dest), spooled_copy);
    assert_eq!(spooled_copy, direct(&segs[1]));
    assert!(!spool.join(&segs[1]).exists(), "taken from the spool");
    assert!(walvault_tests::eventually(wait, || spooled(&segs[2..5])).await, "the window moved on by one");
    // A jump ahead (a later segment) prunes what is behind it.
    assert_eq!(fetch(&segs[3], "3", &dest), direct(&segs[3]));
    assert!(
        walvault_tests::eventually(wait, || !spool.join(&segs[2]).exists()).await,
        "a segment before the last asked for is pruned"
    );
    std::fs::remove_file(data.join("recovery.signal")).unwrap();
    prefetcher_gone_after_recovery(&data, "recovery.signal was removed").await;
}
