//! `--target-time`: which backup, by the server's clock.
//!
//! PostgreSQL stops before the first commit whose timestamp (the server's clock) is after the
//! target, and a backup can only be used if every commit it already holds is at or before the
//! target. A backup's `stop_time` is the agent's clock, which may differ from the server's, so
//! the choice is made from the commit times in the archive's WAL metadata instead: a backup
//! fits when the newest commit before its end LSN (on its timeline) is at or before the target
//! (the chunk record holding its end is decoded to be exact). Where the metadata names no
//! commit before a backup's end, its `stop_time` decides, as before. The newest fitting backup
//! whose chain is whole is chosen; a choice that differs from what the agent's clock alone would
//! give is reported.

use anyhow::Result;
use chrono::{DateTime, Utc};
use walvault_shared::archive::backup::{self, BackupDescription};
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::walcat::ChunkRecord;
use walvault_shared::lsn::TimelineId;
use walvault_shared::walreader::WalReader;

use super::plan::{self, ArchiveView, Plan, Target};

/// The time of the newest commit before `b`'s end LSN on its timeline, from the records (and
/// the WAL of the record holding the end). `None`: the metadata names none.
async fn newest_commit_before_end(
    reader: &Reader,
    view: &ArchiveView,
    records: &[ChunkRecord],
    b: &BackupDescription,
) -> Option<DateTime<Utc>> {
    let seg = view.catalog().segment_size;
    let stop = b.stop_lsn;
    let mut with_commits: Vec<&ChunkRecord> = records
        .iter()
        .filter(|r| r.timeline == b.timeline && r.start_lsn < stop)
        .filter(|r| r.commits.as_ref().is_some_and(|c| c.count > 0))
        .collect();
    with_commits.sort_by_key(|r| r.end_lsn);
    for r in with_commits.iter().rev() {
        let last = r.commits.as_ref().and_then(|c| c.last);
        if r.end_lsn <= stop {
            return last;
        }
        // The record holds the end: only its commits before the end count.
        let from = r.start_lsn.segment_start(seg);
        match reader.read_wal(&view.listing, r.timeline, from, stop).await {
            Ok(w) => {
                let mut wr = WalReader::new(from, seg);
                let newest = wr
                    .feed(&w.bytes)
                    .into_iter()
                    .filter(|e| e.is_commit() && e.end > r.start_lsn && e.end <= stop)
                    .map(|e| e.time())
                    .max();
                if newest.is_some() {
                    return newest;
                }
            }
            Err(_) => return last, // cannot be exact: count the whole record (conservative)
        }
    }
    None
}

/// Plan a restore to time `t` without `--backup`: the newest backup that holds no commit after
/// `t` by the server's clock.
pub async fn plan_for_time(
    reader: &Reader,
    view: &ArchiveView,
    records: &[ChunkRecord],
    target: &Target,
    t: DateTime<Utc>,
    target_timeline: Option<TimelineId>,
) -> Result<Plan> {
    let by_agent_clock = view.backups.iter().rev().find(|b| b.stop_time <= t).map(|b| b.id.clone());
    for b in view.backups.iter().rev() {
        let newest = newest_commit_before_end(reader, view, records, b).await;
        let fits = match newest {
            Some(c) => c <= t,
            None => b.stop_time <= t,
        };
        if !fits || backup::chain(&view.backups, &b.id).is_err() {
            continue;
        }
        if by_agent_clock.as_deref() != Some(b.id.as_str()) {
            eprintln!(
                "restore: backup {} chosen by the server's commit times (its newest commit: {}); the agent stamped its end {} (agent and server clocks differ?)",
                b.id,
                newest.map(walvault_shared::time::text).unwrap_or_else(|| "none".into()),
                walvault_shared::time::text(b.stop_time)
            );
        }
        return plan::plan(view, target, target_timeline, Some(&b.id));
    }
    // None fits: the usual refusal, with the recoverable window.
    plan::plan(view, target, target_timeline, None)
}
