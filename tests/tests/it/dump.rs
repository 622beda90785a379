//! `walvault-recover dump`: logical exports at a point in time, judged by PostgreSQL itself
//! (pg_restore, pg_restore --list, the rows and pgbench's balances in the database restored
//! from the dump).

use std::path::Path;
use std::time::Duration;

use walvault_shared::lsn::Lsn;
use walvault_tests::agent::Agent;
use walvault_tests::cli::run;
use walvault_tests::pg::{pg_bin, pg_command, pg_program, PgCluster, PgOptions};

fn opts() -> PgOptions {
    PgOptions { settings: vec!["wal_keep_size = '1GB'".into()], ..Default::default() }
}

/// A cluster streaming into a local archive, with one base backup.
async fn archived_cluster(name: &str) -> (PgCluster, Agent, tempfile::TempDir, String) {
    let pg = PgCluster::start_new(name, opts()).unwrap();
    let (keep, archive, _) = walvault_tests::local_archive().unwrap();
    let agent = Agent::start(&pg.url(), &archive, &["--no-backups", "--chunk-interval", "200ms"]).unwrap();
    let (code, out, err) = run("walvault-agent", &["backup", "--pg-url", &pg.url(), "--archive", &archive]);
    assert_eq!(code, 0, "{out}{err}");
    (pg, agent, keep, archive)
}

async fn settle(pg: &PgCluster, agent: &mut Agent) {
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
}

/// `walvault-recover dump` with the usual flags and `extra`.
fn dump(archive: &str, extra: &[&str]) -> (i32, String, String) {
    let owner = PgCluster::pg_user_name();
    let bin = pg_bin();
    let scratch = PgCluster::fresh_dir("dump-scratch").unwrap().join("s");
    let mut args = vec!["dump", "--archive", archive, "--owner", &owner, "--pg-bin", bin.to_str().unwrap()];
    let s = scratch.to_str().unwrap().to_string();
    args.extend_from_slice(&["--scratch", &s]);
    args.extend_from_slice(extra);
    let r = run("walvault-recover", &args);
    if r.0 != 0 {
        // A refused or failed dump leaves no output; a failure after the start keeps the
        // scratch directory (named in the message) for inspection.
        assert!(r.2.contains("HINT") || r.2.contains("kept for inspection"), "{}", r.2);
    } else {
        assert!(!scratch.exists(), "the scratch directory is removed after a successful dump");
    }
    r
}

