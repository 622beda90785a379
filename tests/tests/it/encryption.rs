//! Encryption at rest against real PostgreSQL, a local archive and SeaweedFS: the agent holds
//! only age public keys (or a passphrase file); readers decrypt with an identity made by the
//! stock `age-keygen`; epochs rotate; a rekey rewrites keys only; tampering, swapping and wrong
//! keys are refused before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use walvault_shared::archive::envelope::{self, Expect};
use walvault_shared::archive::names;
use walvault_shared::lsn::Lsn;
use walvault_shared::storage::local::LocalStore;
use walvault_shared::storage::{ObjectStore, PutMode};
use walvault_tests::agent::Agent;
use walvault_tests::cli::{restore_and_start, run};
use walvault_tests::pg::{chown_to_pg, PgCluster, PgOptions};
use walvault_tests::s3server::S3Server;

fn opts() -> PgOptions {
    PgOptions { settings: vec!["wal_keep_size = '1GB'".into()], ..Default::default() }
}

async fn flush_lsn(pg: &PgCluster) -> Lsn {
    pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap()
}

async fn ids(pg: &PgCluster) -> Vec<i32> {
    let c = pg.connect().await.unwrap();
    c.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get::<_, i32>(0)).collect()
}

/// A key pair from the stock `age-keygen`: (identity file, readable by the PostgreSQL user
/// whose restore_command uses it; recipient `age1…`).
pub(crate) fn age_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out =
        std::process::Command::new("age-keygen").arg("-o").arg(&path).output().expect("age-keygen (apt install age)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&path).unwrap();
    let recipient = text.lines().find_map(|l| l.strip_prefix("# public key: ")).unwrap().trim().to_string();
    chown_to_pg(&path).unwrap();
    (path, recipient)
}

/// Every object of a local archive: key -> (size, crc32 of its bytes).
fn snapshot(root: &Path) -> BTreeMap<String, (u64, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                if e.file_name() != ".tmp" {
                    stack.push(e.path());
                }
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                let key = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(key, (bytes.len() as u64, crc32fast::hash(&bytes)));
            }
        }
    }
    out
}

/// Decode without any key: what a bucket reader gets.
fn decode_without_key(key: &str, raw: &[u8]) -> Result<envelope::Decoded, envelope::EnvelopeError> {
    envelope::decode(key, raw, &Expect { kind: None, max_plain: 1 << 30, what: "t", verify: None, epoch: None })
}

/// An encrypted archive with a backup, rows 1..=n committed one per transaction while epochs
/// rotate every 2 s; returns the commit times of the rows.
struct Encrypted {
    pg: PgCluster,
    dir: tempfile::TempDir,
    archive: String,
    root: PathBuf,
    identity: PathBuf,
    recipient: String,
    times: Vec<(i32, String)>,
}

