//! Retention: which backups to keep, and the WAL they need.
//!
//! Rules (see docs/operations.md, "Retention"):
//! * `retain_full = N` keeps the newest N *full* backups and every incremental built on them;
//! * `retain_days = D` keeps every backup that finished within the last D days, plus the newest
//!   one that finished before that (it is needed to recover to the start of the window);
//! * with both, a backup is kept if either rule keeps it; with neither, nothing is deleted;
//!   the newest backup is always kept;
//! * chains stay whole: a kept incremental keeps its parent, and so on down to its full backup,
//!   so a full backup is expired only together with all its incrementals; deletion goes newest
//!   first, so an interruption never leaves an incremental without its parent;
//! * WAL (segments and chunks, on every timeline) is deleted only where it ends at or before
//!   the start of the segment holding the oldest kept backup's start LSN: everything a kept
//!   backup needs, from its start onwards, stays. History files are always kept.
//! * Leftovers of interrupted backups are removed when their writer is gone.
//! * A restore, drill or dump in progress holds a lease ([`walvault_shared::archive::lease`]):
//!   every backup an unexpired lease names is kept, with its chain, and so is the WAL from the
//!   lease's LSN; expired leases are deleted.
//!
//! Every deletion is logged; `dry_run` logs and reports without deleting.

use anyhow::Result;
use walvault_shared::archive::backup::{self, BackupDescription};
use walvault_shared::archive::lease;
use walvault_shared::archive::names::{self, ArchiveKey};
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::write::Writer;
use walvault_shared::lsn::Lsn;

#[derive(Clone, Debug, Default)]
pub struct RetentionPolicy {
    pub retain_full: Option<usize>,
    pub retain_days: Option<u32>,
}

