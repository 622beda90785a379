//! walvault-agent against real PostgreSQL (each major of the matrix) and a real S3 server:
//! byte-identical segments under load, archive latency, crash and restart of either side,
//! promotion, archive outage, split brain, memory under a bulk load, and the errors a user meets
//! first.
//!
//! Oracles: the server's own `pg_wal` files (byte for byte) and its reported LSNs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use walvault_shared::lsn::{Lsn, SegNo, TimelineId};
use walvault_shared::storage::local::LocalStore;
use walvault_shared::storage::s3::S3Store;
use walvault_shared::storage::ObjectStore;
use walvault_shared::wal::SegmentName;
use walvault_tests::agent::{catalog, read_segment, read_wal, Agent};
use walvault_tests::pg::{PgCluster, PgOptions};
use walvault_tests::s3server::{S3Server, ACCESS_KEY, SECRET_KEY};

const SEG: u64 = 16 << 20;

/// Keep every segment in pg_wal so archived segments can be compared with the server's files.
fn opts() -> PgOptions {
    PgOptions { settings: vec!["wal_keep_size = '4GB'".into(), "max_wal_size = '4GB'".into()], ..Default::default() }
}

/// Where the agent writes: a local directory or an S3 bucket; plus a handle to read it back.
struct Archive {
    url: String,
    store: Arc<dyn ObjectStore>,
    flags: Vec<String>,
    env: Vec<(String, String)>,
    server: Option<S3Server>,
    _dir: Option<tempfile::TempDir>,
}

impl Archive {
    fn local() -> Self {
        let (dir, _, path) = walvault_tests::local_archive().unwrap();
        let store = LocalStore::open(&path).unwrap();
        Archive {
            url: format!("file://{}", path.display()),
            store: Arc::new(store),
            flags: vec![],
            env: vec![],
            server: None,
            _dir: Some(dir),
        }
    }

    async fn s3(server: S3Server) -> Self {
        let bucket = server.new_bucket("agent").await.unwrap();
        let store = S3Store::connect(&bucket, "prod/main", &server.options()).await.unwrap();
        Archive {
            url: format!("s3://{bucket}/prod/main"),
            store: Arc::new(store),
            flags: vec!["--s3-endpoint".into(), server.endpoint.clone(), "--s3-force-path-style".into()],
            env: vec![
                ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
                ("AWS_REGION".into(), "us-east-1".into()),
            ],
            server: Some(server),
            _dir: None,
        }
    }

    fn agent(&self, pg_url: &str, extra: &[&str]) -> Agent {
        let mut flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        flags.extend_from_slice(extra);
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Agent::start_with_env(pg_url, &self.url, &flags, &env).unwrap()
    }
}

async fn flush_lsn(pg: &PgCluster) -> Lsn {
    pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap()
}

/// Every whole segment in the archive on `tli` equals the server's pg_wal file; returns how
/// many were compared.
async fn assert_segments_identical(store: &Arc<dyn ObjectStore>, pg: &PgCluster, tli: TimelineId) -> usize {
    let cat = catalog(store, SEG).await.unwrap();
    let segs: Vec<SegNo> = cat.timelines.get(&tli).map(|t| t.segments.iter().copied().collect()).unwrap_or_default();
    let mut compared = 0;
    for s in segs {
        let name = SegmentName::new(tli, s).file_name(SEG);
        let ours = read_segment(store, tli, s, SEG).await.unwrap();
        let theirs = pg.read_pg_wal(&name).unwrap();
        assert!(ours == theirs, "archived segment {name} differs from pg_wal/{name}");
        compared += 1;
    }
    compared
}

/// No gap on `tli` from `from` to `to`, and no chunk left beside a whole segment.
async fn assert_contiguous(store: &Arc<dyn ObjectStore>, tli: TimelineId, from: Lsn, to: Lsn) {
    let cat = catalog(store, SEG).await.unwrap();
    let end = cat.contiguous_end(tli, from);
    assert!(
        end >= to,
        "archive on timeline {tli} is contiguous only from {from} to {end}, expected to reach {to}: {:?}",
        cat.ranges(tli)
    );
    assert!(cat.redundant_chunks().is_empty(), "chunks left beside their segments: {:?}", cat.redundant_chunks());
}