async fn encrypted_archive(n: i32) -> Encrypted {
    let pg = PgCluster::start_new("enc", opts()).unwrap();
    let (dir, archive, root) = walvault_tests::local_archive().unwrap();
    let (identity, recipient) = age_keygen(dir.path(), "key.txt");
    let enc = ["--encrypt-recipient", recipient.as_str()];
    let mut agent = Agent::start(
        &pg.url(),
        &archive,
        &[&enc[..], &["--chunk-interval", "200ms", "--no-backups", "--key-rotation-interval", "2s"]].concat(),
    )
    .unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())").await.unwrap();
    let (code, out, err) =
        run("walvault-agent", &[&["backup", "--pg-url", &pg.url(), "--archive", &archive][..], &enc].concat());
    assert_eq!(code, 0, "{out}\n{err}");
    let c = pg.connect().await.unwrap();
    let mut times = Vec::new();
    for id in 1..=n {
        let row = c.query_one("INSERT INTO t (id) VALUES ($1) RETURNING at::text", &[&id]).await.unwrap();
        times.push((id, row.get::<_, String>(0)));
        if id % 8 == 0 {
            pg.switch_wal().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    assert!(!agent.log_text().contains("AGE-SECRET-KEY"), "the agent never sees a secret key");
    Encrypted { pg, dir, archive, root, identity, recipient, times }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_archive_restores_to_a_time_across_epochs_and_reveals_nothing_without_the_key() {
    walvault_tests::init_logging();
    let e = encrypted_archive(40).await;
    let store = LocalStore::open_existing(&e.root).unwrap();
    // What a bucket reader sees: content objects do not decode; the rest is metadata.
    let mut epochs = std::collections::BTreeSet::new();
    let mut confidential = 0;
    for o in store.list_all("").await.unwrap() {
        let raw = store.get(&o.key).await.unwrap();
        let (h, _) = envelope::decode_header(&o.key, &raw, None).unwrap();
        if names::is_confidential(&o.key) {
            confidential += 1;
            let b = h.encryption_block.as_ref().unwrap_or_else(|| panic!("{} stored in clear", o.key));
            epochs.insert(b.epoch);
            let err = decode_without_key(&o.key, &raw).unwrap_err();
            assert!(matches!(err, envelope::EnvelopeError::Encrypted { .. }), "{}: {err}", o.key);
            assert!(err.to_string().contains(&o.key) && err.to_string().contains("--identity"));
        } else {
            assert!(h.encryption_block.is_none(), "{} is metadata, kept in clear", o.key);
            assert!(
                o.key == names::IDENTITY
                    || o.key.ends_with(".history")
                    || o.key.starts_with("index/")
                    || o.key.starts_with(names::KEYS_PREFIX)
                    || o.key.ends_with("/backup.json"),
                "unexpected clear object {}",
                o.key
            );
        }
    }
    assert!(confidential > 5, "{confidential} content objects");
    let keys = store.list_all(names::KEYS_PREFIX).await.unwrap().len();
    assert!(keys >= 3 && epochs.len() >= 3, "{keys} key objects, WAL and backup in {} epochs", epochs.len());
    // list and audit work without a key.
    let (code, out, err) = run("walvault-recover", &["list", "--archive", &e.archive, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("recoverable_to_lsn"));
    let (code, _, err) = run("walvault-recover", &["audit", "--archive", &e.archive, "--json"]);
    assert!(code == 0 || code == 1, "{err}");
    // A time between rows 20 and 21, through wal-fetch with the identity file.
    let t = |i: usize| chrono::DateTime::parse_from_str(&e.times[i].1, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap();
    let target = t(19) + (t(20) - t(19)) / 2;
    let ident = e.identity.to_str().unwrap();
    let (r, _) = restore_and_start(&e.archive, &["--identity", ident, "--target-time", &target.to_rfc3339()]).await;
    assert_eq!(ids(&r).await, (1..=20).collect::<Vec<_>>(), "exactly the rows committed by the target time");
    let auto = std::fs::read_to_string(r.data.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(&format!("--identity {ident}")), "restore_command names the identity file: {auto}");
    assert!(!auto.contains("AGE-SECRET-KEY"), "never the key itself");
    drop(r);
    drop(e.pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_flipped_bits_and_swapped_objects_are_refused() {
    walvault_tests::init_logging();
    let e = encrypted_archive(12).await;
    let owner = PgCluster::pg_user_name();
    let never = PgCluster::fresh_dir("never").unwrap().join("data");
    let restore = |extra: &[&str]| {
        let mut a = vec![
            "restore",
            "--archive",
            &e.archive,
            "--pgdata",
            never.to_str().unwrap(),
            "--owner",
            &owner,
            "--latest",
        ];
        a.extend_from_slice(extra);
        run("walvault-recover", &a)
    };
    // No identity, another identity: refused before anything is written, saying which key.
    let (code, _, err) = restore(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("encrypted") && err.contains("--identity"), "{err}");
    let (other, _) = age_keygen(e.dir.path(), "other.txt");
    let (code, _, err) = restore(&["--identity", other.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let fp = walvault_shared::archive::crypt::fingerprint(&e.recipient);
    assert!(err.contains("cannot unwrap") && err.contains(&fp), "names the expected recipient {fp}: {err}");
    assert!(!never.exists(), "nothing written");
    let scratch = PgCluster::fresh_dir("drill").unwrap().join("w");
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "verify",
            "--archive",
            &e.archive,
            "--owner",
            &owner,
            "--workdir",
            scratch.to_str().unwrap(),
            "--identity",
            other.to_str().unwrap(),
            "--pg-bin",
            walvault_tests::pg::pg_bin().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&fp), "{err}");
    assert!(!scratch.exists(), "the drill wrote nothing");
    // wal-fetch: without the key, exit 126 (never "end of WAL").
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open_existing(&e.root).unwrap());
    let segs: Vec<String> = store
        .list_all("wal/00000001/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| matches!(names::parse(k, 16 << 20), Some(names::ArchiveKey::Segment(_))))
        .collect();
    let seg = segs.last().unwrap().clone();
    let file = seg.rsplit('/').next().unwrap().to_string();
    let dest = e.dir.path().join("RECOVERYXLOG");
    let fetch = |extra: &[&str]| {
        let mut a = vec!["wal-fetch", "--archive", &e.archive, "--prefetch", "0"];
        a.extend_from_slice(extra);
        a.push(&file);
        a.push(dest.to_str().unwrap());
        run("walvault-recover", &a)
    };
    let ident = e.identity.to_str().unwrap();
    assert_eq!(fetch(&["--identity", ident]).0, 0, "the right key fetches it");
    std::fs::remove_file(&dest).unwrap();
    let (code, _, err) = fetch(&[]);
    assert_eq!(code, 126, "{err}");
    // A flipped bit in the ciphertext: refused, naming the object.
    let saved = store.get(&seg).await.unwrap();
    let mut bad = saved.to_vec();
    let n = bad.len();
    bad[n - 100] ^= 0x10;
    store.put(&seg, bad.into(), PutMode::Overwrite).await.unwrap();
    let (code, _, err) = fetch(&["--identity", ident]);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains(&seg), "{err}");
    assert!(!dest.exists());
    store.put(&seg, saved, PutMode::Overwrite).await.unwrap();
    // Two chunk objects swapped (bytes intact, names exchanged): neither decrypts.
    let pg = &e.pg;
    let mut agent = Agent::start(
        &pg.url(),
        &e.archive,
        &["--encrypt-recipient", &e.recipient, "--chunk-interval", "100ms", "--no-backups"],
    )
    .unwrap();
    let c = pg.connect().await.unwrap();
    for id in 100..110 {
        c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    agent.wait_archived(flush_lsn(pg).await, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);
    let chunks: Vec<String> = store
        .list_all("wal/00000001/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| matches!(names::parse(k, 16 << 20), Some(names::ArchiveKey::Chunk { .. })))
        .collect();
    assert!(chunks.len() >= 2, "the newest segment is still chunks: {chunks:?}");
    let (a, b) = (&chunks[0], &chunks[1]);
    let (ra, rb) = (store.get(a).await.unwrap(), store.get(b).await.unwrap());
    store.put(a, rb, PutMode::Overwrite).await.unwrap();
    store.put(b, ra, PutMode::Overwrite).await.unwrap();
    let newest = a.rsplit('/').next().unwrap().split('.').next().unwrap().to_string();
    let mut args = vec!["wal-fetch", "--archive", &e.archive, "--prefetch", "0", "--identity", ident, &newest];
    args.push(dest.to_str().unwrap());
    let (code, _, err) = run("walvault-recover", &args);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("does not decrypt") || err.contains("holds"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_rewrites_keys_only_and_is_safe_to_interrupt() {
    walvault_tests::init_logging();
    let e = encrypted_archive(16).await;
    let (new_id, new_r) = age_keygen(e.dir.path(), "new.txt");
    let data = |s: BTreeMap<String, (u64, u32)>| -> BTreeMap<String, (u64, u32)> {
        // Data objects: not the key objects rekey rewrites, nor the leases restores take.
        s.into_iter()
            .filter(|(k, _)| !k.starts_with(names::KEYS_PREFIX) && !k.starts_with(names::LEASES_PREFIX))
            .collect()
    };
    let before = snapshot(&e.root);
    let keys = before.keys().filter(|k| k.starts_with(names::KEYS_PREFIX)).count();
    assert!(keys >= 2);
    let old = e.identity.to_str().unwrap();
    let rekey = |extra: &[&str]| {
        let mut a = vec!["rekey", "--archive", &e.archive, "--identity", old, "--to-recipient", &new_r, "--json"];
        a.extend_from_slice(extra);
        run("walvault-recover", &a)
    };
    // Killed in the first pass: the old identity still reads everything.
    let (code, _, err) = rekey(&["--stop-after", "1"]);
    assert_eq!(code, 3, "{err}");
    let (r, _) = restore_and_start(&e.archive, &["--identity", old, "--latest"]).await;
    assert_eq!(ids(&r).await.len(), 16);
    drop(r);
    // Killed in the second pass: the new identity reads everything.
    let stop = (keys + 1).to_string();
    let (code, _, err) = rekey(&["--stop-after", &stop]);
    assert_eq!(code, 3, "{err}");
    let new = new_id.to_str().unwrap();
    let (r, _) = restore_and_start(&e.archive, &["--identity", new, "--latest"]).await;
    assert_eq!(ids(&r).await.len(), 16);
    drop(r);
    // Run to the end; again (nothing to do).
    let (code, out, err) = rekey(&[]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["epochs"].as_u64().unwrap() as usize, keys);
    let (code, out, err) = rekey(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["rewrapped"], 0, "idempotent: {out}");
    let (code, out, err) = run(
        "walvault-recover",
        &["rekey", "--archive", &e.archive, "--identity", new, "--to-recipient", &new_r, "--json"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["rewrapped"], 0, "idempotent");
    // Only key objects changed.
    assert_eq!(data(snapshot(&e.root)), data(before), "no data object's bytes changed");
    // Old identity refused; new one restores a point in time.
    let never = PgCluster::fresh_dir("never").unwrap().join("data");
    let owner = PgCluster::pg_user_name();
    let (code, _, err) = run(
        "walvault-recover",
        &[
            "restore",
            "--archive",
            &e.archive,
            "--pgdata",
            never.to_str().unwrap(),
            "--owner",
            &owner,
            "--latest",
            "--identity",
            old,
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(!never.exists());
    let t = |i: usize| chrono::DateTime::parse_from_str(&e.times[i].1, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap();
    let target = t(9) + (t(10) - t(9)) / 2;
    let (r, _) = restore_and_start(&e.archive, &["--identity", new, "--target-time", &target.to_rfc3339()]).await;
    assert_eq!(ids(&r).await, (1..=10).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_fails_closed_and_passphrase_mode_works_on_s3() {
    walvault_tests::init_logging();
    let s3 = S3Server::shared().await.unwrap();
    let bucket = s3.new_bucket("enc").await.unwrap();
    let archive = format!("s3://{bucket}/pg");
    let s3flags = ["--s3-endpoint", s3.endpoint.as_str(), "--s3-force-path-style"];
    let _ = s3.options(); // sets the AWS_* variables the agent and the restored server inherit
    let pg = PgCluster::start_new("encpass", opts()).unwrap();
    let dir = tempfile::tempdir_in(walvault_tests::test_root().unwrap()).unwrap();
    let pass = dir.path().join("passphrase");
    let secret = "correct horse battery staple walvault";
    std::fs::write(&pass, format!("{secret}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown_to_pg(&pass).unwrap();
    let p = pass.to_str().unwrap();
    let mut agent = Agent::start(
        &pg.url(),
        &archive,
        &[&s3flags[..], &["--encrypt-passphrase-file", p, "--chunk-interval", "200ms", "--no-backups"]].concat(),
    )
    .unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 30)").await.unwrap();
    let (code, out, err) = run(
        "walvault-agent",
        &[&["backup", "--pg-url", &pg.url(), "--archive", &archive, "--encrypt-passphrase-file", p][..], &s3flags]
            .concat(),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    pg.execute("INSERT INTO t SELECT generate_series(31, 40)").await.unwrap();
    agent.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    let (_, status) = agent.http_get("/status").await.unwrap();
    assert!(!status.contains(secret));
    assert_eq!(agent.stop().unwrap(), 0);
    assert!(!agent.log_text().contains(secret), "the passphrase never reaches the log");
    // Restore from S3 with the passphrase file; the passphrase itself is nowhere in the config.
    let (r, _) = restore_and_start(&archive, &[&s3flags[..], &["--passphrase-file", p, "--latest"]].concat()).await;
    assert_eq!(ids(&r).await.len(), 40);
    let auto = std::fs::read_to_string(r.data.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("--passphrase-file") && !auto.contains(secret), "{auto}");
    drop(r);
    // Fail closed: an agent without keys refuses the encrypted archive …
    let mut clear = Agent::start(&pg.url(), &archive, &[&s3flags[..], &["--no-backups"]].concat()).unwrap();
    assert_eq!(clear.wait_exit(Duration::from_secs(60)).unwrap(), 1);
    assert!(clear.log_text().contains("is encrypted") && clear.log_text().contains("HINT"), "{}", clear.log_text());
    // … and an agent with keys refuses an archive that holds data in clear.
    let bucket2 = s3.new_bucket("clear").await.unwrap();
    let archive2 = format!("s3://{bucket2}/pg");
    let mut plain = Agent::start(&pg.url(), &archive2, &[&s3flags[..], &["--no-backups"]].concat()).unwrap();
    plain.wait_archived(flush_lsn(&pg).await, Duration::from_secs(60)).await.unwrap();
    assert_eq!(plain.stop().unwrap(), 0);
    let mut enc =
        Agent::start(&pg.url(), &archive2, &[&s3flags[..], &["--encrypt-passphrase-file", p, "--no-backups"]].concat())
            .unwrap();
    assert_eq!(enc.wait_exit(Duration::from_secs(60)).unwrap(), 1);
    assert!(enc.log_text().contains("holds data in clear"), "{}", enc.log_text());
    // No secret in --help.
    let (_, help, _) = run("walvault-agent", &["run", "--help"]);
    assert!(!help.contains(secret));
}
