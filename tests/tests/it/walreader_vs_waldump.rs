//! The WAL reader against pg_waldump, on real WAL from the major under test (each of the matrix,
//! 15–18, with that major's own pg_waldump): commits, aborts, prepared transactions (prepare,
//! commit prepared, rollback prepared; with dropped relations, whose dropped-statistics items
//! PostgreSQL 18 widened), restore points, and large records crossing pages and (1 MiB)
//! segments. Same LSNs, xids, kinds and timestamps. (`shared/tests/walreader_majors.rs` checks
//! stored WAL of all four majors on every run.)

use std::collections::BTreeSet;

use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::wal::SegmentName;
use walvault_shared::walreader::{EventKind, WalReader};
use walvault_tests::pg::{PgCluster, PgOptions};

const SEG: u64 = 1 << 20;

/// (lsn, kind, xid, "YYYY-MM-DD HH:MM:SS.ffffff" or restore point name)
type Ev = (Lsn, String, u32, String);

fn parse_waldump(text: &str) -> BTreeSet<Ev> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let field = |name: &str| line.split(name).nth(1).map(|s| s.split(',').next().unwrap_or("").trim().to_string());
        let (Some(lsn), Some(desc)) = (field("lsn: "), line.split("desc: ").nth(1)) else { continue };
        let lsn: Lsn = lsn.parse().unwrap();
        let tx: u32 = field("tx: ").and_then(|t| t.parse().ok()).unwrap_or(0);
        let (kind, rest) = desc.split_once(' ').unwrap_or((desc, ""));
        let ts = |s: &str| s.split(';').next().unwrap().trim().trim_end_matches(" UTC").to_string();
        match kind {
            "COMMIT" | "ABORT" => {
                out.insert((lsn, kind.to_string(), tx, ts(rest)));
            }
            "COMMIT_PREPARED" | "ABORT_PREPARED" => {
                let (xid, t) = rest.split_once(": ").unwrap();
                out.insert((lsn, kind.to_string(), xid.parse().unwrap(), ts(t)));
            }
            "PREPARE" => {
                // "PREPARE gid NAME: TIMESTAMP[; rels(commit): …; …]"
                let t = rest.split(';').next().unwrap().rsplit_once(": ").unwrap().1;
                out.insert((lsn, kind.to_string(), tx, ts(t)));
            }
            "RESTORE_POINT" => {
                out.insert((lsn, kind.to_string(), 0, rest.trim().to_string()));
            }
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_events_as_pg_waldump() {
    let pg = PgCluster::start_new(
        "waldump",
        PgOptions {
            wal_segsize_mb: 1,
            settings: vec!["max_prepared_transactions = 10".into(), "wal_keep_size = '1GB'".into()],
        },
    )
    .unwrap();
    let start: Lsn = pg.query_one_text("SELECT pg_current_wal_insert_lsn()").await.unwrap().parse().unwrap();
    let start = start.segment_start(SEG);
    let sql = [
        "CREATE TABLE t (id int, pad text)",
        "INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 5000) g",
        "BEGIN; INSERT INTO t VALUES (-1, 'aborted'); ROLLBACK",
        "BEGIN; INSERT INTO t VALUES (-2, 'p1'); PREPARE TRANSACTION 'p1'",
        "COMMIT PREPARED 'p1'",
        "BEGIN; INSERT INTO t VALUES (-3, 'p2'); PREPARE TRANSACTION 'p2'",
        "ROLLBACK PREPARED 'p2'",
        // Two-phase transactions that drop tables: their records carry dropped-stats items.
        "CREATE TABLE d1 (v int); CREATE TABLE d2 (v int); CREATE TABLE d3 (v int)",
        "BEGIN; DROP TABLE d1; PREPARE TRANSACTION 'drop1'",
        "COMMIT PREPARED 'drop1'",
        "BEGIN; CREATE TABLE d4 (v int); DROP TABLE d2; PREPARE TRANSACTION 'drop2'",
        "ROLLBACK PREPARED 'drop2'",
        "BEGIN; DROP TABLE d3; ROLLBACK",
        "SELECT pg_create_restore_point('before-big')",
        "CHECKPOINT",
        // Full-page images after the checkpoint: records larger than a page.
        "UPDATE t SET pad = repeat('y', 500) WHERE id % 7 = 0",
        // A subtransaction-heavy commit and a very large single record (a big commit).
        "DO $$ BEGIN FOR i IN 1..300 LOOP BEGIN INSERT INTO t VALUES (i, 's'); EXCEPTION WHEN OTHERS THEN NULL; END; END LOOP; END $$",
        "CREATE TABLE big AS SELECT g FROM generate_series(1, 200000) g",
        "SELECT pg_create_restore_point('after-big')",
    ];
    for s in sql {
        pg.execute(s).await.unwrap();
    }
    for i in 0..50 {
        pg.execute(&format!("INSERT INTO t VALUES ({i}, 'one per tx')")).await.unwrap();
    }
    let end_name = pg.switch_wal().await.unwrap();
    let end_seg = SegmentName::parse(&end_name, SEG).unwrap();
    let end = end_seg.segno.end_lsn(SEG).unwrap();
    // Ours.
    let mut reader = WalReader::new(start, SEG);
    let mut ours = BTreeSet::new();
    let mut seg = SegmentName::containing(TimelineId(1), start, SEG);
    let mut segments = 0;
    while seg.segno <= end_seg.segno {
        let bytes = pg.read_pg_wal(&seg.file_name(SEG)).unwrap();
        // Feed in odd pieces: the reader must not care where chunks are cut.
        for piece in bytes.chunks(12345) {
            for e in reader.feed(piece) {
                let (kind, detail) = match &e.kind {
                    EventKind::Commit => ("COMMIT", None),
                    EventKind::Abort => ("ABORT", None),
                    EventKind::Prepare => ("PREPARE", None),
                    EventKind::CommitPrepared => ("COMMIT_PREPARED", None),
                    EventKind::AbortPrepared => ("ABORT_PREPARED", None),
                    EventKind::RestorePoint(n) => ("RESTORE_POINT", Some(n.clone())),
                };
                let ts = detail.unwrap_or_else(|| e.time().format("%Y-%m-%d %H:%M:%S%.6f").to_string());
                let xid = if kind == "RESTORE_POINT" { 0 } else { e.xid };
                ours.insert((e.lsn, kind.to_string(), xid, ts));
            }
        }
        segments += 1;
        seg = seg.next();
    }
    assert!(segments >= 10, "the workload spans many segments ({segments})");
    assert_eq!(reader.major(), Some(walvault_tests::pg::pg_major()), "the reader knows which major wrote the WAL");
    // pg_waldump's.
    let pg_wal = pg.data.join("pg_wal");
    let mut theirs = BTreeSet::new();
    for rmgr in ["Transaction", "XLOG"] {
        let mut c = walvault_tests::pg::pg_command(&walvault_tests::pg::pg_program("pg_waldump").unwrap()).unwrap();
        c.args([
            "--path",
            pg_wal.to_str().unwrap(),
            "--start",
            &start.to_string(),
            "--end",
            &end.to_string(),
            "--rmgr",
            rmgr,
        ])
        .env("TZ", "UTC");
        let out = c.output().unwrap();
        assert!(out.status.success(), "pg_waldump --rmgr {rmgr}: {}", String::from_utf8_lossy(&out.stderr));
        theirs.extend(parse_waldump(&String::from_utf8_lossy(&out.stdout)));
    }
    let kinds: BTreeSet<&str> = theirs.iter().map(|e| e.1.as_str()).collect();
    for k in ["COMMIT", "ABORT", "PREPARE", "COMMIT_PREPARED", "ABORT_PREPARED", "RESTORE_POINT"] {
        assert!(kinds.contains(k), "workload produced {k}: {kinds:?}");
    }
    let only_ours: Vec<_> = ours.difference(&theirs).collect();
    let only_theirs: Vec<_> = theirs.difference(&ours).collect();
    assert!(
        only_ours.is_empty() && only_theirs.is_empty(),
        "differences:\nonly ours: {only_ours:#?}\nonly pg_waldump: {only_theirs:#?}"
    );
    assert!(ours.len() > 60, "{} events", ours.len());
}