async fn wait_streaming(agent: &mut Agent) {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = agent.status().await {
            if s["streaming"] == true {
                return;
            }
        }
        assert!(agent.is_running(), "agent exited:\n{}", agent.log_text());
        assert!(t0.elapsed() < Duration::from_secs(60), "agent not streaming after 60 s:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn identical_under_pgbench(archive: Archive) {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("identical", opts()).unwrap();
    let mut agent = archive.agent(&pg.url(), &["--chunk-interval", "200ms"]);
    wait_streaming(&mut agent).await;
    let first = flush_lsn(&pg).await.segment_start(SEG);
    pg.run_program("pgbench", &["-i", "-s", "5", "-q", "postgres"]).unwrap();
    pg.run_program("pgbench", &["-T", "5", "-c", "2", "-n", "postgres"]).unwrap();
    pg.switch_wal().await.unwrap();
    pg.execute("CREATE TABLE after_switch AS SELECT 1 AS x").await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0, "clean shutdown exits 0:\n{}", agent.log_text());
    let n = assert_segments_identical(&archive.store, &pg, TimelineId(1)).await;
    assert!(n >= 5, "expected several whole segments, compared {n}");
    assert_contiguous(&archive.store, TimelineId(1), first, end).await;
    // The unfinished last segment is in the archive as chunks, byte-identical too.
    let tail_start = end.segment_start(SEG);
    let tail = read_wal(&archive.store, TimelineId(1), tail_start, end, SEG).await.unwrap();
    let name = SegmentName::containing(TimelineId(1), end, SEG).file_name(SEG);
    assert!(tail == pg.read_pg_wal(&name).unwrap()[..tail.len()], "chunks of {name} differ from pg_wal");
    assert!(!agent.log_text().contains("ERROR"), "unexpected errors:\n{}", agent.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_byte_identical_under_pgbench_local() {
    identical_under_pgbench(Archive::local()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_byte_identical_under_pgbench_s3() {
    identical_under_pgbench(Archive::s3(S3Server::shared().await.unwrap()).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_is_archived_within_chunk_interval() {
    let pg = PgCluster::start_new("latency", opts()).unwrap();
    let archive = Archive::local();
    let mut agent = archive.agent(&pg.url(), &["--chunk-interval", "1s"]);
    wait_streaming(&mut agent).await;
    pg.execute("CREATE TABLE t (at timestamptz DEFAULT clock_timestamp())").await.unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        pg.execute("INSERT INTO t DEFAULT VALUES").await.unwrap();
        let lsn = flush_lsn(&pg).await;
        let took = agent.wait_archived(lsn, Duration::from_secs(30)).await.unwrap();
        worst = worst.max(took);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // chunk_interval (1 s) plus slack for a loaded 2-core machine; the distribution is in bench/.
    assert!(worst < Duration::from_secs(4), "a commit took {worst:?} to be archived");
    // A burst of commits, then silence: the last ones arrive while the agent's read waits out
    // its coalescing window with the socket's low-water mark raised; lowering it before the
    // read must wake the read for them (else they wait for the server's next keepalive).
    for _ in 0..3 {
        for _ in 0..200 {
            pg.execute("INSERT INTO t DEFAULT VALUES").await.unwrap();
        }
        let lsn = flush_lsn(&pg).await;
        let took = agent.wait_archived(lsn, Duration::from_secs(30)).await.unwrap();
        assert!(took < Duration::from_secs(4), "the last commit of a burst took {took:?} to be archived");
    }
    // Metrics and health while streaming.
    let (code, metrics) = agent.http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for m in ["walvault_archived_lsn", "walvault_archive_lag_bytes", "walvault_chunks_archived_total", "walvault_up 1"]
    {
        assert!(metrics.contains(m), "{m} missing from /metrics:\n{metrics}");
    }
    assert_eq!(agent.http_get("/healthz").await.unwrap().0, 200);
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_agent_mid_load_resumes_without_gap() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("kill9", opts()).unwrap();
    let archive = Archive::local();
    let mut agent = archive.agent(&pg.url(), &["--chunk-interval", "200ms", "--chunk-max-bytes", "256KiB"]);
    wait_streaming(&mut agent).await;
    let first = flush_lsn(&pg).await.segment_start(SEG);
    pg.run_program("pgbench", &["-i", "-s", "2", "-q", "postgres"]).unwrap();
    let load = std::thread::spawn({
        let sock = pg.socket_dir.clone();
        let port = pg.port;
        move || {
            let mut c = walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pgbench").unwrap()).unwrap();
            c.args(["-T", "8", "-c", "2", "-n", "postgres"])
                .env("PGHOST", sock)
                .env("PGPORT", port.to_string())
                .env("PGUSER", "postgres");
            c.output().unwrap()
        }
    });
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        agent.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent.restart().unwrap();
        wait_streaming(&mut agent).await;
    }
    assert!(load.join().unwrap().status.success());
    pg.switch_wal().await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    assert!(assert_segments_identical(&archive.store, &pg, TimelineId(1)).await >= 2);
    assert_contiguous(&archive.store, TimelineId(1), first, end).await;
    // The slot never lets PostgreSQL drop WAL that is not archived: it trails the archive.
    let restart: Lsn = pg
        .query_one_text("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'walvault'")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let cat = catalog(&archive.store, SEG).await.unwrap();
    assert!(
        cat.contiguous_end(TimelineId(1), restart.segment_start(SEG)) >= restart,
        "slot restart_lsn {restart} ahead of the archive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_fast_and_immediate() {
    let pg = PgCluster::start_new("pgrestart", opts()).unwrap();
    let archive = Archive::local();
    let mut agent = archive.agent(&pg.url(), &["--chunk-interval", "200ms"]);
    wait_streaming(&mut agent).await;
    pg.execute("CREATE TABLE t (v int)").await.unwrap();
    for mode in ["fast", "immediate"] {
        pg.execute("INSERT INTO t SELECT generate_series(1, 1000)").await.unwrap();
        pg.restart(mode).unwrap();
        pg.execute("INSERT INTO t SELECT generate_series(1, 1000)").await.unwrap();
        let lsn = flush_lsn(&pg).await;
        agent.wait_archived(lsn, Duration::from_secs(60)).await.unwrap();
    }
    let s = agent.status().await.unwrap();
    assert!(s["reconnects"].as_u64().unwrap() >= 2, "{s}");
    pg.switch_wal().await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    assert!(assert_segments_identical(&archive.store, &pg, TimelineId(1)).await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_follows_the_new_primary_and_timeline() {
    walvault_tests::init_logging();
    let primary = PgCluster::start_new("primary", opts()).unwrap();
    primary.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)").await.unwrap();
    let standby = PgCluster::start_standby_of(&primary, "standby").unwrap();
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres target_session_attrs=read-write connect_timeout=5",
        primary.port, standby.port
    );
    let archive = Archive::local();
    let mut agent = archive.agent(&url, &["--chunk-interval", "200ms"]);
    wait_streaming(&mut agent).await;
    primary.execute("INSERT INTO t SELECT generate_series(2, 5000)").await.unwrap();
    let lsn = flush_lsn(&primary).await;
    agent.wait_archived(lsn, Duration::from_secs(60)).await.unwrap();
    // Wait for the standby to replay, then fail over.
    let mut replayed = false;
    for _ in 0..600 {
        if standby.query_one_text("SELECT count(*) FROM t").await.unwrap() == "5000" {
            replayed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replayed, "the standby replayed the primary's rows within 30 s");
    primary.stop("fast").unwrap();
    standby.promote().unwrap();
    standby.execute("INSERT INTO t VALUES (-1)").await.unwrap();
    let after = flush_lsn(&standby).await;
    agent.wait_archived(after, Duration::from_secs(120)).await.unwrap();
    let cat = catalog(&archive.store, SEG).await.unwrap();
    assert!(cat.histories.contains(&TimelineId(2)), "00000002.history archived");
    // No gap across the promotion: timeline 1 is archived up to the switch point that the new
    // primary's history file names.
    let history = standby.read_pg_wal("00000002.history").unwrap();
    let history = walvault_shared::wal::TimelineHistory::parse(std::str::from_utf8(&history).unwrap()).unwrap();
    let switchpoint = history.entries[0].switchpoint;
    let tli1 = cat.ranges(TimelineId(1));
    assert!(tli1.last().unwrap().1 >= switchpoint, "timeline 1 archived to {:?}, switch at {switchpoint}", tli1);
    let switch = cat.ranges(TimelineId(2));
    assert!(!switch.is_empty(), "WAL of timeline 2 archived");
    // Timeline 2 is archived from the start of the switch segment, byte-identical to the new
    // primary's own file.
    let tli2_start = switch[0].0;
    assert!(tli2_start.is_segment_start(SEG));
    let bytes = read_wal(&archive.store, TimelineId(2), tli2_start, after, SEG).await.unwrap();
    let name = SegmentName::containing(TimelineId(2), tli2_start, SEG).file_name(SEG);
    let file = standby.read_pg_wal(&name).unwrap();
    let n = bytes.len().min(file.len());
    assert!(bytes[..n] == file[..n], "timeline 2 WAL differs from the new primary's {name}");
    let status = agent.status().await.unwrap();
    assert_eq!(status["timeline"], 2, "{status}");
    assert_eq!(agent.stop().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_outage_is_retried_then_caught_up() {
    walvault_tests::init_logging();
    let server = S3Server::start().await.unwrap();
    let endpoint = server.endpoint.clone();
    let mut archive = Archive::s3(server).await;
    let pg = PgCluster::start_new("outage", opts()).unwrap();
    let mut agent = archive.agent(&pg.url(), &["--chunk-interval", "200ms", "--upload-timeout", "3s"]);
    wait_streaming(&mut agent).await;
    let first = flush_lsn(&pg).await.segment_start(SEG);
    pg.execute("CREATE TABLE t (v text)").await.unwrap();
    // Take the S3 server away while commits continue.
    archive.server.as_mut().unwrap().kill();
    for i in 0..20 {
        pg.execute(&format!("INSERT INTO t SELECT repeat('{i}', 1000) FROM generate_series(1, 200)")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = flush_lsn(&pg).await;
    let s = agent.status().await.unwrap();
    assert!(
        s["archived_lsn"].as_str().unwrap().parse::<Lsn>().unwrap() < during,
        "nothing can be archived while S3 is down: {s}"
    );
    assert!(s["upload_retries"].as_u64().unwrap() > 0, "{s}");
    assert!(s["lag_bytes"].as_u64().unwrap() > 0, "{s}");
    let s3 = archive.server.as_mut().unwrap();
    s3.restart().await.unwrap();
    assert_eq!(s3.endpoint, endpoint);
    pg.switch_wal().await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(180)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    assert_contiguous(&archive.store, TimelineId(1), first, end).await;
    assert!(assert_segments_identical(&archive.store, &pg, TimelineId(1)).await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_stops_the_agent_and_leaves_the_archive_untouched() {
    let a = PgCluster::start_new("brain-a", opts()).unwrap();
    a.execute("CREATE TABLE t (who text)").await.unwrap();
    a.execute("SELECT pg_create_physical_replication_slot('walvault', true)").await.unwrap();
    a.stop("fast").unwrap();
    // B is a copy of A: same system identifier, same slot; from here the two diverge.
    let b = a.clone_stopped("brain-b").unwrap();
    a.start().unwrap();
    b.start().unwrap();
    let archive = Archive::local();
    let mut agent_a = archive.agent(&a.url(), &["--chunk-interval", "200ms"]);
    wait_streaming(&mut agent_a).await;
    a.execute("INSERT INTO t SELECT 'a' FROM generate_series(1, 5000)").await.unwrap();
    let lsn_a = flush_lsn(&a).await;
    agent_a.wait_archived(lsn_a, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent_a.stop().unwrap(), 0);
    let before: Vec<_> = archive.store.list_all("").await.unwrap().into_iter().map(|m| (m.key, m.size)).collect();
    b.execute("INSERT INTO t SELECT 'b' FROM generate_series(1, 7000)").await.unwrap();
    let mut agent_b = archive.agent(&b.url(), &["--chunk-interval", "200ms"]);
    let code = agent_b.wait_exit(Duration::from_secs(60)).unwrap();
    let log = agent_b.log_text();
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("split brain") && log.contains("HINT"), "{log}");
    let mut after: Vec<_> = archive.store.list_all("").await.unwrap().into_iter().map(|m| (m.key, m.size)).collect();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "the archive is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_clearly_and_writes_nothing() {
    let pg = PgCluster::start_new("badinput", opts()).unwrap();
    // Password authentication (SCRAM) for TCP connections.
    pg.execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE rep LOGIN REPLICATION PASSWORD 'right-pw'")
        .await
        .unwrap();
    // And MD5, for a role whose password is stored as MD5 (deprecated by PostgreSQL 18, still
    // found on older installations).
    pg.execute("SET password_encryption = 'md5'; CREATE ROLE md5rep LOGIN REPLICATION PASSWORD 'md5-pw'")
        .await
        .unwrap();
    let hba = pg.data.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba)
        .unwrap()
        .replace("127.0.0.1/32            trust", "127.0.0.1/32            scram-sha-256");
    let text = format!("host all md5rep 127.0.0.1/32 md5\nhost replication md5rep 127.0.0.1/32 md5\n{text}");
    std::fs::write(&hba, text).unwrap();
    pg.execute("SELECT pg_reload_conf()").await.unwrap();
    // Wait until the reload took effect: a connection without a password is refused.
    let nopw = format!("host=127.0.0.1 port={} user=rep dbname=postgres", pg.port);
    let mut refused = false;
    for _ in 0..200 {
        if tokio_postgres::connect(&nopw, tokio_postgres::NoTls).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "pg_hba.conf's password lines in force");

    // Wrong password: exit 1, PostgreSQL's message, nothing written.
    let archive = Archive::local();
    let mut agent = archive.agent(&format!("postgresql://rep:wrong-pw@127.0.0.1:{}/postgres", pg.port), &[]);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 1);
    let log = agent.log_text();
    assert!(log.contains("password authentication failed") && log.contains("28P01"), "{log}");
    assert!(!log.contains("wrong-pw"), "the password is never logged");
    assert!(archive.store.list_all("").await.unwrap().is_empty(), "nothing written");

    // Wrong host (nothing listens there): exit 1 with a hint.
    let port = walvault_tests::free_port().unwrap();
    let mut agent = archive.agent(&format!("postgresql://rep@127.0.0.1:{port}/postgres?connect_timeout=5"), &[]);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 1);
    assert!(agent.log_text().contains("could not open a replication connection"), "{}", agent.log_text());
    assert!(archive.store.list_all("").await.unwrap().is_empty(), "nothing written");

    // The right password (SCRAM) works.
    let good = format!("postgresql://rep:right-pw@127.0.0.1:{}/postgres", pg.port);
    let mut agent = archive.agent(&good, &[]);
    wait_streaming(&mut agent).await;
    assert_eq!(agent.stop().unwrap(), 0);
    let stamped = archive.store.list_all("").await.unwrap();
    assert!(stamped.iter().any(|m| m.key == "walvault.repository"));
    // MD5: the wrong password is refused as such, the right one streams.
    let mut agent = archive.agent(&format!("postgresql://md5rep:wrong-pw@127.0.0.1:{}/postgres", pg.port), &[]);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 1);
    assert!(agent.log_text().contains("28P01"), "{}", agent.log_text());
    let mut agent = archive.agent(&format!("postgresql://md5rep:md5-pw@127.0.0.1:{}/postgres", pg.port), &[]);
    wait_streaming(&mut agent).await;
    assert_eq!(agent.stop().unwrap(), 0);
    let stamped = archive.store.list_all("").await.unwrap();

    // Another cluster's archive: refused with a hint, nothing added.
    let other = PgCluster::start_new("other", opts()).unwrap();
    let mut agent = archive.agent(&other.url(), &[]);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 1);
    let log = agent.log_text();
    assert!(log.contains("belongs to another cluster") && log.contains("HINT"), "{log}");
    let now = archive.store.list_all("").await.unwrap();
    assert_eq!(now.len(), stamped.len(), "nothing written to the other cluster's archive");

    // An archive path that cannot be created: exit 1, clear message.
    let file = tempfile::NamedTempFile::new_in(walvault_tests::test_root().unwrap()).unwrap();
    let mut agent = Agent::start(&good, &format!("{}/archive", file.path().display()), &[]).unwrap();
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 1);
    assert!(agent.log_text().contains("cannot create archive directory"), "{}", agent.log_text());

    // A misspelt config key: usage error, exit 2.
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "chunk_intervall = \"1s\"\n").unwrap();
    let mut agent = Agent::start(&good, &archive.url, &["--config", cfg.path().to_str().unwrap()]).unwrap();
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 2);
    assert!(agent.log_text().contains("unknown field"), "{}", agent.log_text());
}

/// TLS with libpq's sslmode semantics, against a server that only accepts SSL connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sslmodes() {
    let pg = PgCluster::init("tls", opts()).unwrap();
    let certs = pg.dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh").arg("-c").arg(cmd).current_dir(&certs).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // A CA, a server certificate for localhost/127.0.0.1 signed by it, and an unrelated CA.
    sh("openssl req -new -x509 -days 2 -nodes -subj /CN=walvault-test-ca -keyout ca.key -out ca.crt 2>/dev/null");
    sh("openssl req -new -x509 -days 2 -nodes -subj /CN=other-ca -keyout other.key -out other.crt 2>/dev/null");
    sh("openssl req -new -nodes -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null");
    sh("printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext.cnf && openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out server.crt 2>/dev/null");
    for f in ["server.key", "server.crt"] {
        walvault_tests::pg::chown_to_pg(&certs.join(f)).unwrap();
        std::fs::set_permissions(certs.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    walvault_tests::pg::chown_to_pg(&certs).unwrap();
    pg.add_settings(&[
        "ssl = on",
        &format!("ssl_cert_file = '{}'", certs.join("server.crt").display()),
        &format!("ssl_key_file = '{}'", certs.join("server.key").display()),
    ])
    .unwrap();
    // Only SSL connections over TCP.
    let hba = pg.data.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap().replace("\nhost ", "\nhostssl ");
    std::fs::write(&hba, text).unwrap();
    pg.start().unwrap();
    let archive = Archive::local();
    let ca = certs.join("ca.crt");
    // localhost resolves to 127.0.0.1 here; the certificate names both.
    let url = |mode: &str, root: &std::path::Path| {
        format!("postgresql://postgres@localhost:{}/postgres?sslmode={mode}&sslrootcert={}", pg.port, root.display())
    };
    // allow behaves as prefer (TLS first): it connects to a server that only accepts TLS.
    for mode in ["verify-full", "verify-ca", "require", "prefer", "allow"] {
        let mut agent = archive.agent(&url(mode, &ca), &[]);
        wait_streaming(&mut agent).await;
        assert_eq!(agent.stop().unwrap(), 0, "{mode}");
    }
    // disable: the server refuses non-SSL connections.
    let mut agent = archive.agent(&url("disable", &ca), &[]);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 1);
    assert!(agent.log_text().contains("no pg_hba.conf entry"), "{}", agent.log_text());
    // verify-full against the wrong CA: refused.
    let mut agent = archive.agent(&url("verify-full", &certs.join("other.crt")), &[]);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).unwrap(), 1);
    assert!(agent.log_text().contains("TLS handshake"), "{}", agent.log_text());
}

/// Peak resident memory (VmHWM, KiB) of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The documented memory bound (docs/operations.md, "Memory"), for this debug build with small
/// chunks: a bulk load (about 500 MiB of WAL as fast as PostgreSQL writes it) streamed with
/// 1 MiB chunks and 2 uploads in flight keeps the agent's peak RSS under 48 MiB. The bound
/// is a bound, not a timing: it holds whatever the speed, because the agent stops reading when
/// its queue is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_load_streams_within_the_memory_bound() {
    let pg = PgCluster::start_new("memory", opts()).unwrap();
    let archive = Archive::local();
    let mut agent = archive.agent(&pg.url(), &["--chunk-max-bytes", "1MiB", "--upload-concurrency", "2"]);
    wait_streaming(&mut agent).await;
    let start = flush_lsn(&pg).await;
    pg.run_program("pgbench", &["-i", "-s", "30", "-q", "postgres"]).unwrap();
    let end = flush_lsn(&pg).await;
    assert!(end.0 - start.0 > 300 << 20, "a real bulk load: {} MiB of WAL", (end.0 - start.0) >> 20);
    agent.wait_archived(end, Duration::from_secs(300)).await.unwrap();
    let kib = peak_rss_kib(agent.pid().unwrap());
    eprintln!("peak RSS {} MiB for {} MiB of WAL", kib >> 10, (end.0 - start.0) >> 20);
    assert!(kib < 48 << 10, "peak RSS {} MiB is over the 48 MiB bound", kib >> 10);
    assert_eq!(agent.stop().unwrap(), 0);
}

/// The fault-injecting store under the running agent (debug builds read WALVAULT_TEST_FAULTS)
/// while pgbench writes: indeterminate writes (the put happened, the agent was told it timed
/// out), random failures, every call hanging longer than `upload_timeout`, then a listing that
/// lags writes across a kill -9 and a restart. Judged by the
/// server's own pg_wal (every archived segment byte-identical), contiguity, and the slot: it
/// never released WAL the archive did not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_store_faults_under_pgbench_lose_nothing() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("faults", opts()).unwrap();
    let archive = Archive::local();
    let faults = walvault_tests::test_root().unwrap().join(format!("faults-{:08x}", rand::random::<u32>()));
    std::fs::write(&faults, "").unwrap();
    let mut flags: Vec<&str> = archive.flags.iter().map(String::as_str).collect();
    flags.extend_from_slice(&["--chunk-interval", "200ms", "--upload-timeout", "1s", "--no-backups"]);
    let mut agent =
        Agent::start_with_env(&pg.url(), &archive.url, &flags, &[("WALVAULT_TEST_FAULTS", faults.to_str().unwrap())])
            .unwrap();
    wait_streaming(&mut agent).await;
    let start = flush_lsn(&pg).await;
    pg.run_program("pgbench", &["-i", "-s", "3", "-q", "postgres"]).unwrap();
    let load = {
        let (sock, port) = (pg.socket_dir.clone(), pg.port);
        std::thread::spawn(move || {
            let mut c = walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pgbench").unwrap()).unwrap();
            c.args(["-T", "17", "-c", "2", "-n", "postgres"]).env("PGHOST", sock).env("PGPORT", port.to_string());
            c.env("PGUSER", "postgres").output().unwrap()
        })
    };
    let slot_never_ahead = |pg: &PgCluster, store: Arc<dyn ObjectStore>| {
        let url = pg.conn_str("postgres", "postgres");
        async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            // What PostgreSQL was told is flushed must be in the archive.
            let flushed: String = c
                .query_one("SELECT coalesce(max(flush_lsn)::text, '0/0') FROM pg_stat_replication", &[])
                .await
                .unwrap()
                .get(0);
            let flushed: Lsn = flushed.parse().unwrap();
            let cat = catalog(&store, SEG).await.unwrap();
            let archived = cat.contiguous_end(TimelineId(1), start.segment_start(SEG));
            assert!(
                archived >= flushed,
                "PostgreSQL was told {flushed} is flushed; the archive holds only up to {archived}"
            );
        }
    };
    for (cmd, secs) in [("fail-after 6 put", 2), ("fail 0.4 put", 3), ("hang", 3), ("fail 0.3", 2), ("", 1)] {
        std::fs::write(&faults, cmd).unwrap();
        for _ in 0..secs * 2 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            slot_never_ahead(&pg, archive.store.clone()).await;
        }
    }
    let s = agent.status().await.unwrap();
    assert!(s["upload_retries"].as_u64().unwrap() > 0, "faults were injected and retried: {s}");
    // A listing that lags writes by 4 s, across a kill -9 and a restart: the restarted agent
    // does not see its newest objects when it resumes; it must neither lose nor contradict them.
    std::fs::write(&faults, "list-lag 4").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.kill9();
    agent.restart().unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        slot_never_ahead(&pg, archive.store.clone()).await;
    }
    std::fs::write(&faults, "").unwrap();
    // The lagging listing must be over before the clean stop's sweep can see every chunk (with
    // it in force, chunks it hides stay for the next start to remove, by design).
    assert!(
        walvault_tests::fault_applied(&faults, "", Duration::from_secs(10)).await,
        "the agent took the cleared fault file within 10 s"
    );
    assert!(load.join().unwrap().status.success());
    pg.switch_wal().await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    assert_contiguous(&archive.store, TimelineId(1), start.segment_start(SEG), end).await;
    assert!(assert_segments_identical(&archive.store, &pg, TimelineId(1)).await >= 3);
}

