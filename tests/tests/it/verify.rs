//! `walvault-recover verify`, the restore drill, against a real archive and real PostgreSQL
//! (each major of the matrix): it passes on a good archive (the rows committed before the drill are there, counted by the
//! recovered server), refuses a non-empty scratch directory without touching it, and fails, with
//! the step and the scratch directory kept, when a backup part is corrupt.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walvault_shared::lsn::Lsn;
use walvault_tests::agent::{workspace_binary, Agent};
use walvault_tests::pg::{pg_bin, PgCluster, PgOptions};

fn verify(archive: &str, workdir: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_binary("walvault-recover").unwrap())
        .args(["verify", "--archive", archive, "--pg-bin", pg_bin().to_str().unwrap()])
        .args(["--owner", &PgCluster::pg_user_name(), "--workdir", workdir.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn files(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            v.extend(files(&e.path()));
        } else {
            v.push(e.path());
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_passes_then_fails_on_a_corrupt_part() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("drill", PgOptions::default()).unwrap();
    let (dir, archive, _) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int)").await.unwrap();
    pg.execute("INSERT INTO t SELECT generate_series(1, 100)").await.unwrap();
    let out = Command::new(workspace_binary("walvault-agent").unwrap())
        .args(["backup", "--pg-url", &pg.url(), "--archive", &archive])
        .output()
        .unwrap();
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    // After the backup: 50 more rows, the last committed at `last`.
    pg.execute("INSERT INTO t SELECT generate_series(101, 149)").await.unwrap();
    let last: f64 = pg
        .query_one_text("INSERT INTO t VALUES (150) RETURNING extract(epoch FROM now())")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();

    let scratch = PgCluster::fresh_dir("drill-scratch").unwrap();
    let w = scratch.join("w");
    let (code, out, err) = verify(&archive, &w, &["--check-sql", "SELECT count(*) FROM t", "--json"]);
    assert_eq!(code, 0, "drill failed:\n{out}\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["pass"], true, "{out}");
    assert_eq!(r["checks"][1]["output"], "150", "{out}");
    assert!(r["pg_verifybackup"].as_str().unwrap().contains("verified"), "{out}");
    // The last replayed commit is the last one we made (PostgreSQL's commit timestamp).
    let replayed = chrono::DateTime::parse_from_rfc3339(r["last_replayed_commit"].as_str().unwrap()).unwrap();
    let replayed = replayed.timestamp_micros() as f64 / 1e6;
    assert!(replayed >= last - 1e-6, "replayed {replayed}, last commit {last}\n{out}");
    assert!(!w.exists(), "scratch directory removed after a pass");
    // The text report, as an operator reads it.
    let (code, out, err) = verify(&archive, &w, &["--check-sql", "SELECT count(*) FROM t"]);
    assert_eq!(code, 0, "drill failed:\n{out}\n{err}");
    println!("{out}");
    assert!(out.starts_with("restore drill: PASSED") && out.contains(": 150\n") && out.contains("(removed)"), "{out}");

    // A non-empty scratch directory is refused and left as it was.
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(w.join("precious"), "x").unwrap();
    let (code, _, err) = verify(&archive, &w, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty") && err.contains("HINT"), "{err}");
    assert_eq!(std::fs::read_to_string(w.join("precious")).unwrap(), "x");

    // Refused before anything is written: PostgreSQL cannot run as root; an unknown owner; an
    // owner who cannot read the archive (restore_command will run as it).
    let recover = |args: &[&str]| {
        let o = Command::new(workspace_binary("walvault-recover").unwrap()).args(args).output().unwrap();
        (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let w3 = scratch.join("w3");
    let pgbin = pg_bin();
    let (code, err) = recover(&[
        "verify",
        "--archive",
        &archive,
        "--pg-bin",
        pgbin.to_str().unwrap(),
        "--workdir",
        w3.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot run as root") && err.contains("HINT: pass --owner"), "{err}");
    let restore_w3 = |extra: &[&str]| {
        let mut args = vec!["restore", "--archive", &archive, "--pgdata", w3.to_str().unwrap()];
        args.extend_from_slice(extra);
        recover(&args)
    };
    let (code, err) = restore_w3(&["--latest", "--owner", "no-such-user-x"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no such user") && err.contains("HINT"), "{err}");
    // A value the argument parser cannot check is still a usage error (exit 2), before any I/O.
    let (code, err) = restore_w3(&["--target-time", "2026-13-45T00:00:00Z"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a valid date and time") && err.contains("HINT"), "{err}");
    let (code, err) = restore_w3(&["--latest", "--target-action", "explode"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("HINT: use promote, pause or shutdown"), "{err}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, out, err) = verify(&archive, &w3, &[]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("cannot read the archive") && err.contains("not readable by this user"), "{err}");
    assert!(!w3.exists(), "nothing written");

    // --all-backups: each backup to its own end.
    let w4 = scratch.join("w4");
    let (code, out, err) = verify(&archive, &w4, &["--all-backups"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("PASSED"), "{out}");

    // One flipped byte in the middle of the largest backup object: the drill fails at restore.
    let part = files(&dir.path().join("repo/backups")).into_iter().max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&part, bytes).unwrap();
    let w2 = scratch.join("w2");
    let (code, out, err) = verify(&archive, &w2, &[]);
    assert_eq!(code, 1, "a corrupt part must fail the drill:\n{out}\n{err}");
    assert!(out.contains("FAILED") && out.contains("failed at: restore"), "{out}");
    assert!(out.contains("(kept)") && w2.exists(), "{out}");

    // Every drill left its record in the archive: list shows them (passes, then the failure
    // with its step), the audit gives the last pass's age and RTO, the agent exports them.
    let o = Command::new(workspace_binary("walvault-recover").unwrap())
        .args(["list", "--archive", &archive, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let drills = l["drills"].as_array().unwrap();
    let results: Vec<bool> = drills.iter().map(|d| d["pass"].as_bool().unwrap()).collect();
    assert_eq!(results.last(), Some(&false), "{l}");
    assert!(results.iter().filter(|p| **p).count() >= 2, "{l}");
    let failed = drills.last().unwrap();
    assert!(failed["failure"].as_str().unwrap().contains("restore"), "{failed}");
    assert!(drills[0]["rto_seconds"].as_f64().unwrap() > 0.0, "{l}");
    let out = Command::new(workspace_binary("walvault-recover").unwrap())
        .args(["audit", "--archive", &archive, "--json"])
        .output()
        .unwrap();
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(a["last_drill_rto_s"].as_f64().unwrap() > 0.0 && a["last_drill_age_days"].as_f64().unwrap() < 1.0, "{a}");
    let mut exported = 0.0;
    for _ in 0..150 {
        let (_, m) = agent.http_get("/metrics").await.unwrap();
        exported = m
            .lines()
            .find(|l| l.starts_with("walvault_last_drill_success_timestamp_seconds "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if exported > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!((chrono::Utc::now().timestamp() as f64 - exported).abs() < 600.0, "metric {exported}");

    // The DR report from those measurements: the point-in-time scenario passes with a generous
    // RTO target and fails with an impossible one; without a copy the off-site scenario fails.
    let report = |extra: &[&str]| {
        let o = Command::new(workspace_binary("walvault-recover").unwrap())
            .args(["report", "--archive", &archive, "--json"])
            .args(extra)
            .output()
            .unwrap();
        (o.status.code().unwrap_or(-1), serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default())
    };
    let (code, r) = report(&["--rpo-target", "1h", "--rto-target", "1h"]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["rows"][0]["pass"], true, "{r}");
    assert_eq!(r["rows"][0]["rto_met"], true, "{r}");
    assert_eq!(r["rows"][2]["pass"], false, "{r}");
    assert!(r["rows"][2]["notes"][0].as_str().unwrap().contains("no copy"), "{r}");
    let (code, r) = report(&["--rto-target", "1ms"]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["rows"][0]["rto_met"], false, "{r}");
    agent.stop().unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
}
