//! The harness itself, against real PostgreSQL (each major of the matrix): a cluster started as
//! an unprivileged user writes data, switches WAL, and the finished segment is read from its
//! `pg_wal`.

use walvault_shared::lsn::Lsn;
use walvault_shared::wal::SegmentName;
use walvault_tests::pg::{PgCluster, PgOptions};

/// `XLOG_PAGE_MAGIC` per major (xlog_internal.h of each release), written down here rather
/// than taken from the reader under test.
fn xlog_page_magic(major: u32) -> u16 {
    match major {
        15 => 0xD110,
        16 => 0xD113,
        17 => 0xD116,
        18 => 0xD118,
        m => panic!("no XLOG_PAGE_MAGIC known for PostgreSQL {m}"),
    }
}
/// `XLP_LONG_HEADER`: the first page of every segment has the long header.
const XLP_LONG_HEADER: u16 = 0x0002;

#[tokio::test]
async fn cluster_writes_and_switches_wal() {
    walvault_tests::init_logging();
    let pg = PgCluster::start_new("harness", PgOptions::default()).unwrap();
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 10000) g;")
        .await
        .unwrap();
    assert_eq!(pg.query_one_text("SELECT count(*) FROM t").await.unwrap(), "10000");
    // The server runs as the unprivileged user, never as root: the postmaster's real and
    // effective uid, from /proc.
    let data_dir = pg.query_one_text("SELECT current_setting('data_directory')").await.unwrap();
    assert_eq!(std::path::PathBuf::from(data_dir), pg.data);
    let pid = pg.postmaster_pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<u32> = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|u| *u != 0), "postmaster {pid} runs with uids {uids:?}");
    if let Some(u) = walvault_tests::pg::pg_user().unwrap() {
        assert_eq!(uids[0], u.uid, "the postmaster runs as the test's PostgreSQL user");
    }
    let seg_size = pg.wal_segment_size().await.unwrap();
    assert_eq!(seg_size, 16 << 20);
    let insert_lsn: Lsn = pg.query_one_text("SELECT pg_current_wal_insert_lsn()").await.unwrap().parse().unwrap();
    let finished = pg.switch_wal().await.unwrap();
    // Our name arithmetic agrees with the server's pg_walfile_name.
    let ours = SegmentName::containing(walvault_shared::lsn::TimelineId(1), insert_lsn, seg_size);
    assert_eq!(ours.file_name(seg_size), finished);
    // The finished segment is complete, and its first page header says which segment it is.
    let bytes = pg.read_pg_wal(&finished).unwrap();
    assert_eq!(bytes.len() as u64, seg_size);
    let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
    let info = u16::from_le_bytes([bytes[2], bytes[3]]);
    let tli = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    let pageaddr = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert_eq!(magic, xlog_page_magic(walvault_tests::pg::pg_major()));
    assert_eq!(walvault_shared::walreader::layout_of(magic).map(|(m, _)| m), Some(walvault_tests::pg::pg_major()));
    assert_ne!(info & XLP_LONG_HEADER, 0);
    assert_eq!(tli, 1);
    assert_eq!(pageaddr, ours.start_lsn(seg_size).0);
    // XLogLongPageHeaderData: the 24-byte short header, then xlp_sysid at 24, xlp_seg_size at 32.
    let sysid = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
    let ident = pg.query_one_text("SELECT system_identifier FROM pg_control_system()").await.unwrap();
    assert_eq!(sysid.to_string(), ident);
    assert_eq!(u32::from_le_bytes(bytes[32..36].try_into().unwrap()) as u64, seg_size);
    // pg_waldump, an oracle we did not write, reads the segment.
    let dump = pg.run_program("pg_waldump", &["--path", pg.data.join("pg_wal").to_str().unwrap(), &finished]).unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("Heap") && text.contains("COMMIT"), "pg_waldump shows our inserts and commit");
}

#[tokio::test]
async fn cluster_lifecycle_crash_and_other_segment_size() {
    let pg = PgCluster::start_new("lifecycle", PgOptions { wal_segsize_mb: 1, ..Default::default() }).unwrap();
    assert_eq!(pg.wal_segment_size().await.unwrap(), 1 << 20);
    pg.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1);").await.unwrap();
    pg.kill9().unwrap();
    assert!(pg.connect().await.is_err(), "server is down after kill -9");
    pg.start().unwrap();
    assert_eq!(pg.query_one_text("SELECT count(*) FROM t").await.unwrap(), "1", "crash recovery kept the commit");
    pg.restart("fast").unwrap();
    pg.execute("INSERT INTO t VALUES (2)").await.unwrap();
    let name = pg.switch_wal().await.unwrap();
    assert_eq!(pg.read_pg_wal(&name).unwrap().len(), 1 << 20);
}