fn pg_restore(args: &[&str]) -> String {
    let mut c = pg_command(&pg_program("pg_restore").unwrap()).unwrap();
    let o = c.args(args).output().unwrap();
    assert!(o.status.success(), "pg_restore {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn commit_time(pg: &PgCluster) -> chrono::DateTime<chrono::FixedOffset> {
    let t = pg.query_one_text("SELECT clock_timestamp()::text").await.unwrap();
    chrono::DateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap()
}

async fn ids(pg: &PgCluster, table: &str) -> Vec<i32> {
    let c = pg.connect().await.unwrap();
    c.query(&format!("SELECT id FROM {table} ORDER BY id"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_table_comes_back_as_of_a_time_and_beside_the_live_one() {
    walvault_tests::init_logging();
    let (pg, mut agent, _keep, archive) = archived_cluster("dump-drop").await;
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE other (id int PRIMARY KEY)").await.unwrap();
    pg.execute("INSERT INTO other SELECT generate_series(1, 5)").await.unwrap();
    for id in 1..=10 {
        pg.execute(&format!("INSERT INTO t VALUES ({id}, 'v{id}')")).await.unwrap();
    }
    let t1 = commit_time(&pg).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    for id in 11..=15 {
        pg.execute(&format!("INSERT INTO t VALUES ({id}, 'late')")).await.unwrap();
    }
    // The accident: at T2 the table is dropped; other tables move on.
    pg.execute("DROP TABLE t").await.unwrap();
    pg.execute("INSERT INTO other VALUES (6)").await.unwrap();
    settle(&pg, &mut agent).await;
    let work = PgCluster::fresh_dir("dump-out").unwrap();
    walvault_tests::pg::chown_to_pg(&work).unwrap();
    let out = work.join("t.dump");
    let (code, stdout, err) =
        dump(&archive, &["--target-time", &t1.to_rfc3339(), "--table", "t", "--file", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("wrote") && err.contains("last replayed commit"), "{stdout}{err}");
    walvault_tests::pg::chown_to_pg(&out).unwrap();
    // Back into the live database with pg_restore: exactly the rows committed by T1.
    let sock = pg.socket_dir.to_str().unwrap().to_string();
    let port = pg.port.to_string();
    pg_restore(&["-h", &sock, "-p", &port, "-U", "postgres", "-d", "postgres", out.to_str().unwrap()]);
    assert_eq!(ids(&pg, "t").await, (1..=10).collect::<Vec<_>>());
    assert_eq!(ids(&pg, "other").await, (1..=6).collect::<Vec<_>>(), "other tables untouched");

    // --into with a rename: the live table and the copy side by side.
    pg.execute("UPDATE t SET v = 'oops'").await.unwrap();
    let t2 = commit_time(&pg).await;
    pg.execute("DELETE FROM t WHERE id > 5").await.unwrap();
    settle(&pg, &mut agent).await;
    let into = pg.conn_str("postgres", "postgres");
    let (code, stdout, err) = dump(
        &archive,
        &["--target-time", &t2.to_rfc3339(), "--table", "t", "--rename-table", "t=t_before", "--into", &into],
    );
    assert_eq!(code, 0, "{stdout}{err}");
    assert_eq!(ids(&pg, "t").await, (1..=5).collect::<Vec<_>>(), "the live table as it is");
    assert_eq!(ids(&pg, "t_before").await, (1..=10).collect::<Vec<_>>(), "the copy as of T2");
    let oops = pg.query_one_text("SELECT count(*) FROM t_before WHERE v = 'oops'").await.unwrap();
    assert_eq!(oops, "10", "as of T2, after the update");

    // Schema only: definitions, no data.
    let schema = work.join("schema.dump");
    let (code, _, err) = dump(&archive, &["--latest", "--schema-only", "--file", schema.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    walvault_tests::pg::chown_to_pg(&schema).unwrap();
    let list = pg_restore(&["--list", schema.to_str().unwrap()]);
    assert!(list.contains("TABLE public other") && list.contains("TABLE public t_before"), "{list}");
    assert!(!list.contains("TABLE DATA"), "{list}");

    // Refusals, before anything is downloaded or written, exit non-zero, nothing left.
    let (code, _, err) = dump(&archive, &["--latest", "--file", out.to_str().unwrap()]);
    assert_eq!(code, 1, "an existing output: {err}");
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    let none = work.join("none.dump");
    let (code, _, err) = dump(&archive, &["--latest", "--table", "no_such_table", "--file", none.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no_such_table"), "{err}");
    assert!(!none.exists() && !Path::new(&format!("{}.walvault-partial", none.display())).exists());
    let (code, _, err) = dump(&archive, &["--latest", "--dbname", "nope", "--file", none.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("\"nope\" did not exist") && err.contains("postgres"), "{err}");
    assert!(!none.exists());
    // No room: a scratch directory on a 16 MiB file system.
    let small = PgCluster::fresh_dir("dump-small").unwrap();
    let m = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(m.success(), "mount a small tmpfs (the tests run as root)");
    let owner = PgCluster::pg_user_name();
    let bin = pg_bin();
    let r = run(
        "walvault-recover",
        &[
            "dump",
            "--archive",
            &archive,
            "--owner",
            &owner,
            "--pg-bin",
            bin.to_str().unwrap(),
            "--latest",
            "--scratch",
            small.join("s").to_str().unwrap(),
            "--file",
            none.to_str().unwrap(),
        ],
    );
    let _ = std::process::Command::new("umount").arg(&small).status();
    assert_eq!(r.0, 1, "{}", r.2);
    assert!(r.2.contains("not enough room") && r.2.contains("MiB free"), "{}", r.2);
    assert!(!small.join("s").exists() && !none.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_dump_at_a_time_restores_consistent_into_an_empty_cluster() {
    walvault_tests::init_logging();
    let (pg, mut agent, _keep, archive) = archived_cluster("dump-bench").await;
    pg.run_program("pgbench", &["-i", "-s", "2", "-q", "postgres"]).unwrap();
    pg.run_program("pgbench", &["-T", "2", "-c", "2", "-n", "postgres"]).unwrap();
    let t = commit_time(&pg).await;
    let history_at_t = pg.query_one_text("SELECT count(*) FROM pgbench_history").await.unwrap();
    pg.run_program("pgbench", &["-T", "2", "-c", "2", "-n", "postgres"]).unwrap();
    settle(&pg, &mut agent).await;
    let work = PgCluster::fresh_dir("dump-bench-out").unwrap();
    walvault_tests::pg::chown_to_pg(&work).unwrap();
    let out = work.join("all");
    let (code, stdout, err) =
        dump(&archive, &["--target-time", &t.to_rfc3339(), "--all", "--file", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(out.join("globals.sql").exists() && out.join("postgres.dump").exists(), "{stdout}");
    walvault_tests::pg::chown_to_pg(&out).unwrap();
    for e in std::fs::read_dir(&out).unwrap() {
        walvault_tests::pg::chown_to_pg(&e.unwrap().path()).unwrap();
    }
    let fresh = PgCluster::start_new("dump-target", opts()).unwrap();
    let sock = fresh.socket_dir.to_str().unwrap().to_string();
    let port = fresh.port.to_string();
    pg_restore(&[
        "-h",
        &sock,
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        out.join("postgres.dump").to_str().unwrap(),
    ]);
    let sums = fresh
        .query_one_text(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::text || ',' || (SELECT sum(bbalance) FROM pgbench_branches)::text \
             || ',' || (SELECT sum(tbalance) FROM pgbench_tellers)::text || ',' || (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::text",
        )
        .await
        .unwrap();
    let v: Vec<&str> = sums.split(',').collect();
    assert!(v.iter().all(|x| *x == v[0]), "pgbench balances disagree: {sums}");
    let n = fresh.query_one_text("SELECT count(*) FROM pgbench_history").await.unwrap();
    assert_eq!(n, history_at_t, "exactly the transactions committed by the target");
}
