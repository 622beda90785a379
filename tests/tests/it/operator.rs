//! What a new operator trips over, each shown handled: `--force` never touches a running
//! server, an archive that is down at start is waited for, root restores need an owner, backups
//! taken by cron show in `/status`, the quickstart cleans up after a failure, each subcommand's
//! help shows its own options.

use std::time::{Duration, Instant};

use walvault_shared::lsn::Lsn;
use walvault_tests::agent::{workspace_binary, Agent};
use walvault_tests::cli::run;
use walvault_tests::pg::{PgCluster, PgOptions};
use walvault_tests::s3server::{S3Server, ACCESS_KEY, SECRET_KEY};

fn opts() -> PgOptions {
    PgOptions { settings: vec!["wal_keep_size = '1GB'".into()], ..Default::default() }
}

async fn flush_lsn(pg: &PgCluster) -> Lsn {
    pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap()
}

/// A cluster streamed into a local archive with one backup.
async fn archived_cluster(name: &str) -> (PgCluster, tempfile::TempDir, String, Agent) {
    let pg = PgCluster::start_new(name, opts()).unwrap();
    let (dir, archive, _) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10)").await.unwrap();
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{out}\n{err}");
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    (pg, dir, archive, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_never_touches_a_running_servers_data_directory() {
    walvault_tests::init_logging();
    let (pg, _dir, archive, mut agent) = archived_cluster("live").await;
    let owner = PgCluster::pg_user_name();
    let data = pg.data.to_str().unwrap().to_string();
    let before: Vec<_> = std::fs::read_dir(&pg.data).unwrap().map(|e| e.unwrap().file_name()).collect();
    let restore = || {
        run(
            "walvault-recover",
            &["restore", "--archive", &archive, "--pgdata", &data, "--owner", &owner, "--latest", "--force"],
        )
    };
    let (code, _, err) = restore();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by a running server") && err.contains("postmaster.pid"), "{err}");
    let pid = pg.postmaster_pid().unwrap();
    assert!(err.contains(&pid.to_string()), "the message names the process: {err}");
    // Found another way when the lock file is gone: the server's working directory.
    let lock = pg.data.join("postmaster.pid");
    let saved = std::fs::read(&lock).unwrap();
    std::fs::remove_file(&lock).unwrap();
    let (code, _, err) = restore();
    std::fs::write(&lock, &saved).unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by a running server") && err.contains("data directory"), "{err}");
    // The cluster still answers, with its files all there.
    assert_eq!(pg.query_one_text("SELECT count(*) FROM t").await.unwrap(), "10");
    let after: Vec<_> = std::fs::read_dir(&pg.data).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before.len(), after.len());
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_restore_without_owner_is_refused_before_writing() {
    walvault_tests::init_logging();
    assert!(walvault_tests::pg::pg_user().unwrap().is_some(), "the tests run as root (tests/run.sh)");
    let (_pg, _dir, archive, mut agent) = archived_cluster("rootless").await;
    let target = PgCluster::fresh_dir("rootless").unwrap().join("data");
    let t = target.to_str().unwrap();
    let (code, _, err) = run("walvault-recover", &["restore", "--archive", &archive, "--pgdata", t, "--latest"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot run as root") && err.contains("--owner postgres"), "{err}");
    assert!(!target.exists(), "nothing written");
    // --start cannot work with root-owned files at all; --allow-root-owned restores as root.
    let (code, _, err) = run(
        "walvault-recover",
        &["restore", "--archive", &archive, "--pgdata", t, "--latest", "--allow-root-owned", "--start"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(!target.exists());
    let (code, out, err) =
        run("walvault-recover", &["restore", "--archive", &archive, "--pgdata", t, "--latest", "--allow-root-owned"]);
    assert_eq!(code, 0, "{out}\n{err}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(target.join("PG_VERSION")).unwrap().uid(), 0);
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_backup_taken_by_the_backup_command() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("cronbackup", opts()).unwrap();
    let (_dir, archive, _) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let s = agent.status().await.unwrap();
    assert!(s["last_backup_at"].is_null(), "{s}");
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{out}\n{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let s = agent.status().await.unwrap();
        if s["last_backup_id"] == id.as_str() {
            assert!(s["last_backup_at"].is_string(), "{s}");
            let (_, metrics) = agent.http_get("/metrics").await.unwrap();
            let line = metrics.lines().find(|l| l.starts_with("walvault_last_backup_timestamp_seconds ")).unwrap();
            let v: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!((chrono::Utc::now().timestamp() as f64 - v).abs() < 120.0, "{line}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "backup {id} not in /status: {s}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_that_is_down_at_start_is_waited_for() {
    walvault_tests::init_logging();
    let mut s3 = S3Server::start().await.unwrap();
    let bucket = s3.new_bucket("late").await.unwrap();
    s3.kill();
    let pg = PgCluster::start_new("latearchive", opts()).unwrap();
    let env = [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_REGION", "us-east-1")];
    let archive = format!("s3://{bucket}/late");
    let mut agent = Agent::start_with_env(
        &pg.url(),
        &archive,
        &["--s3-endpoint", &s3.endpoint, "--s3-force-path-style", "--no-backups", "--chunk-interval", "200ms"],
        &env,
    )
    .unwrap();
    // Down: the agent stays up, says so, and retries.
    let t0 = Instant::now();
    loop {
        if let Ok((code, body)) = agent.http_get("/healthz").await {
            assert_eq!(code, 503, "{body}");
            if agent.log_text().matches("archive unreachable").count() >= 2 {
                assert!(body.contains("archive unreachable"), "{body}");
                break;
            }
        }
        assert!(agent.is_running(), "the agent gave up; log:\n{}", agent.log_text());
        assert!(t0.elapsed() < Duration::from_secs(60), "no retries logged:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    assert!(metrics.lines().any(|l| l == "walvault_up 0"), "{metrics}");
    // Up again: archiving starts without a restart.
    s3.restart().await.unwrap();
    pg.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(120)).await.unwrap();
    assert_eq!(agent.http_get("/healthz").await.unwrap().0, 200);
    assert_eq!(agent.stop().unwrap(), 0);
    // What cannot heal still stops it at once: a bucket that does not exist.
    let mut missing = Agent::start_with_env(
        &pg.url(),
        &format!("s3://no-such-bucket-{:08x}/x", rand::random::<u32>()),
        &["--s3-endpoint", &s3.endpoint, "--s3-force-path-style", "--no-backups"],
        &env,
    )
    .unwrap();
    let code = missing.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(code, 1, "{}", missing.log_text());
    assert!(missing.log_text().contains("HINT"), "{}", missing.log_text());
}

#[test]
fn each_subcommand_shows_only_its_options_and_describes_each() {
    let help = |bin: &str, args: &[&str]| {
        let (code, out, err) = run(bin, args);
        assert_eq!(code, 0, "{err}");
        out
    };
    let backup = help("walvault-agent", &["backup", "--help"]);
    let expire = help("walvault-agent", &["expire", "--help"]);
    let run_h = help("walvault-agent", &["run", "--help"]);
    for streaming in ["--chunk-interval", "--listen", "--slot", "--upload-concurrency"] {
        assert!(run_h.contains(streaming), "run --help lacks {streaming}");
        assert!(!backup.contains(streaming) && !expire.contains(streaming), "{streaming} shown outside run");
    }
    assert!(!expire.contains("--pg-url") && !expire.contains("--backup-part-size"));
    assert!(
        backup.contains("--retain-full") && backup.contains("deleted"),
        "backup --help says retention deletes:\n{backup}"
    );
    // Every option line has a description.
    for (bin, sub) in [
        ("walvault-agent", "run"),
        ("walvault-agent", "backup"),
        ("walvault-agent", "expire"),
        ("walvault-agent", "keygen"),
        ("walvault-recover", "list"),
        ("walvault-recover", "restore"),
        ("walvault-recover", "audit"),
        ("walvault-recover", "verify"),
        ("walvault-recover", "wal-fetch"),
    ] {
        let h = help(bin, &[sub, "--help"]);
        let lines: Vec<&str> = h.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if !t.starts_with("--") && !t.starts_with("-h") && !t.starts_with("-V") {
                continue;
            }
            let described = t.split("  ").filter(|p| !p.trim().is_empty()).count() > 1
                || lines.get(i + 1).is_some_and(|n| n.starts_with("          ") && !n.trim_start().starts_with('-'));
            assert!(described, "{bin} {sub}: option without a description: {l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_runs_twice_and_a_taken_port_stops_it_cleanly() {
    let bins = workspace_binary("walvault-agent").unwrap().parent().unwrap().to_path_buf();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/quickstart.sh");
    let pg_port = walvault_tests::free_port().unwrap();
    let listen = walvault_tests::free_port().unwrap();
    let quickstart = |listen: u16| {
        std::process::Command::new("bash")
            .arg(&script)
            .env("QUICKSTART_BIN_DIR", &bins)
            .env("QUICKSTART_PG_PORT", pg_port.to_string())
            .env("QUICKSTART_LISTEN_PORT", listen.to_string())
            .output()
            .unwrap()
    };
    let first = quickstart(listen);
    let (out, err) = (String::from_utf8_lossy(&first.stdout), String::from_utf8_lossy(&first.stderr));
    assert!(first.status.success(), "{out}\n{err}");
    assert!(out.contains("agent stopped cleanly") && out.contains("backups:"), "{out}");
    // The status port taken (as by the README's own --listen example): a clear message naming
    // the port, exit 1, and nothing left running.
    let blocker = std::net::TcpListener::bind(("127.0.0.1", listen)).unwrap();
    let second = quickstart(listen);
    drop(blocker);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("port {listen}")) && err.contains("HINT"), "{err}");
    let pidfile = std::path::Path::new("/tmp/walvault-quickstart/pgdata/postmaster.pid");
    assert!(!pidfile.exists(), "PostgreSQL left running");
    // A step that fails after PostgreSQL started (here the agent): its log is shown and
    // PostgreSQL is stopped too.
    let fake = tempfile::tempdir().unwrap();
    let agent = fake.path().join("walvault-agent");
    std::fs::write(&agent, "#!/bin/sh\necho 'walvault-agent: simulated start failure' >&2\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(bins.join("walvault-recover"), fake.path().join("walvault-recover")).unwrap();
    let third = std::process::Command::new("bash")
        .arg(&script)
        .env("QUICKSTART_BIN_DIR", fake.path())
        .env("QUICKSTART_PG_PORT", pg_port.to_string())
        .env("QUICKSTART_LISTEN_PORT", listen.to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&third.stderr);
    assert_eq!(third.status.code(), Some(1), "{err}");
    assert!(err.contains("exited at start") && err.contains("simulated start failure"), "{err}");
    assert!(!pidfile.exists(), "PostgreSQL left running after a failed step");
    let _ = std::fs::remove_dir_all("/tmp/walvault-quickstart");
}
