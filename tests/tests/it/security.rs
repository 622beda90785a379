//! A hostile bucket must not reach the restore host, and a busy endpoint must not stop
//! archiving: each finding of the security review, reproduced on a tampered archive or a
//! hostile client against real PostgreSQL, and shown refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use walvault_shared::archive::backup::{ArchiveInfo, BackupDescription};
use walvault_shared::archive::envelope::{self, Compression, Expect, ObjectKind};
use walvault_shared::archive::identity::{self, Identity};
use walvault_shared::archive::names;
use walvault_shared::archive::write::Writer;
use walvault_shared::lsn::{Lsn, SegNo, TimelineId};
use walvault_shared::storage::local::LocalStore;
use walvault_shared::storage::{ObjectStore, PutMode};
use walvault_shared::wal::SegmentName;
use walvault_tests::agent::{workspace_binary, Agent};
use walvault_tests::cli::{restore_and_start, run, run_measured};
use walvault_tests::pg::{PgCluster, PgOptions};

fn opts() -> PgOptions {
    PgOptions { settings: vec!["wal_keep_size = '1GB'".into()], ..Default::default() }
}

async fn flush_lsn(pg: &PgCluster) -> Lsn {
    pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap()
}

async fn count(pg: &PgCluster, table: &str) -> i64 {
    pg.query_one_text(&format!("SELECT count(*) FROM {table}")).await.unwrap().parse().unwrap()
}

/// Decode an object without checks beyond integrity (as a bucket writer reads it).
async fn read_any(store: &dyn ObjectStore, key: &str) -> envelope::Decoded {
    let raw = store.get(key).await.unwrap();
    envelope::decode(key, &raw, &Expect { kind: None, max_plain: 1 << 30, what: "test", verify: None, epoch: None })
        .unwrap()
}

/// Every file and directory under `root`: nothing for others, no setuid/setgid on files.
fn assert_private(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            continue; // a link's own mode means nothing
        }
        let mode = m.permissions().mode();
        assert_eq!(mode & 0o007, 0, "{} is accessible to others (mode {:o})", p.display(), mode & 0o7777);
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode & 0o6000, 0, "{} has setuid/setgid (mode {:o})", p.display(), mode & 0o7777);
        }
    }
}

/// A cluster streamed and backed up by an agent that signs; returns what the tests need.
struct Signed {
    pg: PgCluster,
    _dir: tempfile::TempDir,
    archive: String,
    root: PathBuf,
    key: PathBuf,
    verify_key: String,
    store: Arc<dyn ObjectStore>,
    backup_id: String,
}