/// A WAL record larger than a whole chunk (a 3 MiB logical message with 1 MiB chunks), and a
/// storm of segment switches: the archive still holds exactly pg_wal's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_larger_than_a_chunk_and_switch_storms_archive_exactly() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("bigrecord", opts()).unwrap();
    let archive = Archive::local();
    let mut agent = archive.agent(&pg.url(), &["--chunk-max-bytes", "1MiB", "--chunk-interval", "200ms"]);
    wait_streaming(&mut agent).await;
    let start = flush_lsn(&pg).await;
    // One WAL record of 3 MiB: pg_logical_emit_message writes its payload as a single record.
    let rec_start: Lsn = pg
        .query_one_text("SELECT pg_logical_emit_message(true, 'walvault-test', repeat('x', 3 * 1024 * 1024))::text")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let after = flush_lsn(&pg).await;
    assert!(after.0 - rec_start.0 >= 3 << 20 || after.0 - start.0 >= 3 << 20, "a multi-MiB record: {start} .. {after}");
    // A switch storm: many segment switches with a little WAL between.
    pg.execute("CREATE TABLE s (v int)").await.unwrap();
    for i in 0..40 {
        pg.execute(&format!("INSERT INTO s VALUES ({i})")).await.unwrap();
        pg.switch_wal().await.unwrap();
    }
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    assert_contiguous(&archive.store, TimelineId(1), start.segment_start(SEG), end).await;
    assert!(assert_segments_identical(&archive.store, &pg, TimelineId(1)).await >= 40);
}

