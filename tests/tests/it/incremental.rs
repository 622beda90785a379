//! Incremental backups (PostgreSQL 17 and later) and their native combine at restore, against
//! real servers of each major of the matrix. On 15 and 16 the same tests check the refusal (and
//! `--fallback-full`); on 17 and 18 they build real chains (full, pgbench, incremental,
//! pgbench, incremental, pgbench), restore to a time after the second incremental, and compare
//! with what we did not write: the rows themselves, pgbench's balances, `pg_verifybackup` on
//! the combined directory, and `pg_combinebackup` of the same chain, file by file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use walvault_shared::lsn::Lsn;
use walvault_tests::agent::Agent;
use walvault_tests::cli::{restore_and_start, run};
use walvault_tests::pg::{pg_command, pg_major, pg_program, PgCluster, PgOptions};

fn opts(summarize: bool) -> PgOptions {
    let mut settings = vec!["wal_keep_size = '1GB'".to_string()];
    if pg_major() >= 17 && summarize {
        settings.push("summarize_wal = on".into());
    }
    PgOptions { settings, ..Default::default() }
}

/// `walvault-agent backup` with `extra`: (exit code, the description printed, stderr).
fn backup(pg: &PgCluster, archive: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let url = pg.url();
    let mut args = vec!["backup", "--pg-url", &url, "--archive", archive, "--backup-part-size", "4MiB"];
    args.extend_from_slice(extra);
    let (code, out, err) = run("walvault-agent", &args);
    (code, serde_json::from_str(&out).unwrap_or(serde_json::Value::Null), err)
}

fn pgbench(pg: &PgCluster, seconds: u32) {
    let t = seconds.to_string();
    pg.run_program("pgbench", &["-T", &t, "-c", "2", "-n", "postgres"]).unwrap();
}

/// pgbench's invariant: every transaction adds one delta to an account, a teller, a branch and
/// the history.
async fn balances_agree(pg: &PgCluster) -> String {
    let sums = pg
        .query_one_text(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::text || ',' || (SELECT sum(bbalance) FROM pgbench_branches)::text \
             || ',' || (SELECT sum(tbalance) FROM pgbench_tellers)::text || ',' || (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::text",
        )
        .await
        .unwrap();
    let v: Vec<&str> = sums.split(',').collect();
    assert!(v.iter().all(|x| *x == v[0]), "pgbench balances disagree: {sums}");
    sums
}

async fn ids(pg: &PgCluster) -> Vec<i32> {
    let c = pg.connect().await.unwrap();
    c.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// Insert rows `range`, one per transaction; returns each row's commit-time upper bound.
async fn insert_rows(
    pg: &PgCluster,
    range: std::ops::RangeInclusive<i32>,
) -> Vec<(i32, chrono::DateTime<chrono::Utc>)> {
    let c = pg.connect().await.unwrap();
    let mut out = Vec::new();
    for id in range {
        c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
        let after: String = c.query_one("SELECT clock_timestamp()::text", &[]).await.unwrap().get(0);
        let after =
            chrono::DateTime::parse_from_str(&after, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap().with_timezone(&chrono::Utc);
        out.push((id, after));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    out
}

/// Every regular file under `root` (following nothing), relative path → bytes' hash and size.
fn files(root: &Path) -> BTreeMap<PathBuf, (u64, String)> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    (bytes.len() as u64, hex::encode(sha2::Sha256::digest(&bytes))),
                );
            }
        }
    }
    out
}