impl RetentionPolicy {
    pub fn is_set(&self) -> bool {
        self.retain_full.is_some() || self.retain_days.is_some()
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ExpireReport {
    pub kept_backups: Vec<String>,
    pub deleted_backups: Vec<String>,
    pub wal_cutoff: Option<Lsn>,
    pub deleted_wal_objects: usize,
    pub deleted_wal_keys: Vec<String>,
    /// Backups kept only because a restore, drill or dump holds a lease on them.
    pub leased_backups: Vec<String>,
    pub dry_run: bool,
}

/// Which backups (oldest first) the policy keeps.
pub fn keep(backups: &[BackupDescription], policy: &RetentionPolicy, now: chrono::DateTime<chrono::Utc>) -> Vec<bool> {
    let n = backups.len();
    let mut keep = vec![!policy.is_set(); n];
    if n == 0 {
        return keep;
    }
    let parent_of = |i: usize| -> Option<usize> {
        let p = backups[i].parent.as_ref()?;
        backups.iter().position(|b| &b.id == p)
    };
    // The full backup each backup's chain starts at (None: its chain is broken).
    let root_of = |mut i: usize| -> Option<usize> {
        for _ in 0..=n {
            if backups[i].parent.is_none() {
                return Some(i);
            }
            i = parent_of(i)?;
        }
        None
    };
    if let Some(k) = policy.retain_full {
        let fulls: Vec<usize> = (0..n).filter(|i| backups[*i].parent.is_none()).collect();
        let kept_fulls = &fulls[fulls.len().saturating_sub(k)..];
        for (i, flag) in keep.iter_mut().enumerate() {
            if root_of(i).is_some_and(|r| kept_fulls.contains(&r)) {
                *flag = true;
            }
        }
    }
    if let Some(d) = policy.retain_days {
        let window_start = now - chrono::Duration::days(d as i64);
        let mut newest_before: Option<usize> = None;
        for (i, b) in backups.iter().enumerate() {
            if b.stop_time >= window_start {
                keep[i] = true;
            } else {
                newest_before = Some(i);
            }
        }
        if let Some(i) = newest_before {
            keep[i] = true;
        }
    }
    keep[n - 1] = true;
    // Whole chains: a kept backup keeps its ancestors.
    for i in 0..n {
        if keep[i] {
            let mut j = i;
            while let Some(p) = parent_of(j) {
                if keep[p] && p != i {
                    break;
                }
                keep[p] = true;
                j = p;
            }
        }
    }
    keep
}

pub async fn expire(
    writer: &Writer,
    segment_size: u64,
    policy: &RetentionPolicy,
    dry_run: bool,
) -> Result<ExpireReport> {
    let store = &**writer.store();
    let reader = Reader::new(writer.store().clone(), None);
    let mut report = ExpireReport { dry_run, ..Default::default() };
    if !dry_run {
        crate::basebackup::remove_abandoned(&reader, segment_size).await?;
    }
    let backups = backup::complete(&reader, segment_size).await?;
    if backups.is_empty() || !policy.is_set() {
        report.kept_backups = backups.iter().map(|b| b.id.clone()).collect();
        return Ok(report);
    }
    let now = chrono::Utc::now();
    let mut flags = keep(&backups, policy, now);
    let (leases, expired_leases) = lease::all(&reader, now).await?;
    for l in &leases {
        for id in &l.backups {
            if let Some(i) = backups.iter().position(|b| &b.id == id) {
                if !flags[i] {
                    tracing::info!(backup = %id, "keeping a backup that a {} on {} (pid {}) holds a lease on until {}", l.purpose, l.host, l.pid, walvault_shared::time::text(l.honoured_until()));
                    report.leased_backups.push(id.clone());
                }
                flags[i] = true;
            }
        }
    }
    if !dry_run && !expired_leases.is_empty() {
        tracing::info!(count = expired_leases.len(), "removing expired leases");
        store.delete(&expired_leases).await?;
    }
    // Newest first: an incremental goes before its parent.
    for (b, k) in backups.iter().zip(&flags).rev() {
        if *k {
            report.kept_backups.insert(0, b.id.clone());
        } else {
            tracing::info!(backup = %b.id, dry_run, "expiring backup (start {}, stop {})", b.start_lsn, b.stop_time);
            if !dry_run {
                backup::delete_backup(store, &b.id).await?;
            }
            report.deleted_backups.insert(0, b.id.clone());
        }
    }
    let oldest_kept =
        backups.iter().zip(&flags).filter(|(_, k)| **k).map(|(b, _)| b.start_lsn).min().expect("newest is kept");
    let leased_wal = leases.iter().map(|l| l.wal_from).min();
    let cutoff = leased_wal.map_or(oldest_kept, |w| w.min(oldest_kept)).segment_start(segment_size);
    report.wal_cutoff = Some(cutoff);
    let mut doomed = Vec::new();
    for o in store.list_all(names::WAL_PREFIX).await? {
        let end = match names::parse(&o.key, segment_size) {
            Some(ArchiveKey::Segment(s)) => s.segno.end_lsn(segment_size),
            Some(ArchiveKey::Chunk { end, .. }) => Some(end),
            _ => None, // history files and foreign keys stay
        };
        if end.is_some_and(|e| e <= cutoff) {
            doomed.push(o.key);
        }
    }
    doomed.sort();
    tracing::info!(count = doomed.len(), %cutoff, dry_run, "expiring WAL below the oldest kept backup");
    // One INFO line per timeline directory with the first and last key; every key at DEBUG.
    let mut by_dir: std::collections::BTreeMap<&str, Vec<&String>> = Default::default();
    for k in &doomed {
        by_dir.entry(k.rsplit_once('/').map(|x| x.0).unwrap_or("")).or_default().push(k);
        tracing::debug!(key = %k, dry_run, "expire WAL object");
    }
    for (dir, keys) in by_dir {
        tracing::info!(dry_run, "expire {} WAL objects in {dir}/: {} .. {}", keys.len(), keys[0], keys[keys.len() - 1]);
    }
    if !dry_run {
        store.delete(&doomed).await?;
    }
    report.deleted_wal_objects = doomed.len();
    report.deleted_wal_keys = doomed;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_shared::lsn::TimelineId;

    fn b(id: &str, stop: &str) -> BackupDescription {
        BackupDescription {
            format_version: 1,
            id: id.into(),
            label: String::new(),
            start_lsn: Lsn(0),
            stop_lsn: Lsn(0),
            timeline: TimelineId(1),
            stop_timeline: TimelineId(1),
            start_time: walvault_shared::time::parse(stop).unwrap(),
            stop_time: walvault_shared::time::parse(stop).unwrap(),
            pg_version_num: 150000,
            system_identifier: "1".into(),
            wal_segment_size: 16 << 20,
            archives: vec![],
            manifest_bytes: 0,
            raw_bytes: 0,
            stored_bytes: 0,
            duration_seconds: 0.0,
            parent: None,
            incremental_from: None,
            chain_depth: 0,
            manifest_sha256: None,
            block_size: None,
            relseg_blocks: None,
        }
    }

    fn incr(id: &str, stop: &str, parent: &str) -> BackupDescription {
        BackupDescription { parent: Some(parent.into()), chain_depth: 1, ..b(id, stop) }
    }

    #[test]
    fn chains_are_kept_whole() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T00:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let bs = vec![
            b("f1", "2026-11-01T00:00:00Z"),
            incr("i1", "2026-11-02T00:00:00Z", "f1"),
            incr("i2", "2026-11-03T00:00:00Z", "i1"),
            b("f2", "2026-11-10T00:00:00Z"),
            incr("i3", "2026-11-11T00:00:00Z", "f2"),
            incr("i4", "2026-11-24T00:00:00Z", "i3"),
        ];
        // One full: f2 and everything built on it.
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: Some(1), retain_days: None }, now),
            vec![false, false, false, true, true, true]
        );
        // 3 days: i4 is inside; it needs i3 and f2, nothing older.
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: None, retain_days: Some(3) }, now),
            vec![false, false, false, true, true, true]
        );
        // 20 days: i2 is the newest before the window; its chain stays whole.
        assert_eq!(keep(&bs, &RetentionPolicy { retain_full: None, retain_days: Some(20) }, now), vec![true; 6]);
        // Two fulls: everything.
        assert_eq!(keep(&bs, &RetentionPolicy { retain_full: Some(2), retain_days: None }, now), vec![true; 6]);
        // Zero fulls: the newest, with its chain.
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: Some(0), retain_days: None }, now),
            vec![false, false, false, true, true, true]
        );
        // An incremental whose parent is gone (a broken chain) is not kept by retain_full.
        let broken = vec![incr("orphan", "2026-11-01T00:00:00Z", "gone"), b("f", "2026-11-02T00:00:00Z")];
        assert_eq!(keep(&broken, &RetentionPolicy { retain_full: Some(5), retain_days: None }, now), vec![false, true]);
    }

    #[test]
    fn count_and_window() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T00:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let bs = vec![
            b("a", "2026-11-01T00:00:00Z"),
            b("b", "2026-11-10T00:00:00Z"),
            b("c", "2026-11-20T00:00:00Z"),
            b("d", "2026-11-25T00:00:00Z"),
        ];
        assert_eq!(keep(&bs, &RetentionPolicy::default(), now), vec![true; 4], "no policy: keep all");
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: Some(2), retain_days: None }, now),
            vec![false, false, true, true]
        );
        // 7 days: c and d are inside; b is the newest before the window (needed to reach its start).
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: None, retain_days: Some(7) }, now),
            vec![false, true, true, true]
        );
        assert_eq!(keep(&bs, &RetentionPolicy { retain_full: None, retain_days: Some(20) }, now), vec![true; 4]);
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: None, retain_days: Some(3) }, now),
            vec![false, false, true, true]
        );
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: Some(1), retain_days: Some(1) }, now),
            vec![false, false, true, true]
        );
        assert_eq!(
            keep(&bs, &RetentionPolicy { retain_full: Some(0), retain_days: None }, now),
            vec![false, false, false, true],
            "newest always kept"
        );
    }
}
