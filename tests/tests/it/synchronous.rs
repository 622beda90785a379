//! Synchronous mode (`walvault-agent run --synchronous` named in `synchronous_standby_names`):
//! a commit returns only once its WAL is durable in the archive. Judged by PostgreSQL itself
//! (commits wait while the agent is gone), by a restore from the archive alone after the agent
//! was killed and the server stopped in immediate mode (every committed row is there), and by
//! the flush position each returned commit's LSN is checked against.

use std::time::{Duration, Instant};

use walvault_shared::lsn::Lsn;
use walvault_tests::agent::Agent;
use walvault_tests::cli::{restore_and_start, run};
use walvault_tests::pg::{PgCluster, PgOptions};
use walvault_tests::s3server::S3Server;

fn sync_opts() -> PgOptions {
    PgOptions {
        settings: vec!["wal_keep_size = '1GB'".into(), "synchronous_standby_names = 'walvault'".into()],
        ..Default::default()
    }
}

/// `clients` connections insert `per_client` rows each, one per transaction; returns the ids
/// committed.
async fn commit_rows(pg: &PgCluster, clients: i32, per_client: i32) -> Vec<i32> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = pg.conn_str("postgres", "postgres");
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut out = Vec::new();
            for i in 0..per_client {
                let id = c * per_client + i + 1;
                client.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
                out.push(id);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// One client, one row per commit: right after each COMMIT returns, the agent's archived
/// watermark must already be past the row's insert record (the commit record follows it, and
/// PostgreSQL returned only once the agent reported the commit's end as flushed).
async fn assert_each_commit_durable(pg: &PgCluster, agent: &Agent, ids: std::ops::RangeInclusive<i32>) {
    let c = pg.connect().await.unwrap();
    for id in ids {
        let before: String = c
            .query_one("INSERT INTO t (id) VALUES ($1) RETURNING pg_current_wal_insert_lsn()::text", &[&id])
            .await
            .unwrap()
            .get(0);
        let before: Lsn = before.parse().unwrap();
        let archived = agent.archived_lsn().await.unwrap();
        assert!(archived > before, "commit of row {id} returned with the archive at {archived}, before {before}");
    }
}

async fn ids(pg: &PgCluster) -> Vec<i32> {
    let c = pg.connect().await.unwrap();
    c.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// `journal`: the local archive's root, whose commit journal must hold the newest chunks when
/// the agent dies (the restore then reads them from there).
async fn lose_nothing(archive: &str, flags: &[&str], journal: Option<&std::path::Path>) {
    let pg = PgCluster::start_new("sync", sync_opts()).unwrap();
    let mut agent = Agent::start(&pg.url(), archive, &[flags, &["--synchronous", "--no-backups"]].concat()).unwrap();
    // Commits wait for the agent: the table's creation returns once the agent streams.
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let (code, out, err) =
        run("walvault-agent", &[&["backup", "--pg-url", &pg.url(), "--archive", archive][..], flags].concat());
    assert_eq!(code, 0, "{out}{err}");
    let s = agent.status().await.unwrap();
    assert_eq!(s["synchronous"], true, "{s}");
    let sync_state = pg
        .query_one_text("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walvault'")
        .await
        .unwrap();
    assert_eq!(sync_state, "sync", "PostgreSQL counts the agent as its synchronous standby");
    let t0 = Instant::now();
    let committed = commit_rows(&pg, 4, 125).await;
    let elapsed = t0.elapsed();
    assert_eq!(committed.len(), 500);
    eprintln!("500 synchronous commits from 4 clients in {elapsed:?}");
    assert_each_commit_durable(&pg, &agent, 501..=520).await;
    // Right after the last commit returned: the agent dies, the server stops without a
    // checkpoint. The archive alone must hold every committed row.
    agent.kill9();
    pg.stop("immediate").unwrap();
    if let Some(root) = journal {
        use walvault_shared::storage::journal;
        let live = journal::scan(&root.join(journal::DIR)).unwrap().entries;
        assert!(!live.is_empty(), "a synchronous agent on a local archive writes chunks through its journal");
        assert!(live.keys().all(|k| !root.join(k).exists()), "journaled chunks are not files");
        eprintln!("{} chunks in the journal when the agent died", live.len());
    }
    let (r, _) = restore_and_start(archive, &[flags, &["--latest"]].concat()).await;
    assert_eq!(ids(&r).await, (1..=520).collect::<Vec<_>>(), "every committed row, none lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_loses_no_committed_row_local() {
    walvault_tests::init_logging();
    let (_keep, archive, root) = walvault_tests::local_archive().unwrap();
    lose_nothing(&archive, &[], Some(&root)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_loses_no_committed_row_s3() {
    walvault_tests::init_logging();
    let s3 = S3Server::shared().await.unwrap();
    let bucket = s3.new_bucket("sync").await.unwrap();
    let _ = s3.options(); // the AWS_* variables the agent and the restored server inherit
    let archive = format!("s3://{bucket}/pg");
    lose_nothing(&archive, &["--s3-endpoint", s3.endpoint.as_str(), "--s3-force-path-style"], None).await;
}

/// Commits wait while the archive fails and while the agent is gone, and are released once
/// their WAL is durable; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_commits_wait_for_a_failing_archive_and_a_dead_agent() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("sync-wait", sync_opts()).unwrap();
    let (_keep, archive, _) = walvault_tests::local_archive().unwrap();
    let faults = walvault_tests::test_root().unwrap().join(format!("faults-{:08x}", rand::random::<u32>()));
    std::fs::write(&faults, "").unwrap();
    let env = [("WALVAULT_TEST_FAULTS", faults.to_str().unwrap())];
    let mut agent =
        Agent::start_with_env(&pg.url(), &archive, &["--synchronous", "--no-backups", "--upload-timeout", "2s"], &env)
            .unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{out}{err}");
    commit_rows(&pg, 2, 10).await;

    // The archive refuses every write for 5 s: a commit started then waits, then returns.
    std::fs::write(&faults, "fail 1.0 put").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the agent reads the file every 100 ms
    let url = pg.conn_str("postgres", "postgres");
    let waiting = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let t0 = Instant::now();
        c.execute("INSERT INTO t (id) VALUES (1001)", &[]).await.unwrap();
        t0.elapsed()
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiting.is_finished(), "a commit returned while the archive refused its WAL");
    let s = agent.status().await.unwrap();
    assert!(s["sync_waiting_seconds"].as_f64().unwrap() >= 3.0, "{s}");
    std::fs::write(&faults, "").unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(60), waiting).await.unwrap().unwrap();
    assert!(waited >= Duration::from_secs(5), "{waited:?}");

    // The agent killed while a commit waits: the commit keeps waiting until the restarted
    // agent has archived its WAL.
    std::fs::write(&faults, "hang").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = pg.conn_str("postgres", "postgres");
    let waiting = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.execute("INSERT INTO t (id) VALUES (1002)", &[]).await.unwrap();
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.kill9();
    std::fs::write(&faults, "").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "a commit returned with no agent to archive it");
    agent.restart().unwrap();
    tokio::time::timeout(Duration::from_secs(60), waiting).await.expect("released by the restarted agent").unwrap();
    agent.kill9();
    pg.stop("immediate").unwrap();
    let (r, _) = restore_and_start(&archive, &["--latest"]).await;
    let got = ids(&r).await;
    assert_eq!(got.len(), 22, "{got:?}");
    assert!(got.contains(&1001) && got.contains(&1002));
}