/// Two agents writing the same cluster's WAL into one archive at once (two slots): write-once
/// puts meet identical content (AlreadyThere) and carry on; the archive stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_archive_write_the_same_bytes_once() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("twoagents", opts()).unwrap();
    let archive = Archive::local();
    let mut a = archive.agent(&pg.url(), &["--chunk-interval", "200ms", "--slot", "one"]);
    let mut b = archive.agent(&pg.url(), &["--chunk-interval", "200ms", "--slot", "two"]);
    wait_streaming(&mut a).await;
    wait_streaming(&mut b).await;
    let start = flush_lsn(&pg).await;
    pg.run_program("pgbench", &["-i", "-s", "2", "-q", "postgres"]).unwrap();
    pg.switch_wal().await.unwrap();
    let end = flush_lsn(&pg).await;
    a.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    b.wait_archived(end, Duration::from_secs(120)).await.unwrap();
    assert!(a.is_running() && b.is_running(), "both agents carry on:\n{}\n{}", a.log_text(), b.log_text());
    assert_eq!(a.stop().unwrap(), 0);
    assert_eq!(b.stop().unwrap(), 0);
    assert!(
        a.log_text().contains("already archived with the same content")
            || b.log_text().contains("already archived with the same content")
    );
    assert_contiguous(&archive.store, TimelineId(1), start.segment_start(SEG), end).await;
    assert!(assert_segments_identical(&archive.store, &pg, TimelineId(1)).await >= 2);
}