/// Flip one byte near the end of a stored object (inside its payload); returns the original
/// bytes, to put back.
fn flip_a_stored_byte(object: &Path) -> Vec<u8> {
    let original = std::fs::read(object).unwrap();
    let mut bad = original.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x55;
    std::fs::write(object, &bad).unwrap();
    original
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_chain_on_17_and_18_restores_exactly_as_pg_combinebackup_refused_on_15_16() {
    walvault_tests::init_logging();
    let major = pg_major();
    let pg = PgCluster::start_new("incr", opts(false)).unwrap();
    let (_keep, archive, _) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    pg.run_program("pgbench", &["-i", "-s", "10", "-q", "postgres"]).unwrap();

    // Without what incrementals need: a refusal naming it, with a hint, and nothing stored.
    let (code, _, err) = backup(&pg, &archive, &["--incremental"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HINT") && err.contains("--fallback-full"), "{err}");
    if major < 17 {
        assert!(err.contains("PostgreSQL 17 or later"), "{err}");
    } else {
        assert!(err.contains("summarize_wal"), "{err}");
    }
    let (code, l, err) = run("walvault-recover", &["list", "--archive", &archive, "--json"]);
    assert_eq!(code, 0, "{err}");
    let l: serde_json::Value = serde_json::from_str(&l).unwrap();
    assert_eq!(l["backups"].as_array().unwrap().len(), 0, "a refused backup stores nothing: {l}");
    assert_eq!(l["incomplete_backups"].as_array().unwrap().len(), 0, "{l}");
    // --fallback-full: a full backup.
    let (code, d, err) = backup(&pg, &archive, &["--incremental", "--fallback-full"]);
    assert_eq!(code, 0, "{err}");
    assert!(d["parent"].is_null() && d["chain_depth"] == 0, "{d}");
    if major < 17 {
        // A later incremental is refused again (the server cannot); the full restores.
        let (code, _, err) = backup(&pg, &archive, &["--incremental"]);
        assert_eq!(code, 1, "{err}");
        insert_rows(&pg, 1..=3).await;
        let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
        agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
        assert_eq!(agent.stop().unwrap(), 0);
        let (r, _) = restore_and_start(&archive, &["--latest"]).await;
        assert_eq!(ids(&r).await, vec![1, 2, 3]);
        return;
    }

    // 17+: WAL summaries on (a reload is enough); the chain starts with a full backup taken
    // while WAL is summarized.
    pg.execute("ALTER SYSTEM SET summarize_wal = on").await.unwrap();
    pg.execute("SELECT pg_reload_conf()").await.unwrap();
    let (code, full, err) = backup(&pg, &archive, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(full["parent"].is_null());
    pgbench(&pg, 3);
    insert_rows(&pg, 1..=10).await;
    let (code, i1, err) = backup(&pg, &archive, &["--incremental"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(i1["parent"], full["id"], "{i1}");
    assert_eq!(i1["chain_depth"], 1);
    assert_eq!(i1["incremental_from"], full["start_lsn"]);
    pgbench(&pg, 3);
    insert_rows(&pg, 11..=20).await;
    let (code, i2, err) = backup(&pg, &archive, &["--incremental"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((i2["parent"].clone(), i2["chain_depth"].clone()), (i1["id"].clone(), 2.into()));
    let (full_raw, i2_raw) = (full["raw_bytes"].as_u64().unwrap(), i2["raw_bytes"].as_u64().unwrap());
    assert!(i2_raw * 2 < full_raw, "the incremental is much smaller: {i2_raw} vs {full_raw}");
    // pgbench after the second incremental, then rows with known commit times.
    pgbench(&pg, 3);
    let times = insert_rows(&pg, 21..=40).await;
    let target = times.iter().find(|(id, _)| *id == 30).unwrap().1;
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);

    // list shows the chain.
    let (code, text, err) = run("walvault-recover", &["list", "--archive", &archive]);
    assert_eq!(code, 0, "{err}");
    let i2_id = i2["id"].as_str().unwrap();
    assert!(text.contains(&format!("{i2_id}  incr 2 on {}", i1["id"].as_str().unwrap())), "{text}");

    // Restore to a time after the second incremental: the chain is combined natively;
    // pg_verifybackup accepts the combined directory (restore_and_start runs it), the rows are
    // exactly those committed by the target, and pgbench's balances agree.
    let (r, out) = restore_and_start(&archive, &["--target-time", &target.to_rfc3339()]).await;
    assert!(out.contains(&format!("backup {i2_id} is incremental: combined from its chain of 3")), "{out}");
    assert_eq!(ids(&r).await, (1..=30).collect::<Vec<_>>());
    balances_agree(&r).await;
    drop(r);

    // The same chain through pg_combinebackup (same major): identical files.
    let work = PgCluster::fresh_dir("combine").unwrap();
    let owner = PgCluster::pg_user_name();
    let mut exported = Vec::new();
    for b in [&full, &i1, &i2] {
        let id = b["id"].as_str().unwrap();
        let dir = work.join(format!("export-{id}"));
        let (code, out, err) = run(
            "walvault-recover",
            &[
                "export-backup",
                "--archive",
                &archive,
                "--backup",
                id,
                "--dir",
                dir.to_str().unwrap(),
                "--owner",
                &owner,
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        exported.push(dir);
    }
    assert!(files(&exported[2]).keys().any(|p| p.to_string_lossy().contains("INCREMENTAL.")), "exported as sent");
    let theirs = work.join("pg_combinebackup");
    let mut c = pg_command(&pg_program("pg_combinebackup").unwrap()).unwrap();
    c.args(&exported).arg("-o").arg(&theirs);
    let o = c.output().unwrap();
    assert!(o.status.success(), "pg_combinebackup: {}", String::from_utf8_lossy(&o.stderr));
    let ours = work.join("ours");
    let (code, out, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &archive,
            "--backup",
            i2_id,
            "--latest",
            "--pgdata",
            ours.to_str().unwrap(),
            "--owner",
            &owner,
            // The test starts and checks the server itself; no lease for a later replay.
            "--lease",
            "0s",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let skip =
        |p: &Path| ["backup_manifest", "postgresql.auto.conf", "recovery.signal"].iter().any(|s| p == Path::new(s));
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = (
        files(&ours).into_iter().filter(|(p, _)| !skip(p)).collect(),
        files(&theirs).into_iter().filter(|(p, _)| !skip(p)).collect(),
    );
    let only_ours: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_theirs: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(
        only_ours.is_empty() && only_theirs.is_empty(),
        "file sets differ: ours only {only_ours:?}, theirs only {only_theirs:?}"
    );
    let differ: Vec<_> = a.iter().filter(|(k, v)| b[*k] != **v).map(|(k, _)| k).collect();
    assert!(differ.is_empty(), "files differ from pg_combinebackup's: {differ:?}");
    assert!(a.len() > 900, "a whole cluster was compared ({} files)", a.len());
    // postgresql.auto.conf: the backup's own, plus our recovery settings.
    let ours_conf = std::fs::read_to_string(ours.join("postgresql.auto.conf")).unwrap();
    let theirs_conf = std::fs::read_to_string(theirs.join("postgresql.auto.conf")).unwrap();
    assert!(ours_conf.starts_with(theirs_conf.trim_end()), "{ours_conf}\n---\n{theirs_conf}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_chain_damage_and_retention_on_17_and_18_fallback_full_on_15_16() {
    walvault_tests::init_logging();
    let major = pg_major();
    let pg = PgCluster::start_new("incr-damage", opts(true)).unwrap();
    let (_keep, archive, repo) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    pg.run_program("pgbench", &["-i", "-s", "5", "-q", "postgres"]).unwrap();
    let take = |extra: &[&str]| {
        let (code, d, err) = backup(&pg, &archive, extra);
        assert_eq!(code, 0, "{err}");
        d
    };
    if major < 17 {
        // --fallback-full every time: a series of full backups; retention by full backups.
        let a = take(&["--incremental", "--fallback-full"]);
        insert_rows(&pg, 1..=2).await;
        let b = take(&["--incremental", "--fallback-full"]);
        assert!(a["parent"].is_null() && b["parent"].is_null() && b["chain_depth"] == 0);
        let (code, out, err) =
            run("walvault-agent", &["expire", "--archive", &archive, "--retain-full", "1", "--json"]);
        assert_eq!(code, 0, "{err}");
        let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(rep["deleted_backups"], serde_json::json!([a["id"]]), "{rep}");
        let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
        agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
        assert_eq!(agent.stop().unwrap(), 0);
        let (r, _) = restore_and_start(&archive, &["--latest"]).await;
        assert_eq!(ids(&r).await, vec![1, 2]);
        return;
    }
    let f1 = take(&["--incremental"]);
    assert!(f1["parent"].is_null(), "the first backup of an archive is full: {f1}");
    pgbench(&pg, 2);
    insert_rows(&pg, 1..=5).await;
    let i1 = take(&["--incremental"]);
    pgbench(&pg, 2);
    insert_rows(&pg, 6..=10).await;
    let i2 = take(&["--incremental"]);
    assert_eq!(i2["chain_depth"], 2);
    insert_rows(&pg, 11..=12).await;
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    let i1_id = i1["id"].as_str().unwrap().to_string();
    let i2_id = i2["id"].as_str().unwrap().to_string();
    let owner = PgCluster::pg_user_name();
    let restore_into = |dir: &Path, extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--archive",
            &archive,
            "--latest",
            "--pgdata",
            dir.to_str().unwrap(),
            "--owner",
            &owner,
            "--lease",
            "0s",
        ];
        args.extend_from_slice(extra);
        run("walvault-recover", &args)
    };

    // A damaged incremental in the chain (one byte of a part of i1 flipped): refused before
    // anything is written, by name.
    let part = repo.join(format!("backups/{i1_id}/part-000000"));
    let original = flip_a_stored_byte(&part);
    let scratch = PgCluster::fresh_dir("incr-refused").unwrap();
    let target = scratch.join("data");
    let (code, out, err) = restore_into(&target, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&i1_id) && err.contains("damaged"), "{err}");
    assert!(!target.exists(), "nothing was written: {:?}", std::fs::read_dir(&scratch).unwrap().count());
    std::fs::write(&part, &original).unwrap();
    // A missing part of it: the same.
    std::fs::rename(&part, part.with_extension("away")).unwrap();
    let (code, _, err) = restore_into(&target, &["--backup", &i2_id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&i1_id) && err.contains("missing"), "{err}");
    assert!(!target.exists());
    std::fs::rename(part.with_extension("away"), &part).unwrap();
    // i1's description gone: i2's chain is broken. Asked for by id: refused; chosen
    // automatically: skipped, with a warning, for the newest whole chain (the full backup).
    let desc = repo.join(format!("backups/{i1_id}/backup.json"));
    std::fs::rename(&desc, desc.with_extension("away")).unwrap();
    let (code, _, err) = restore_into(&target, &["--backup", &i2_id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&i1_id) && err.contains("chain"), "{err}");
    assert!(!target.exists());
    let (_, text, _) = run("walvault-recover", &["list", "--archive", &archive]);
    assert!(text.contains("NOT RESTORABLE"), "{text}");
    let (r, out) = restore_and_start(&archive, &["--latest"]).await;
    assert!(!out.contains("incremental: combined"), "restored from the full backup: {out}");
    assert_eq!(ids(&r).await, (1..=12).collect::<Vec<_>>(), "everything, replayed from the full backup");
    drop(r);
    std::fs::rename(desc.with_extension("away"), &desc).unwrap();

    // Retention keeps chains whole: a second chain (a full, an incremental on it); keeping one
    // full deletes the first chain entirely and nothing of the second.
    let f2 = take(&[]);
    insert_rows(&pg, 13..=14).await;
    let i3 = take(&["--incremental"]);
    assert_eq!(i3["parent"], f2["id"]);
    let listed = |a: &str| -> Vec<String> {
        let (_, out, _) = run("walvault-recover", &["list", "--archive", a, "--json"]);
        let l: serde_json::Value = serde_json::from_str(&out).unwrap();
        l["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(listed(&archive).len(), 5);
    // --retain-days 0 keeps the newest, and with it its chain: i3 and f2.
    let (code, out, err) =
        run("walvault-agent", &["expire", "--archive", &archive, "--retain-days", "0", "--dry-run", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["kept_backups"], serde_json::json!([f2["id"], i3["id"]]), "{rep}");
    let (code, out, err) = run("walvault-agent", &["expire", "--archive", &archive, "--retain-full", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["deleted_backups"], serde_json::json!([f1["id"], i1["id"], i2["id"]]), "{rep}");
    assert_eq!(listed(&archive), vec![f2["id"].as_str().unwrap().to_string(), i3["id"].as_str().unwrap().to_string()]);
    insert_rows(&pg, 15..=16).await;
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    let (r, out) = restore_and_start(&archive, &["--latest"]).await;
    assert!(out.contains("chain of 2"), "{out}");
    assert_eq!(ids(&r).await, (1..=16).collect::<Vec<_>>());
    balances_agree(&r).await;
}

/// An encrypted and signed archive: the agent holds only the age recipient and its signing key,
/// so it keeps the manifests incrementals need in `--state-dir`; the chain check verifies the
/// incrementals' parts as stored (encrypted) and the restore decrypts and combines them. On 15
/// and 16, where the server cannot send incrementals, the same archive takes full backups with
/// `--fallback-full` and restores them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_signed_incremental_chain_on_17_and_18_fallback_full_on_15_16() {
    walvault_tests::init_logging();
    let major = pg_major();
    let pg = PgCluster::start_new("incr-enc", opts(true)).unwrap();
    let (keep, archive, repo) = walvault_tests::local_archive().unwrap();
    let (identity, recipient) = crate::encryption::age_keygen(keep.path(), "key.txt");
    let signing = keep.path().join("signing.key");
    let (code, out, err) = run("walvault-agent", &["keygen", "--signing-key", signing.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let verify_key = out.trim().to_string();
    let state = keep.path().join("state");
    let (signing, state) = (signing.to_str().unwrap(), state.to_str().unwrap());
    let common = ["--encrypt-recipient", recipient.as_str(), "--signing-key", signing];
    let mut agent = Agent::start(&pg.url(), &archive, &[&common[..], &["--no-backups"]].concat()).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    pg.run_program("pgbench", &["-i", "-s", "5", "-q", "postgres"]).unwrap();
    let take = |extra: &[&str]| {
        let (code, d, err) = backup(&pg, &archive, &[&common[..], &["--state-dir", state], extra].concat());
        assert_eq!(code, 0, "{err}");
        d
    };
    let full = take(&["--incremental", "--fallback-full"]);
    assert!(full["parent"].is_null(), "{full}");
    pgbench(&pg, 2);
    insert_rows(&pg, 1..=5).await;
    let i1 = take(&["--incremental", "--fallback-full"]);
    pgbench(&pg, 2);
    insert_rows(&pg, 6..=10).await;
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    let ident = identity.to_str().unwrap();
    let keys = ["--identity", ident, "--verify-key", verify_key.as_str()];
    if major < 17 {
        assert!(i1["parent"].is_null(), "a full backup again: {i1}");
        let (r, _) = restore_and_start(&archive, &[&keys[..], &["--latest"]].concat()).await;
        assert_eq!(ids(&r).await, (1..=10).collect::<Vec<_>>());
        balances_agree(&r).await;
        return;
    }
    assert_eq!(i1["parent"], full["id"], "an incremental on an encrypted archive: {i1}");
    let i1_id = i1["id"].as_str().unwrap().to_string();

    // A stored byte of the incremental flipped: refused before anything is written, by name.
    let part = repo.join(format!("backups/{i1_id}/part-000000"));
    let original = flip_a_stored_byte(&part);
    let scratch = PgCluster::fresh_dir("incr-enc-refused").unwrap();
    let target = scratch.join("data");
    let owner = PgCluster::pg_user_name();
    let mut args = vec!["restore", "--archive", &archive, "--latest", "--pgdata", target.to_str().unwrap()];
    args.extend_from_slice(&["--owner", &owner, "--lease", "0s"]);
    args.extend_from_slice(&keys);
    let (code, out, err) = run("walvault-recover", &args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&i1_id) && err.contains("damaged"), "{err}");
    assert!(!target.exists(), "nothing was written");
    std::fs::write(&part, &original).unwrap();

    // Intact: decrypted, authenticated and combined; pg_verifybackup accepts it (in
    // restore_and_start) and the rows and balances are exact.
    let (r, out) = restore_and_start(&archive, &[&keys[..], &["--latest"]].concat()).await;
    assert!(out.contains(&format!("backup {i1_id} is incremental: combined from its chain of 2")), "{out}");
    assert_eq!(ids(&r).await, (1..=10).collect::<Vec<_>>());
    balances_agree(&r).await;
}