async fn signed_archive() -> Signed {
    let pg = PgCluster::start_new("signed", opts()).unwrap();
    let (dir, archive, root) = walvault_tests::local_archive().unwrap();
    let key = dir.path().join("signing.key");
    let (code, out, err) = run("walvault-agent", &["keygen", "--signing-key", key.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let verify_key = out.trim().to_string();
    assert!(verify_key.starts_with("walvault-verify-key-1:"), "{out}");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let (code, _, err) = run("walvault-agent", &["keygen", "--signing-key", key.to_str().unwrap()]);
    assert_ne!(code, 0, "keygen never overwrites a key: {err}");
    let key_s = key.to_str().unwrap();
    let mut agent =
        Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups", "--signing-key", key_s])
            .unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)").await.unwrap();
    let (code, out, err) =
        run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive, "--signing-key", key_s]);
    assert_eq!(code, 0, "{out}\n{err}");
    let backup_id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    pg.execute("INSERT INTO t SELECT generate_series(11, 20)").await.unwrap();
    pg.switch_wal().await.unwrap();
    pg.execute("INSERT INTO t SELECT generate_series(21, 25)").await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open_existing(&root).unwrap());
    Signed { pg, _dir: dir, archive, root, key, verify_key, store, backup_id }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_archive_restores_and_tampered_objects_are_refused() {
    walvault_tests::init_logging();
    let s = signed_archive().await;
    // Every object the agent wrote is private to the owner and the archive's group.
    assert_private(&s.root);
    // With the verify key: an exact restore, replayed through wal-fetch, which verifies too.
    let (r, _) = restore_and_start(&s.archive, &["--latest", "--verify-key", &s.verify_key]).await;
    assert_eq!(count(&r, "t").await, 25);
    let auto = std::fs::read_to_string(r.data.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("--verify-key walvault-verify-key-1:"), "restore_command verifies too: {auto}");
    assert!(!auto.contains("signing"), "no secret in the restored configuration");
    drop(r);
    // The key file form works as well; a wrong key is refused before anything is written.
    let vk_file = s._dir.path().join("verify.key");
    std::fs::write(&vk_file, format!("{}\n", s.verify_key)).unwrap();
    let other = s._dir.path().join("other.key");
    let (_, other_vk, _) = run("walvault-agent", &["keygen", "--signing-key", other.to_str().unwrap()]);
    let never = PgCluster::fresh_dir("never").unwrap().join("data");
    let owner = PgCluster::pg_user_name();
    let restore = |extra: &[&str]| {
        let mut a = vec![
            "restore",
            "--archive",
            &s.archive,
            "--pgdata",
            never.to_str().unwrap(),
            "--owner",
            &owner,
            "--latest",
        ];
        a.extend_from_slice(extra);
        run("walvault-recover", &a)
    };
    let (code, _, err) = restore(&["--verify-key", other_vk.trim()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("walvault.repository") && err.contains("does not verify"), "{err}");
    assert!(!never.exists(), "nothing written under a wrong key");
    let (code, _, err) = restore(&["--verify-key", s.key.to_str().unwrap()]);
    assert_eq!(code, 2, "a path instead of a key is a usage error: {err}");

    // A bucket writer re-encodes a base backup part (checksums recomputed, as CRC32 allows),
    // and a WAL segment. With the verify key both are refused, naming the object.
    let w = Writer::new(s.store.clone(), None);
    let part = names::backup_part(&s.backup_id, 0);
    let d = read_any(&*s.store, &part).await;
    let mut forged = d.content.clone();
    let marker = b"recovery_end_command = 'touch /tmp/walvault-pwned'\n";
    forged.extend_from_slice(marker);
    let meta: serde_json::Value = d.metadata_as(&part).unwrap();
    let obj = w.encode(&part, ObjectKind::BackupPart, &meta, &forged, Compression::Zstd, 1);
    s.store.put(&part, obj, PutMode::Overwrite).await.unwrap();
    let (code, _, err) = restore(&["--verify-key", &format!("@{}", vk_file.display())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&part) && err.contains("not signed"), "{err}");
    let listing = s.store.list_all("wal/00000001/").await.unwrap();
    let seg_key = listing
        .iter()
        .map(|o| o.key.clone())
        .find(|k| matches!(names::parse(k, 16 << 20), Some(names::ArchiveKey::Segment(_))))
        .expect("a whole segment");
    let d = read_any(&*s.store, &seg_key).await;
    let meta: serde_json::Value = d.metadata_as(&seg_key).unwrap();
    s.store
        .put(
            &seg_key,
            w.encode(&seg_key, ObjectKind::WalSegment, &meta, &d.content, Compression::Zstd, 1),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    let file = seg_key.rsplit('/').next().unwrap().to_string();
    let dest = s._dir.path().join("RECOVERYXLOG");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "wal-fetch",
            "--archive",
            &s.archive,
            "--verify-key",
            &s.verify_key,
            "--prefetch",
            "0",
            &file,
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 126, "unverifiable WAL is fatal for recovery, never 'end of WAL': {err}");
    assert!(err.contains(&seg_key) && err.contains("not signed"), "{err}");
    assert!(!dest.exists(), "nothing handed to PostgreSQL");
    drop(s.pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tablespace_locations_are_refused_and_real_ones_can_be_mapped() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("tblspc", opts()).unwrap();
    let (dir, archive, root) = walvault_tests::local_archive().unwrap();
    // A real tablespace, owned by the PostgreSQL user.
    let ts = PgCluster::fresh_dir("ts").unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute(&format!("CREATE TABLESPACE ts LOCATION '{}'", ts.display())).await.unwrap();
    pg.execute("CREATE TABLE u (id int) TABLESPACE ts; INSERT INTO u SELECT generate_series(1, 1000)").await.unwrap();
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{out}\n{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    pg.execute("INSERT INTO u SELECT generate_series(1001, 1500)").await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let owner = PgCluster::pg_user_name();

    // Restoring it where it was, while the live server uses it: refused, even with --force.
    let never = PgCluster::fresh_dir("never").unwrap().join("data");
    let base =
        ["restore", "--archive", archive.as_str(), "--pgdata", never.to_str().unwrap(), "--owner", &owner, "--latest"];
    let (code, _, err) = run("walvault-recover", &[&base[..], &["--force"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by a running server") || err.contains("not empty"), "{err}");
    assert!(!never.exists());
    // Mapped elsewhere: the rows are there, the live tablespace untouched.
    let ts2 = PgCluster::fresh_dir("ts2").unwrap().join("moved");
    let map = format!("{}={}", ts.display(), ts2.display());
    let before: Vec<_> = std::fs::read_dir(&ts).unwrap().map(|e| e.unwrap().file_name()).collect();
    let (r, _) = restore_and_start(&archive, &["--latest", "--tablespace-mapping", &map]).await;
    assert_eq!(count(&r, "u").await, 1500);
    let link = std::fs::read_link(std::fs::read_dir(r.data.join("pg_tblspc")).unwrap().next().unwrap().unwrap().path())
        .unwrap();
    assert_eq!(link, ts2, "pg_tblspc points to the mapped location");
    let after: Vec<_> = std::fs::read_dir(&ts).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after);
    drop(r);
    assert_eq!(agent.stop().unwrap(), 0);
    drop(pg);

    // A forged description sends a tablespace somewhere else.
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open_existing(&root).unwrap());
    let key = names::backup_description(&id);
    let d = read_any(&*store, &key).await;
    let desc: BackupDescription = d.metadata_as(&key).unwrap();
    let forge = |location: &str| {
        let mut f = desc.clone();
        for a in f.archives.iter_mut().filter(|a| !a.location.is_empty()) {
            a.location = location.to_string();
        }
        if !f.archives.iter().any(|a| !a.location.is_empty()) {
            f.archives.insert(
                0,
                ArchiveInfo { name: "16999.tar".into(), location: location.into(), parts: vec![], raw_bytes: 0 },
            );
        }
        f
    };
    let w = Writer::new(store.clone(), None);
    let outside = dir.path().join("outside");
    let cases: Vec<(String, bool, &str)> = vec![
        // exists and is not empty: refused before anything is written
        (outside.display().to_string(), true, "--tablespace-mapping"),
        // absent: base.tar's own link does not point there; nothing is created there
        (dir.path().join("elsewhere").display().to_string(), false, "pg_tblspc"),
        // not normalised
        (format!("{}/../../root/.ssh", dir.path().display()), false, "normalised"),
    ];
    for (location, populate, expect) in cases {
        if populate {
            std::fs::create_dir_all(&location).unwrap();
            std::fs::write(Path::new(&location).join("authorized_keys"), b"precious").unwrap();
        }
        store.put(&key, w.encode_metadata(&key, &forge(&location)), PutMode::Overwrite).await.unwrap();
        let target = PgCluster::fresh_dir("hostile").unwrap().join("data");
        let (code, _, err) = run(
            "walvault-recover",
            &[
                "restore",
                "--archive",
                &archive,
                "--pgdata",
                target.to_str().unwrap(),
                "--owner",
                &owner,
                "--latest",
                "--force",
            ],
        );
        assert_eq!(code, 1, "{location}: {err}");
        assert!(err.contains(expect), "{location}: {err}");
        if populate {
            assert_eq!(std::fs::read(Path::new(&location).join("authorized_keys")).unwrap(), b"precious");
            assert_eq!(std::fs::read_dir(&location).unwrap().count(), 1, "nothing added at {location}");
        } else {
            assert!(!Path::new(&location).exists(), "nothing created at {location}");
        }
        // A failed restore leaves nothing readable by others.
        if target.exists() {
            assert_private(&target);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_claiming_huge_sizes_are_refused_with_bounded_memory() {
    walvault_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(&root).unwrap());
    // 1 MiB of zeros compressed, presented as 4 GiB of content (a 132 KB object in the review).
    let zeros = vec![0u8; 1 << 20];
    let payload = zstd::bulk::compress(&zeros, 19).unwrap();
    let claim = 4u64 << 30;
    let bomb = |key: &str, kind: ObjectKind, meta: &[u8]| {
        envelope::encode_raw(kind, meta, claim, 0, Compression::Zstd, &payload, envelope::Seal::unsigned(key))
    };
    let id = serde_json::to_vec(&Identity::new(7, 15, 16 << 20)).unwrap();
    store
        .put(names::IDENTITY, bomb(names::IDENTITY, ObjectKind::Identity, &id).into(), PutMode::Overwrite)
        .await
        .unwrap();
    let recover = workspace_binary("walvault-recover").unwrap();
    let archive = format!("file://{}", root.display());
    let (code, rss_kib, err) =
        run_measured(std::process::Command::new(&recover).args(["list", "--archive", &archive])).unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("walvault.repository") && err.contains("refused before reading"), "{err}");
    assert!(rss_kib < 96 << 10, "list peaked at {} MiB", rss_kib >> 10);
    // A segment that claims 4 GiB, served to PostgreSQL by wal-fetch: exit 126, bounded memory.
    let w = Writer::new(store.clone(), None);
    store.delete(&[names::IDENTITY.to_string()]).await.unwrap();
    identity::ensure(&w, &Identity::new(7, 15, 16 << 20)).await.unwrap();
    let seg = SegmentName::new(TimelineId(1), SegNo(3));
    let key = names::segment(&seg, 16 << 20);
    store.put(&key, bomb(&key, ObjectKind::WalSegment, b"{}").into(), PutMode::IfAbsent).await.unwrap();
    let dest = dir.path().join("RECOVERYXLOG");
    let (code, rss_kib, err) = run_measured(
        std::process::Command::new(&recover)
            .args(["wal-fetch", "--archive", &archive, "--prefetch", "0"])
            .arg(seg.file_name(16 << 20))
            .arg(&dest),
    )
    .unwrap();
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("refused before reading"), "{err}");
    assert!(rss_kib < 96 << 10, "wal-fetch peaked at {} MiB", rss_kib >> 10);
    assert!(!dest.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotes_and_shell_syntax_in_the_archive_path_stay_data() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("quoting", opts()).unwrap();
    let outer = tempfile::Builder::new().prefix("archive-").tempdir_in(walvault_tests::test_root().unwrap()).unwrap();
    std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // restore_command runs in the data directory: that is where these would create files.
    let weird = outer.path().join("it's a $(touch pwned-1) `touch pwned-2` %f 100% \\ \"x\"");
    std::fs::create_dir(&weird).unwrap();
    let root = weird.join("repo");
    std::fs::create_dir(&root).unwrap();
    if let Some(u) = walvault_tests::pg::pg_user().unwrap() {
        std::os::unix::fs::chown(&root, None, Some(u.gid)).unwrap();
    }
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o2750)).unwrap();
    std::fs::set_permissions(&weird, std::fs::Permissions::from_mode(0o755)).unwrap();
    let archive = format!("file://{}", root.display());
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 7)").await.unwrap();
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{out}\n{err}");
    pg.switch_wal().await.unwrap();
    pg.execute("INSERT INTO t SELECT generate_series(8, 9)").await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let (r, _) = restore_and_start(&archive, &["--latest"]).await;
    assert_eq!(count(&r, "t").await, 9, "recovered through restore_command with that path");
    for f in ["pwned-1", "pwned-2"] {
        assert!(!r.data.join(f).exists(), "the shell ran something from the archive path");
    }
    drop(r);
    // A newline cannot be written into postgresql.auto.conf: refused before anything is written.
    let nl = outer.path().join("new\nline");
    std::fs::create_dir(&nl).unwrap();
    let never = PgCluster::fresh_dir("never").unwrap().join("data");
    let owner = PgCluster::pg_user_name();
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &format!("file://{}", nl.join("repo").display()),
            "--pgdata",
            never.to_str().unwrap(),
            "--owner",
            &owner,
            "--latest",
        ],
    );
    assert_ne!(code, 0, "{err}");
    assert!(!never.exists());
    // Neither can a restore point name with a newline or backslash.
    for name in ["x\nrestore_command = 'id'", "a\\b"] {
        let (code, _, err) = run(
            "walvault-recover",
            &[
                "restore",
                "--archive",
                &archive,
                "--pgdata",
                never.to_str().unwrap(),
                "--owner",
                &owner,
                "--target-name",
                name,
            ],
        );
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("invalid restore point name"), "{err}");
    }
    assert!(!never.exists());
    assert_eq!(agent.stop().unwrap(), 0);
}