/// A slot the server invalidated while the agent was down (max_slot_wal_keep_size exceeded):
/// the agent says so, recreates it and archives on; the gap in the archive is what `list` and
/// `audit` report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_is_recreated_and_the_gap_is_reported() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new(
        "slotlost",
        PgOptions {
            settings: vec![
                "wal_keep_size = 0".into(),
                "max_slot_wal_keep_size = '32MB'".into(),
                "max_wal_size = '64MB'".into(),
                "min_wal_size = '32MB'".into(),
            ],
            ..Default::default()
        },
    )
    .unwrap();
    let archive = Archive::local();
    let mut agent = archive.agent(&pg.url(), &["--chunk-interval", "200ms", "--no-backups"]);
    wait_streaming(&mut agent).await;
    pg.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)").await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    // While the agent is down, far more WAL than the slot may keep, and checkpoints.
    pg.run_program("pgbench", &["-i", "-s", "8", "-q", "postgres"]).unwrap();
    for _ in 0..3 {
        pg.switch_wal().await.unwrap();
        pg.execute("CHECKPOINT").await.unwrap();
    }
    let status =
        pg.query_one_text("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walvault'").await.unwrap();
    assert_eq!(status, "lost", "the server invalidated the slot");
    agent.restart().unwrap();
    wait_streaming(&mut agent).await;
    pg.execute("INSERT INTO t VALUES (2)").await.unwrap();
    let end = flush_lsn(&pg).await;
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    let s = agent.status().await.unwrap();
    assert!(s["last_error"]["message"].as_str().unwrap_or("").contains("invalidated"), "{s}");
    assert_eq!(agent.stop().unwrap(), 0);
    let recover = |args: &[&str]| {
        let o = std::process::Command::new(walvault_tests::agent::workspace_binary("walvault-recover").unwrap())
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let l = recover(&["list", "--archive", &archive.url, "--json"]);
    assert!(l["timelines"][0]["wal_ranges"].as_array().unwrap().len() >= 2, "list shows the gap: {l}");
    let a = recover(&["audit", "--archive", &archive.url, "--json"]);
    assert!(!a["gaps"].as_array().unwrap().is_empty() && a["pass"] == false, "audit reports the gap: {a}");
}
