//! One storage conformance suite, written once, run against every backend: the local directory
//! and a real S3-compatible server (SeaweedFS). Each case states a clause of the
//! `shared::storage` contract.

use std::any::Any;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use walvault_shared::archive::names;
use walvault_shared::lsn::{Lsn, SegNo, TimelineId};
use walvault_shared::storage::faulty::FaultyStore;
use walvault_shared::storage::local::LocalStore;
use walvault_shared::storage::s3::{S3Options, S3Store};
use walvault_shared::storage::{ByteStream, ObjectStore, PutMode, StorageError};
use walvault_shared::wal::SegmentName;
use walvault_tests::s3server::S3Server;

/// A store plus whatever keeps it alive (temp dir, server).
struct Fixture {
    store: Arc<dyn ObjectStore>,
    /// Largest object that goes up in one request (multipart above it).
    part_size: usize,
    _guard: Box<dyn Any + Send>,
}

const PAGE: i32 = 7;

async fn local() -> Fixture {
    let dir = tempfile::Builder::new().prefix("conformance-").tempdir_in(walvault_tests::test_root().unwrap()).unwrap();
    let store = LocalStore::open(&dir.path().join("repo")).unwrap();
    Fixture { store: Arc::new(store), part_size: 5 << 20, _guard: Box::new(dir) }
}

/// The local store as the synchronous agent opens it: WAL chunks go through its commit journal
/// (files of 1 MiB here, so that tests roll over to new ones).
async fn local_journaled() -> Fixture {
    let dir = tempfile::Builder::new().prefix("conformance-").tempdir_in(walvault_tests::test_root().unwrap()).unwrap();
    let store = LocalStore::open(&dir.path().join("repo")).unwrap().with_journal_size(1 << 20).unwrap();
    Fixture { store: Arc::new(store), part_size: 5 << 20, _guard: Box::new(dir) }
}

async fn s3() -> Fixture {
    let server = S3Server::shared().await.expect("S3 server");
    let bucket = server.new_bucket("conformance").await.unwrap();
    let opts = S3Options { part_size: 5 << 20, list_page_size: PAGE, ..server.options() };
    let store = S3Store::connect(&bucket, "conf/prefix", &opts).await.unwrap();
    Fixture { store: Arc::new(store), part_size: opts.part_size, _guard: Box::new(server) }
}

fn pattern(len: usize, seed: u32) -> Bytes {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn stream_of(data: Bytes, piece: usize) -> ByteStream {
    let pieces: Vec<Result<Bytes, StorageError>> =
        (0..data.len()).step_by(piece).map(|i| Ok(data.slice(i..(i + piece).min(data.len())))).collect();
    futures::stream::iter(pieces).boxed()
}

/// Every kind of key the archive's catalogue produces, plus every character keys may hold.
fn archive_keys() -> Vec<String> {
    let seg = SegmentName::new(TimelineId(0x1A), SegNo(0x1_00A3));
    let id = names::backup_id(chrono::DateTime::from_timestamp(1_795_000_000, 0).expect("valid time"));
    vec![
        names::IDENTITY.to_string(),
        names::history(TimelineId(2)),
        names::segment(&seg, 16 << 20),
        names::chunk(&seg, 16 << 20, seg.start_lsn(16 << 20), Lsn(seg.start_lsn(16 << 20).0 + 0x2000)),
        names::backup_part(&id, 0),
        names::backup_manifest(&id),
        names::backup_description(&id),
        "misc/ABCXYZabcxyz0189._=+-".to_string(),
    ]
}

async fn round_trip(f: Fixture) {
    let s = &f.store;
    for (i, key) in archive_keys().iter().enumerate() {
        let data = pattern(1000 + i, i as u32);
        s.put(key, data.clone(), PutMode::IfAbsent).await.unwrap();
        assert_eq!(s.get(key).await.unwrap(), data, "{key}");
        assert_eq!(s.head(key).await.unwrap().size, data.len() as u64, "{key}");
    }
    let mut listed: Vec<String> = s.list_all("").await.unwrap().into_iter().map(|m| m.key).collect();
    listed.sort();
    let mut want = archive_keys();
    want.sort();
    assert_eq!(listed, want, "a listing gives back exactly the keys written");
    // Empty objects are objects too.
    s.put("empty", Bytes::new(), PutMode::IfAbsent).await.unwrap();
    assert_eq!(s.get("empty").await.unwrap().len(), 0);
    assert_eq!(s.head("empty").await.unwrap().size, 0);
}

async fn overwrite_and_write_once(f: Fixture) {
    let s = &f.store;
    s.put("a/b", Bytes::from_static(b"one"), PutMode::IfAbsent).await.unwrap();
    let e = s.put("a/b", Bytes::from_static(b"two"), PutMode::IfAbsent).await.unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e}");
    assert!(e.to_string().contains("a/b"), "error names the key: {e}");
    assert_eq!(s.get("a/b").await.unwrap(), Bytes::from_static(b"one"), "write-once never clobbers");
    s.put("a/b", Bytes::from_static(b"three"), PutMode::Overwrite).await.unwrap();
    assert_eq!(s.get("a/b").await.unwrap(), Bytes::from_static(b"three"));
}

