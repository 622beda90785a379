//! `walvault-agent copy`: an off-site replica of the archive, made while the agent streams and
//! takes scheduled backups, killed twice mid-way; judged by the objects themselves (same keys,
//! same bytes), by a restore to a time from the copy alone (exact rows), and by a watcher that
//! checks, at every listing during the run, that the copy never shows a backup whose WAL it
//! lacks.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use walvault_shared::archive::backup;
use walvault_shared::archive::read::Reader;
use walvault_shared::lsn::Lsn;
use walvault_shared::storage::s3::S3Store;
use walvault_shared::storage::ObjectStore;
use walvault_tests::agent::{workspace_binary, Agent};
use walvault_tests::cli::restore_and_start;
use walvault_tests::pg::{PgCluster, PgOptions};
use walvault_tests::s3server::S3Server;

fn start_copier(from: &str, to: &str, endpoint: &str, extra: &[&str]) -> Child {
    let log = walvault_tests::test_root().unwrap().join(format!("copier-{:08x}.log", rand::random::<u32>()));
    let out = std::fs::File::create(&log).unwrap();
    Command::new(workspace_binary("walvault-agent").unwrap())
        .args(["copy", "--from", from, "--to", to, "--to-s3-endpoint", endpoint, "--to-s3-force-path-style"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// Every object's bytes, by key (chunks' and locks' aside: both sides remove chunks once a
/// segment holds them, and locks belong to running backups).
async fn contents(store: &Arc<dyn ObjectStore>) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for o in store.list_all("").await.unwrap() {
        if o.key.ends_with("backup.lock") {
            continue;
        }
        m.insert(o.key.clone(), store.get(&o.key).await.unwrap().to_vec());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_under_load_survives_kill9_and_restores_exactly_from_the_copy_alone() {
    walvault_tests::init_logging();
    let s3 = S3Server::shared().await.unwrap();
    let opts = s3.options();
    let bucket = s3.new_bucket("copy").await.unwrap();
    let copy_url = format!("s3://{bucket}/offsite");
    let pg = PgCluster::start_new(
        "copy",
        PgOptions {
            settings: vec!["wal_keep_size = '1GB'".into(), "track_commit_timestamp = on".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let (_keep, archive, path) = walvault_tests::local_archive().unwrap();
    let mut agent =
        Agent::start(&pg.url(), &archive, &["--chunk-interval", "200ms", "--backup-interval", "3s"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    pg.run_program("pgbench", &["-i", "-s", "2", "-q", "postgres"]).unwrap();

    // The watcher: at every listing of the copy, each backup it shows has its WAL there.
    let copy_store: Arc<dyn ObjectStore> = Arc::new(S3Store::connect(&bucket, "offsite", &opts).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (store, stop, checks) = (copy_store.clone(), stop.clone(), checks.clone());
        tokio::spawn(async move {
            let reader = Reader::new(store.clone(), None);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(id) = walvault_shared::archive::identity::load_existing(&reader).await {
                    let seg = id.wal_segment_size;
                    let backups = backup::complete(&reader, seg).await.unwrap();
                    let listing = reader.wal_listing(seg).await.unwrap();
                    for b in &backups {
                        assert!(
                            listing.catalog.pieces_for(b.timeline, b.start_lsn, b.stop_lsn).is_ok(),
                            "the copy shows backup {} without its WAL {}..{}",
                            b.id,
                            b.start_lsn,
                            b.stop_lsn
                        );
                    }
                    checks.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let mut copier = start_copier(&archive, &copy_url, &s3.endpoint, &["--interval", "500ms"]);
    let mut times = Vec::new();
    let c = pg.connect().await.unwrap();
    for round in 0..3 {
        // Load, rows with their commit times, and the copier killed mid-pass.
        let load = {
            let (sock, port) = (pg.socket_dir.clone(), pg.port);
            std::thread::spawn(move || {
                let mut cmd =
                    walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pgbench").unwrap()).unwrap();
                cmd.args(["-T", "3", "-c", "2", "-n", "postgres"]).env("PGHOST", sock).env("PGPORT", port.to_string());
                cmd.env("PGUSER", "postgres").output().unwrap()
            })
        };
        for i in 0..10 {
            let id = round * 10 + i + 1;
            c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
            let at: String = c
                .query_one("SELECT pg_xact_commit_timestamp(xmin)::text FROM t WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            times.push((id, chrono::DateTime::parse_from_str(&at, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap()));
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert!(load.join().unwrap().status.success());
        if round < 2 {
            copier.kill().unwrap();
            copier.wait().unwrap();
            copier = start_copier(&archive, &copy_url, &s3.endpoint, &["--interval", "500ms"]);
        }
    }
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    copier.kill().unwrap();
    copier.wait().unwrap();
    // A last pass: the copy then holds exactly the source's objects, byte for byte.
    let status = start_copier(&archive, &copy_url, &s3.endpoint, &["--once"]).wait().unwrap();
    assert!(status.success());
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(checks.load(Ordering::Relaxed) >= 10, "the watcher listed the copy throughout");
    let src: Arc<dyn ObjectStore> =
        Arc::new(walvault_shared::storage::local::LocalStore::open_existing(&path).unwrap());
    let (a, b) = (contents(&src).await, contents(&copy_store).await);
    let only_src: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_copy: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(only_src.is_empty() && only_copy.is_empty(), "source only {only_src:?}; copy only {only_copy:?}");
    let differ: Vec<&String> = a.iter().filter(|(k, v)| b[*k] != **v).map(|(k, _)| k).collect();
    assert!(differ.is_empty(), "objects differ: {differ:?}");
    let n_backups = a.keys().filter(|k| k.ends_with("backup.json")).count();
    assert!(n_backups >= 2, "scheduled backups were copied ({n_backups})");

    // A restore to a time from the copy alone: exactly the rows committed by then.
    let mid = times[15].1 + (times[16].1 - times[15].1) / 2;
    let (r, _) = restore_and_start(
        &copy_url,
        &["--s3-endpoint", &s3.endpoint, "--s3-force-path-style", "--target-time", &mid.to_rfc3339()],
    )
    .await;
    let c = r.connect().await.unwrap();
    let ids: Vec<i32> = c.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, (1..=16).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_refuses_another_clusters_copy_and_a_damaged_source_object() {
    walvault_tests::init_logging();
    let s3 = S3Server::shared().await.unwrap();
    let _ = s3.options();
    let bucket = s3.new_bucket("copy2").await.unwrap();
    let copy_url = format!("s3://{bucket}/x");
    let run_once = |from: &str| {
        let out = Command::new(workspace_binary("walvault-agent").unwrap())
            .args(["copy", "--once", "--from", from, "--to", &copy_url, "--to-s3-endpoint", &s3.endpoint])
            .arg("--to-s3-force-path-style")
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let mut archives = Vec::new();
    for name in ["copy-a", "copy-b"] {
        let pg = PgCluster::start_new(name, PgOptions::default()).unwrap();
        let (keep, archive, path) = walvault_tests::local_archive().unwrap();
        let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"]).unwrap();
        pg.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)").await.unwrap();
        let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
        agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
        assert_eq!(agent.stop().unwrap(), 0);
        archives.push((keep, archive, path));
    }
    let (code, err) = run_once(&archives[0].1);
    assert_eq!(code, 0, "{err}");
    // The copy belongs to cluster a: cluster b's archive is refused, nothing written.
    let (code, err) = run_once(&archives[1].1);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another cluster") && err.contains("HINT"), "{err}");
    // A damaged object in the source is not copied: the pass fails naming it.
    let seg = std::fs::read_dir(archives[0].2.join("wal/00000001")).unwrap().flatten().next().unwrap().path();
    let key = format!("wal/00000001/{}", seg.file_name().unwrap().to_str().unwrap());
    let store = S3Store::connect(&bucket, "x", &s3.options()).await.unwrap();
    store.delete(std::slice::from_ref(&key)).await.unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    std::fs::write(&seg, bytes).unwrap();
    let (code, err) = run_once(&archives[0].1);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&key) && err.contains("not copied"), "{err}");
    assert!(store.list_all(&key).await.unwrap().is_empty(), "the damaged object was not copied");
}