/// Try `n` connections at once that never send a request; keep those that were established
/// within a few seconds (the rest wait in SYN retries: the agent's backlog is full).
async fn idle_connections(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let attempts =
        (0..n).map(|_| tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr.to_string())));
    futures::future::join_all(attempts).await.into_iter().filter_map(|r| r.ok().and_then(|r| r.ok())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_on_the_status_port_do_not_slow_archiving() {
    walvault_tests::init_logging();
    // This process holds thousands of sockets.
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    let pg = PgCluster::start_new("slowloris", opts()).unwrap();
    let (_dir, archive, _) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "1s", "--no-backups"]).unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let out = pg.run_program("pgbench", &["-i", "-s", "5", "-q", "postgres"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 2,000 clients that connect and say nothing, held while pgbench writes.
    let flood = idle_connections(&agent.listen, 2000).await;
    // More than the endpoint serves at once: the rest sit in its backlog, costing it nothing.
    assert!(flood.len() > 64, "only {} connections opened", flood.len());
    let bench = {
        let pg_port = pg.port.to_string();
        let sock = pg.socket_dir.to_str().unwrap().to_string();
        std::thread::spawn(move || {
            walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pgbench").unwrap())
                .unwrap()
                .args(["-h", &sock, "-p", &pg_port, "-U", "postgres", "-T", "15", "-c", "2", "-n", "postgres"])
                .output()
                .unwrap()
        })
    };
    // PostgreSQL's own view of the agent: how far behind its reported flush position is.
    let mut worst = Duration::ZERO;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        let lag = pg
            .query_one_text("SELECT coalesce(extract(epoch FROM flush_lag), 0) FROM pg_stat_replication LIMIT 1")
            .await
            .unwrap_or_else(|_| "0".into());
        worst = worst.max(Duration::from_secs_f64(lag.parse().unwrap_or(0.0)));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = bench.join().unwrap();
    assert!(out.status.success(), "pgbench: {}", String::from_utf8_lossy(&out.stderr));
    assert!(agent.is_running(), "agent died under the flood; log:\n{}", agent.log_text());
    // 1 s chunks: the reported flush is normally within about 2 s of the server's.
    assert!(
        worst < Duration::from_secs(4),
        "flush lag reached {worst:?} while {} idle clients held the port",
        flood.len()
    );
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(30)).await.unwrap();
    drop(flood);
    // Once they are gone the endpoint answers again.
    let t1 = Instant::now();
    loop {
        if let Ok((200, _)) = agent.http_get("/healthz").await {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(30), "endpoint did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent.stop().unwrap(), 0);
}