async fn if_absent_race(f: Fixture) {
    let s = f.store.clone();
    for round in 0..3 {
        // One round on a chunk's key (what a journaled local store writes differently).
        let key = if round == 2 { archive_keys()[3].clone() } else { format!("race/{round}") };
        let tasks: Vec<_> = (0..8u32)
            .map(|w| {
                let s = s.clone();
                let key = key.clone();
                tokio::spawn(
                    async move { (w, s.put(&key, pattern(64 << 10, w + 100 * round), PutMode::IfAbsent).await) },
                )
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (w, r) = t.await.unwrap();
            match r {
                Ok(()) => winners.push(w),
                Err(StorageError::AlreadyExists { .. }) => {}
                Err(e) => panic!("writer {w}: unexpected {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one writer wins: {winners:?}");
        assert_eq!(
            s.get(&key).await.unwrap(),
            pattern(64 << 10, winners[0] + 100 * round),
            "the winner's bytes are stored"
        );
    }
}

async fn missing_objects(f: Fixture) {
    let s = &f.store;
    for e in [
        s.get("no/such").await.unwrap_err(),
        s.head("no/such").await.unwrap_err(),
        s.get_range("no/such", 0..10).await.unwrap_err(),
    ] {
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("no/such"), "{e}");
    }
    assert!(s.get_stream("no/such").await.err().expect("missing").is_not_found());
    assert!(s.list_all("no/").await.unwrap().is_empty());
    // Deleting missing keys is fine, alone or mixed with present ones.
    s.delete(&["no/such".into(), "no/other".into()]).await.unwrap();
    s.put("yes", Bytes::from_static(b"x"), PutMode::IfAbsent).await.unwrap();
    s.delete(&["no/such".into(), "yes".into()]).await.unwrap();
    assert!(s.head("yes").await.unwrap_err().is_not_found());
}

async fn large_multipart_and_ranges(f: Fixture) {
    let s = &f.store;
    let part = f.part_size;
    // 3.5 parts, streamed in odd-sized pieces.
    let size = part * 3 + part / 2;
    let data = pattern(size, 7);
    let n = s.put_stream("big/object", stream_of(data.clone(), 300_001), PutMode::IfAbsent).await.unwrap();
    assert_eq!(n, size as u64);
    assert_eq!(s.head("big/object").await.unwrap().size, size as u64);
    let whole = s.get("big/object").await.unwrap();
    assert!(whole == data, "large object reads back identical");
    let p = part as u64;
    for r in [0..1, p - 10..p + 10, 2 * p - 1..2 * p + 1, 3 * p - 5..size as u64, 0..size as u64, 100..100 + 2 * p] {
        let got = s.get_range("big/object", r.clone()).await.unwrap();
        assert!(got == data.slice(r.start as usize..r.end as usize), "range {r:?}");
    }
    // Past the end is clamped.
    assert_eq!(s.get_range("big/object", size as u64 - 3..size as u64 + 100).await.unwrap(), data.slice(size - 3..));
    // Write-once holds for multipart objects too.
    let e = s.put_stream("big/object", stream_of(pattern(size, 8), 1 << 20), PutMode::IfAbsent).await.unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e}");
    assert!(s.get("big/object").await.unwrap() == data);
    // A large put of an in-memory buffer takes the same path.
    s.put("big/buffer", data.clone(), PutMode::IfAbsent).await.unwrap();
    assert!(s.get("big/buffer").await.unwrap() == data);
}

async fn failed_stream_leaves_nothing(f: Fixture) {
    let s = &f.store;
    let part = f.part_size;
    for (key, len) in [("broken/small", 1000usize), ("broken/multipart", part * 2 + 5)] {
        let data = pattern(len, 3);
        let mut pieces: Vec<Result<Bytes, StorageError>> = vec![Ok(data.slice(..len - 10))];
        pieces.push(Err(StorageError::transient("read", "source", "source failed")));
        let e = s.put_stream(key, futures::stream::iter(pieces).boxed(), PutMode::IfAbsent).await.unwrap_err();
        assert!(e.to_string().contains("source failed"), "{e}");
        assert!(s.head(key).await.unwrap_err().is_not_found(), "{key}: a failed put leaves no object");
    }
    assert!(s.list_all("broken/").await.unwrap().is_empty());
}

async fn paginated_listing(f: Fixture) {
    let s = f.store.clone();
    // Several pages (page size 7 on S3), with keys that sort differently from directory order.
    let mut keys: Vec<String> = (0..40).map(|i| format!("list/{:03}", i * 7 % 40)).collect();
    keys.extend(["list/a/b".into(), "list/a.b".into(), "list/a-b".into(), "lista".into()]);
    futures::stream::iter(keys.clone())
        .map(|k| {
            let s = s.clone();
            async move { s.put(&k, Bytes::from(k.clone()), PutMode::IfAbsent).await }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let mut got: Vec<String> = s.list("list/").map_ok(|m| m.key).try_collect().await.unwrap();
    got.sort();
    let mut want: Vec<String> = keys.iter().filter(|k| k.starts_with("list/")).cloned().collect();
    want.sort();
    assert_eq!(got, want);
    let mut got: Vec<String> = s.list("list/a").map_ok(|m| m.key).try_collect().await.unwrap();
    got.sort();
    assert_eq!(got, vec!["list/a-b", "list/a.b", "list/a/b"]);
    let got: Vec<String> = s.list("list/00").map_ok(|m| m.key).try_collect().await.unwrap();
    assert_eq!(got.len(), 10);
    // Sizes come with the listing.
    let m = s.list_all("list/a/b").await.unwrap();
    assert_eq!(m[0].size, "list/a/b".len() as u64);
}

async fn batched_delete(f: Fixture) {
    let s = f.store.clone();
    // More than one DeleteObjects batch (1000 keys).
    let keys: Vec<String> = (0..1010).map(|i| format!("del/{i:05}")).collect();
    futures::stream::iter(keys.clone())
        .map(|k| {
            let s = s.clone();
            async move { s.put(&k, Bytes::from_static(b"x"), PutMode::IfAbsent).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    s.put("keep/me", Bytes::from_static(b"k"), PutMode::IfAbsent).await.unwrap();
    assert_eq!(s.list_all("del/").await.unwrap().len(), 1010);
    s.delete(&keys).await.unwrap();
    assert!(s.list_all("del/").await.unwrap().is_empty());
    assert_eq!(s.get("keep/me").await.unwrap(), Bytes::from_static(b"k"));
}

async fn invalid_keys(f: Fixture) {
    for k in ["", "/abs", "a//b", "a/../b", "sp ace", "a/"] {
        let e = f.store.put(k, Bytes::from_static(b"x"), PutMode::IfAbsent).await.unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains("HINT"), "{k:?}: {e}");
    }
}

async fn fault_wrapper(f: Fixture) {
    let faulty = FaultyStore::new(f.store.clone());
    faulty.fail_next(2);
    assert!(faulty.put("f/1", Bytes::from_static(b"x"), PutMode::IfAbsent).await.unwrap_err().is_indeterminate());
    assert!(faulty.get("f/1").await.is_err());
    assert!(f.store.head("f/1").await.unwrap_err().is_not_found(), "a fault before the call changes nothing");
    faulty.put("f/1", Bytes::from_static(b"x"), PutMode::IfAbsent).await.unwrap();
    // Indeterminate: the write happened but the caller hears a timeout.
    faulty.fail_next_after(1);
    let e = faulty.put("f/2", Bytes::from_static(b"y"), PutMode::IfAbsent).await.unwrap_err();
    assert!(matches!(e, StorageError::Timeout { .. }));
    assert_eq!(f.store.get("f/2").await.unwrap(), Bytes::from_static(b"y"));
    assert_eq!(faulty.injected(), 3);
    // Probability 1 fails everything; 0 nothing.
    faulty.fail_with_probability(1.0);
    assert!(faulty.list_all("f/").await.is_err());
    faulty.fail_with_probability(0.0);
    assert_eq!(faulty.list_all("f/").await.unwrap().len(), 2);
    // A hang blocks until lifted.
    let faulty = Arc::new(faulty);
    faulty.hang(true);
    let f2 = faulty.clone();
    let call = tokio::spawn(async move { f2.get("f/1").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "call hangs while the fault is on");
    faulty.hang(false);
    assert_eq!(call.await.unwrap().unwrap(), Bytes::from_static(b"x"));
    // The retry helper gets through transient faults.
    faulty.fail_next(3);
    let policy = walvault_shared::storage::retry::RetryPolicy {
        initial: std::time::Duration::from_millis(5),
        max: std::time::Duration::from_millis(20),
        max_attempts: Some(5),
    };
    let got = policy.run("get f/1", || faulty.get("f/1")).await.unwrap();
    assert_eq!(got, Bytes::from_static(b"x"));
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn round_trip_every_archive_key() {
                super::round_trip(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn overwrite_and_write_once() {
                super::overwrite_and_write_once(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn if_absent_race_has_one_winner() {
                super::if_absent_race(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn missing_objects() {
                super::missing_objects(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn large_multipart_and_ranges() {
                super::large_multipart_and_ranges(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn failed_stream_leaves_nothing() {
                super::failed_stream_leaves_nothing(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn paginated_listing() {
                super::paginated_listing(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn batched_delete() {
                super::batched_delete(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn invalid_keys() {
                super::invalid_keys(super::$backend().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn fault_wrapper() {
                super::fault_wrapper(super::$backend().await).await
            }
        }
    };
}

conformance!(local);
conformance!(local_journaled);
conformance!(s3);

/// The local store's commit journal (`shared::storage::journal`), seen from other processes.
mod journal {
    use super::*;
    use walvault_shared::storage::journal as j;

    fn chunk_key(n: u64) -> String {
        let seg = SegmentName::new(TimelineId(1), SegNo(3));
        let start = seg.start_lsn(16 << 20).0 + n * 0x100;
        names::chunk(&seg, 16 << 20, Lsn(start), Lsn(start + 0x100))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn journaled_chunks_are_objects_to_every_reader_and_survive_a_restart() {
        let dir = tempfile::Builder::new().prefix("journal-").tempdir_in(walvault_tests::test_root().unwrap()).unwrap();
        let root = dir.path().join("repo");
        let writer = LocalStore::open(&root).unwrap().with_journal_size(64 << 10).unwrap();
        // Chunks go into the journal (no file), larger objects and other keys are files.
        for n in 0..100 {
            writer.put(&chunk_key(n), pattern(700, n as u32), PutMode::IfAbsent).await.unwrap();
        }
        writer.put("wal/00000001/000000010000000000000003", pattern(3000, 7), PutMode::IfAbsent).await.unwrap();
        assert!(!root.join(chunk_key(0)).exists(), "a journaled chunk is not a file");
        assert!(root.join("wal/00000001/000000010000000000000003").is_file());
        let files = j::generations(&root.join(j::DIR)).unwrap();
        assert!(files.len() >= 2, "100 records of 700 bytes need more than one 64 KiB file: {files:?}");
        let e = writer.put(&chunk_key(5), pattern(700, 5), PutMode::IfAbsent).await.unwrap_err();
        assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e}");

        // Another process (a restore, wal-fetch) reads them as objects.
        let reader = LocalStore::open_existing(&root).unwrap();
        let listed = reader.list_all("wal/00000001/").await.unwrap();
        assert_eq!(listed.len(), 101, "100 chunks and one segment");
        assert!(listed.windows(2).all(|w| w[0].key < w[1].key), "sorted");
        assert!(listed.iter().all(|m| m.last_modified.is_some()));
        for n in [0, 57, 99] {
            assert_eq!(reader.get(&chunk_key(n)).await.unwrap(), pattern(700, n as u32));
            assert_eq!(reader.head(&chunk_key(n)).await.unwrap().size, 700);
            assert_eq!(reader.get_range(&chunk_key(n), 10..20).await.unwrap(), pattern(700, n as u32).slice(10..20));
        }
        assert!(reader.get(&chunk_key(100)).await.unwrap_err().is_not_found());
        // Write-once holds across processes: a store that does not write the journal (a second
        // agent on this archive gets one: the journal is locked) finds the chunk there.
        let second = LocalStore::open(&root).unwrap().with_journal_size(64 << 10).unwrap();
        assert!(second.journal().is_none(), "one journal writer at a time");
        let e = second.put(&chunk_key(7), pattern(700, 99), PutMode::IfAbsent).await.unwrap_err();
        assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e}");
        assert!(!root.join(chunk_key(7)).exists());

        // Deleting (the agent consolidating the segment) hides them from everyone and
        // retires the journal files that held only them.
        // (A 64 KiB file holds about 80 records of 700 bytes.)
        let keys: Vec<String> = (0..90).map(chunk_key).collect();
        writer.delete(&keys).await.unwrap();
        assert!(writer.get(&chunk_key(0)).await.unwrap_err().is_not_found());
        assert_eq!(reader.list_all("wal/").await.unwrap().len(), 11);
        assert!(reader.get(&chunk_key(10)).await.unwrap_err().is_not_found());
        assert!(
            !j::file_path(&root.join(j::DIR), files[0]).exists(),
            "the first journal file held only deleted chunks"
        );

        // The agent killed and restarted: what was live is still there, deletes still hold.
        drop(writer);
        let writer = LocalStore::open(&root).unwrap().with_journal_size(64 << 10).unwrap();
        assert_eq!(writer.list_all("wal/").await.unwrap().len(), 11);
        assert_eq!(writer.get(&chunk_key(99)).await.unwrap(), pattern(700, 99));
        let rest: Vec<String> = (90..100).map(chunk_key).collect();
        writer.delete(&rest).await.unwrap();
        assert_eq!(reader.list_all("wal/").await.unwrap().len(), 1);
        // Nothing live: only the file the tombstones went into (and its preallocated successor)
        // is left.
        assert!(j::scan(&root.join(j::DIR)).unwrap().entries.is_empty());
        assert!(j::generations(&root.join(j::DIR)).unwrap().len() <= 2);
    }
}

/// Errors a user will meet first: wrong credentials, wrong bucket, nothing listening.
mod s3_bad_input {
    use super::*;

    #[tokio::test]
    async fn wrong_bucket_says_so() {
        let server = S3Server::shared().await.unwrap();
        let store = S3Store::connect("no-such-bucket-here", "p", &server.options()).await.unwrap();
        for e in [
            store.put("k", Bytes::from_static(b"x"), PutMode::IfAbsent).await.unwrap_err(),
            store.get("k").await.unwrap_err(),
            store.list_all("").await.unwrap_err(),
        ] {
            assert!(e.is_permanent(), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("no-such-bucket-here") && msg.contains("HINT"), "{msg}");
        }
    }

    #[tokio::test]
    async fn wrong_secret_is_permanent_with_hint() {
        let server = S3Server::shared().await.unwrap();
        let bucket = server.new_bucket("creds").await.unwrap();
        // The right access key with the wrong secret: SeaweedFS checks the signature.
        let opts = S3Options {
            credentials: Some(walvault_shared::storage::s3::StaticCredentials {
                access_key_id: walvault_tests::s3server::ACCESS_KEY.into(),
                secret_access_key: "not-the-secret".into(),
            }),
            ..server.options()
        };
        let bad = S3Store::connect(&bucket, "", &opts).await.unwrap();
        let e = bad.put("k", Bytes::from_static(b"x"), PutMode::IfAbsent).await.unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
        assert!(!format!("{opts:?}").contains("not-the-secret"), "secrets never reach Debug");
        let good = S3Store::connect(&bucket, "", &server.options()).await.unwrap();
        assert!(good.head("k").await.unwrap_err().is_not_found(), "nothing was written");
    }

    #[tokio::test]
    async fn nothing_listening_is_transient() {
        let port = walvault_tests::free_port().unwrap();
        walvault_tests::s3server::set_credentials_env();
        let opts = S3Options {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: Some("us-east-1".into()),
            force_path_style: true,
            max_attempts: 2,
            ..Default::default()
        };
        let store = S3Store::connect("b", "", &opts).await.unwrap();
        let e = store.get("k").await.unwrap_err();
        assert!(!e.is_permanent() && e.to_string().contains("cannot reach"), "{e}");
    }
}
