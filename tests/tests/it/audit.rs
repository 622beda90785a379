//! The achieved-RPO audit: honest about an agent outage, exact about gaps, fast on a month of
//! synthetic history.

use std::time::{Duration, Instant};

use walvault_shared::archive::envelope::{self, Compression, ObjectKind};
use walvault_shared::archive::identity::{self, Identity};
use walvault_shared::archive::walcat::{ChunkRecord, CommitStats, WalObjectMeta};
use walvault_shared::archive::write::Writer;
use walvault_shared::archive::{index, names};
use walvault_shared::lsn::{Lsn, SegNo, TimelineId};
use walvault_shared::storage::local::LocalStore;
use walvault_shared::storage::{ObjectStore, PutMode};
use walvault_shared::wal::SegmentName;
use walvault_tests::agent::{workspace_binary, Agent};
use walvault_tests::pg::{PgCluster, PgOptions};

fn audit(archive: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let out = std::process::Command::new(workspace_binary("walvault-recover").unwrap())
        .args(["audit", "--archive", archive, "--json"])
        .args(extra)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_shows_as_rpo_window_and_gaps_are_exact() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new(
        "audit",
        PgOptions { settings: vec!["wal_keep_size = '1GB'".into()], ..Default::default() },
    )
    .unwrap();
    let (dir, archive, _) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--chunk-interval", "500ms", "--no-backups"]).unwrap();
    // Commits from before the agent streamed (initdb's, the cluster's start) are archived late
    // by construction; "normal operation" starts once the agent has caught up.
    let start_lsn: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(start_lsn, Duration::from_secs(60)).await.unwrap();
    let streaming_since = chrono::Utc::now();
    pg.execute("CREATE TABLE t (at timestamptz DEFAULT clock_timestamp())").await.unwrap();
    let c = pg.connect().await.unwrap();
    let commit_for = |secs: u64| {
        let c = &c;
        async move {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(secs) {
                c.execute("INSERT INTO t DEFAULT VALUES", &[]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    commit_for(4).await;
    let before_outage = chrono::Utc::now();
    // Take the agent away for a known time while commits continue.
    assert_eq!(agent.stop().unwrap(), 0);
    let outage_start = Instant::now();
    commit_for(10).await;
    let outage = outage_start.elapsed().as_secs_f64();
    agent.restart().unwrap();
    commit_for(3).await;
    for _ in 0..3 {
        pg.switch_wal().await.unwrap();
        c.execute("INSERT INTO t DEFAULT VALUES", &[]).await.unwrap();
    }
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    assert_eq!(agent.stop().unwrap(), 0);

    let (code, r, err) = audit(&archive, &["--rpo-target", "5s"]);
    assert_eq!(code, 1, "target missed during the outage: {err}\n{r:#}");
    let worst = r["worst_windows"][0]["max_rpo_s"].as_f64().unwrap_or_else(|| panic!("no worst window: {r:#}"));
    assert!(
        (outage - 2.0..=outage + 4.0).contains(&worst),
        "worst RPO {worst:.2} s should cover the {outage:.1} s outage: {r:#}"
    );
    assert!(r["commits"].as_u64().unwrap() >= 100, "{r:#}");
    assert_eq!(r["target_met"], false);
    assert!(r["gaps"].as_array().unwrap().is_empty());
    // The human-readable report (docs/audit.md shows one).
    let out = std::process::Command::new(workspace_binary("walvault-recover").unwrap())
        .args(["audit", "--archive", &archive, "--rpo-target", "5s"])
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1));
    // Before the outage, with the agent running normally: the RPO stays near chunk_interval.
    let (code, r, err) = audit(
        &archive,
        &["--since", &streaming_since.to_rfc3339(), "--until", &before_outage.to_rfc3339(), "--rpo-target", "3s"],
    );
    assert_eq!(code, 0, "{err}\n{r:#}");
    let p99 = r["p99_rpo_s"].as_f64().unwrap();
    let max = r["max_rpo_s"].as_f64().unwrap();
    assert!(p99 <= 2.0 && max <= 3.0, "normal operation: p99 {p99:.2} s, max {max:.2} s (chunk_interval 0.5 s)");
    // HTML report with the chart.
    let html = dir.path().join("audit.html");
    let out = std::process::Command::new(workspace_binary("walvault-recover").unwrap())
        .args(["audit", "--archive", &archive, "--html", html.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "no target, no gaps: exit 0");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("<rect") && page.contains("Achieved RPO"));
    // Objects without commit statistics (as an older agent wrote them), and no index: the audit
    // rebuilds the statistics by reading the WAL, and counts the same commits.
    let (_, full, _) = audit(&archive, &[]);
    let store = LocalStore::open_existing(&dir.path().join("repo")).unwrap();
    for m in store.list_all("wal/").await.unwrap() {
        if !matches!(
            names::parse(&m.key, 16 << 20),
            Some(names::ArchiveKey::Segment(_)) | Some(names::ArchiveKey::Chunk { .. })
        ) {
            continue;
        }
        let loose = envelope::Expect { kind: None, max_plain: 16 << 20, what: "test", verify: None, epoch: None };
        let d = envelope::decode(&m.key, &store.get(&m.key).await.unwrap(), &loose).unwrap();
        let mut meta: serde_json::Value = serde_json::from_slice(&d.metadata).unwrap();
        meta.as_object_mut().unwrap().remove("commits");
        meta.as_object_mut().unwrap().remove("chunks");
        let obj =
            envelope::encode(d.header.kind, &meta, &d.content, Compression::Zstd, 1, envelope::Seal::unsigned(&m.key));
        store.put(&m.key, obj.into(), PutMode::Overwrite).await.unwrap();
    }
    let index_keys: Vec<String> = store.list_all("index/").await.unwrap().into_iter().map(|m| m.key).collect();
    store.delete(&index_keys).await.unwrap();
    let (_, rebuilt, err) = audit(&archive, &[]);
    assert_eq!(rebuilt["records_without_commit_data"], 0, "{err}");
    assert_eq!(rebuilt["commits"], full["commits"], "the same commits, found by reading the WAL");
    // A segment deleted from the archive is a gap with its exact LSN range; exit 1.
    let mut segs: Vec<String> = store
        .list_all("wal/00000001/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .filter(|k| matches!(names::parse(k, 16 << 20), Some(names::ArchiveKey::Segment(_))))
        .collect();
    segs.sort();
    assert!(segs.len() >= 2, "{segs:?}");
    let victim = segs[segs.len() - 2].clone();
    let Some(names::ArchiveKey::Segment(vs)) = names::parse(&victim, 16 << 20) else { unreachable!() };
    store.delete(&[victim]).await.unwrap();
    let (code, r, _) = audit(&archive, &[]);
    assert_eq!(code, 1);
    let g = &r["gaps"][0];
    assert_eq!(g["from"].as_str().unwrap(), vs.start_lsn(16 << 20).to_string());
    assert_eq!(g["to"].as_str().unwrap(), SegNo(vs.segno.0 + 1).start_lsn(16 << 20).unwrap().to_string());
    // An empty archive or a wrong prefix is an error, not a pass.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = audit(&format!("file://{}", empty.path().display()), &[]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_days_of_synthetic_history_audit_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn ObjectStore> = std::sync::Arc::new(LocalStore::open(dir.path()).unwrap());
    let writer = Writer::new(store.clone(), None);
    identity::ensure(&writer, &Identity::new(42, 15, 16 << 20)).await.unwrap();
    let start = chrono::DateTime::parse_from_rfc3339("2026-10-01T00:00:00Z").unwrap().with_timezone(&chrono::Utc);
    let per_day = 8640u64; // a chunk every 10 s
    let mut lsn = 0x1000000u64;
    let t = |x: chrono::DateTime<chrono::Utc>| x;
    let mut last = None;
    for day in 0..30u64 {
        let mut records = Vec::with_capacity(per_day as usize);
        for i in 0..per_day {
            let first = start + chrono::Duration::seconds((day * 86400 + i * 10) as i64);
            // One slow moment: day 17, 12:00, an 80 s wait.
            let wait = if day == 17 && i == 4320 { 80_000 } else { 700 };
            records.push(ChunkRecord {
                timeline: TimelineId(1),
                start_lsn: Lsn(lsn),
                end_lsn: Lsn(lsn + 8192),
                sealed_at: t(first + chrono::Duration::milliseconds(wait - 100)),
                durable_at: t(first + chrono::Duration::milliseconds(wait)),
                commits: Some(CommitStats {
                    count: 40,
                    first: Some(t(first)),
                    last: Some(t(first + chrono::Duration::milliseconds(500))),
                    restore_points: None,
                }),
            });
            lsn += 8192;
        }
        let day_s = (start + chrono::Duration::days(day as i64)).format("%Y-%m-%d").to_string();
        let key = names::index_day(&day_s);
        store.put(&key, index::encode(&writer, &key, &records), PutMode::Overwrite).await.unwrap();
        last = records.last().cloned();
    }
    // The WAL listing: one segment, covered by the index.
    let seg = SegmentName::new(TimelineId(1), SegNo(1));
    let meta = WalObjectMeta {
        timeline: TimelineId(1),
        start_lsn: Lsn(1 << 24),
        end_lsn: Lsn(2 << 24),
        segment_size: 16 << 20,
        sealed_at: last.unwrap().sealed_at,
        chunks: vec![],
        commits: None,
    };
    let key = names::segment(&seg, 16 << 20);
    store
        .put(
            &key,
            writer.encode(&key, ObjectKind::WalSegment, &meta, &vec![0u8; 16 << 20], Compression::Zstd, 1),
            PutMode::IfAbsent,
        )
        .await
        .unwrap();
    let t0 = Instant::now();
    let (code, r, err) = audit(&format!("file://{}", dir.path().display()), &["--rpo-target", "60s"]);
    let took = t0.elapsed();
    assert_eq!(code, 1, "the 80 s moment misses a 60 s target: {err}");
    assert_eq!(r["per_day"].as_array().unwrap().len(), 30);
    assert_eq!(r["commits"].as_u64().unwrap(), 30 * per_day * 40);
    let worst = &r["worst_windows"][0];
    assert!((worst["max_rpo_s"].as_f64().unwrap() - 80.0).abs() < 0.01, "{worst}");
    assert!(worst["first_commit"].as_str().unwrap().starts_with("2026-10-18T12:00:00"), "{worst}");
    assert_eq!(r["objects_read"].as_u64().unwrap(), 30, "one GET per day of history");
    assert!(took < Duration::from_secs(60), "30 days audited in {took:?}");
    eprintln!("30-day synthetic audit: {took:?}, {} objects read", r["objects_read"]);
}
