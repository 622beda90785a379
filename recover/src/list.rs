//! `walvault-recover list`: what an archive can restore, by time and by LSN.
//!
//! * every complete backup: id, kind (full, or incremental with its parent and depth in the
//!   chain), timeline, start and stop LSN and time, sizes, and whether its chain is whole;
//!   incomplete ones;
//! * per timeline: the archived WAL ranges, and the recoverable window — from the end of the
//!   oldest backup on (or before) that timeline to the end of contiguous WAL reachable from it,
//!   with the first and last commit time inside that window (from the commit index and WAL
//!   object metadata: commit times are the server's own).

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use walvault_shared::archive::backup::{self, BackupEntry};
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::walcat::ChunkRecord;
use walvault_shared::lsn::{Lsn, TimelineId};

use crate::restore::plan::{self, ArchiveView};

#[derive(Serialize)]
struct BackupRow {
    id: String,
    timeline: TimelineId,
    start_lsn: Lsn,
    stop_lsn: Lsn,
    #[serde(with = "walvault_shared::time::rfc3339")]
    start_time: DateTime<Utc>,
    #[serde(with = "walvault_shared::time::rfc3339")]
    stop_time: DateTime<Utc>,
    raw_bytes: u64,
    stored_bytes: u64,
    /// "full" or "incr".
    kind: &'static str,
    /// Incrementals: the backup this one builds on, and how many incrementals down to the full.
    parent: Option<String>,
    chain_depth: u32,
    /// The full backup the chain starts at, when the chain is whole.
    chain_full: Option<String>,
    /// Why the chain cannot be restored, when it cannot.
    chain_error: Option<String>,
}

#[derive(Serialize)]
struct Range {
    start: Lsn,
    end: Lsn,
}

#[derive(Serialize)]
struct TimelineRow {
    timeline: TimelineId,
    history_file: bool,
    wal_ranges: Vec<Range>,
    recoverable_from_lsn: Option<Lsn>,
    recoverable_to_lsn: Option<Lsn>,
    /// The first and last commit inside the recoverable window.
    #[serde(with = "walvault_shared::time::rfc3339_opt")]
    recoverable_from_time: Option<DateTime<Utc>>,
    #[serde(with = "walvault_shared::time::rfc3339_opt")]
    recoverable_to_time: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct Listing {
    archive: String,
    system_identifier: String,
    pg_major: u32,
    wal_segment_size: u64,
    signed_by_verify_key: bool,
    backups: Vec<BackupRow>,
    incomplete_backups: Vec<String>,
    timelines: Vec<TimelineRow>,
    /// With --restore-points: every restore point found, and whether the whole archive records
    /// them (not the parts written before walvault 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    restore_points: Option<Vec<RestorePointRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restore_points_complete: Option<bool>,
    /// The last restore drills recorded in the archive (newest last, at most 5).
    drills: Vec<walvault_shared::archive::drills::DrillRecord>,
    /// Restores, drills and dumps holding backups and WAL against `expire` now.
    leases: Vec<walvault_shared::archive::lease::Lease>,
}

/// First and last commit time among `records` of `tli` inside `[from, to)`.
fn commit_window(
    records: &[ChunkRecord],
    tli: TimelineId,
    from: Lsn,
    to: Lsn,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let inside = records.iter().filter(|r| r.timeline == tli && r.end_lsn > from && r.end_lsn <= to);
    let mut first: Option<DateTime<Utc>> = None;
    let mut last: Option<DateTime<Utc>> = None;
    for r in inside {
        if let Some(c) = &r.commits {
            first = match (first, c.first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            last = match (last, c.last) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
    }
    (first, last)
}

async fn gather(reader: &Reader) -> Result<Listing> {
    let view = ArchiveView::load(reader).await?;
    let seg = view.identity.wal_segment_size;
    let incomplete = backup::list(reader, seg)
        .await?
        .into_iter()
        .filter_map(|e| if let BackupEntry::Incomplete { id, .. } = e { Some(id) } else { None })
        .collect();
    let (records, _) = reader.chunk_records(&view.listing).await?;
    let cat = view.catalog();
    let mut timelines = Vec::new();
    for tli in cat.timelines.keys() {
        let earliest = view.backups.iter().filter(|b| b.timeline <= *tli).min_by_key(|b| b.start_lsn);
        let mut row = TimelineRow {
            timeline: *tli,
            history_file: cat.histories.contains(tli),
            wal_ranges: cat.ranges(*tli).into_iter().map(|(start, end)| Range { start, end }).collect(),
            recoverable_from_lsn: None,
            recoverable_to_lsn: None,
            recoverable_from_time: None,
            recoverable_to_time: None,
        };
        if let Some(b) = earliest {
            let reach = view.timeline_path(b, *tli).ok().map(|p| plan::reachable_end(cat, &p));
            if let Some((t, end)) = reach.filter(|(t, _)| t == tli) {
                row.recoverable_from_lsn = Some(b.stop_lsn);
                row.recoverable_to_lsn = Some(end);
                // Commits of this timeline's WAL (and of its ancestors', for the start).
                let (_, to_time) = commit_window(&records, t, Lsn(0), end);
                let (from_time, _) = commit_window(&records, b.timeline, b.stop_lsn, Lsn(u64::MAX));
                row.recoverable_from_time = from_time.or(Some(b.stop_time));
                row.recoverable_to_time = to_time;
            }
        }
        timelines.push(row);
    }
    let signed = reader.verify_keys().is_some();
    Ok(Listing {
        archive: reader.url(),
        system_identifier: view.identity.system_identifier.clone(),
        pg_major: view.identity.pg_major,
        wal_segment_size: seg,
        signed_by_verify_key: signed,
        backups: view
            .backups
            .iter()
            .map(|b| BackupRow {
                id: b.id.clone(),
                timeline: b.timeline,
                start_lsn: b.start_lsn,
                stop_lsn: b.stop_lsn,
                start_time: b.start_time,
                stop_time: b.stop_time,
                raw_bytes: b.raw_bytes,
                stored_bytes: b.stored_bytes,
                kind: b.kind(),
                parent: b.parent.clone(),
                chain_depth: b.chain_depth,
                chain_full: backup::chain(&view.backups, &b.id).ok().map(|c| c[0].id.clone()),
                chain_error: backup::chain(&view.backups, &b.id)
                    .err()
                    .map(|e| format!("{e:#}").lines().next().unwrap_or("").to_string()),
            })
            .collect(),
        incomplete_backups: incomplete,
        timelines,
        restore_points: None,
        restore_points_complete: None,
        drills: {
            let all = walvault_shared::archive::drills::list(reader).await?;
            all[all.len().saturating_sub(5)..].to_vec()
        },
        leases: walvault_shared::archive::lease::all(reader, walvault_shared::time::now()).await?.0,
    })
}

fn t(x: Option<DateTime<Utc>>) -> String {
    x.map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f UTC").to_string()).unwrap_or_else(|| "-".into())
}

fn text(l: &Listing) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "archive {} (system {}, PostgreSQL {}, {} MiB segments{})",
        l.archive,
        l.system_identifier,
        l.pg_major,
        l.wal_segment_size >> 20,
        if l.signed_by_verify_key { ", every object read verified" } else { "" }
    );
    let _ = writeln!(s, "\nbackups:");
    if l.backups.is_empty() {
        let _ = writeln!(s, "  (none complete)");
    }
    for b in &l.backups {
        let kind = match &b.parent {
            None => "full".to_string(),
            Some(p) => format!("incr {} on {p}", b.chain_depth),
        };
        let _ = writeln!(
            s,
            "  {}  {kind}  timeline {}  {} .. {}  {} .. {}  {} MiB (stored {} MiB){}",
            b.id,
            b.timeline,
            t(Some(b.start_time)),
            t(Some(b.stop_time)),
            b.start_lsn,
            b.stop_lsn,
            b.raw_bytes >> 20,
            b.stored_bytes >> 20,
            match &b.chain_error {
                Some(e) => format!("\n     NOT RESTORABLE: {e}"),
                None => String::new(),
            }
        );
    }
    for i in &l.incomplete_backups {
        let _ = writeln!(s, "  {i}  INCOMPLETE (interrupted or running)");
    }
    if let Some(points) = &l.restore_points {
        let _ = writeln!(s, "\nrestore points:");
        if points.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for p in points {
            let _ = writeln!(s, "  {:?}  {}  {}  timeline {}", p.name, p.lsn, t(Some(p.time)), p.timeline);
        }
        if l.restore_points_complete == Some(false) {
            let _ = writeln!(
                s,
                "  (part of the archive was written before restore points were recorded: not listed there)"
            );
        }
    }
    if !l.drills.is_empty() {
        let _ = writeln!(s, "\nrestore drills (newest last):");
        for d in &l.drills {
            let _ = writeln!(
                s,
                "  {}  {}  backup {}  target {}{}",
                walvault_shared::time::text(d.started_at),
                if d.pass { "PASSED" } else { "FAILED" },
                d.backup.as_deref().unwrap_or("-"),
                d.target,
                match (&d.failure, d.rto_seconds) {
                    (Some(f), _) => format!("  ({})", f.lines().next().unwrap_or("")),
                    (None, Some(r)) => format!("  RTO {r:.1} s"),
                    _ => String::new(),
                }
            );
        }
    }
    if !l.leases.is_empty() {
        let _ = writeln!(s, "\nleases (expire keeps these backups and the WAL after them):");
        for x in &l.leases {
            let _ = writeln!(
                s,
                "  {} on {} (pid {}): backup {} until {}",
                x.purpose,
                x.host,
                x.pid,
                x.backups.last().map(String::as_str).unwrap_or("-"),
                walvault_shared::time::text(x.honoured_until())
            );
        }
    }
    let _ = writeln!(s, "\ntimelines:");
    for tl in &l.timelines {
        let ranges: Vec<String> = tl.wal_ranges.iter().map(|r| format!("{}..{}", r.start, r.end)).collect();
        let _ = writeln!(s, "  {}  WAL {}", tl.timeline, ranges.join(", "));
        match (tl.recoverable_from_lsn, tl.recoverable_to_lsn) {
            (Some(f), Some(e)) => {
                let _ = writeln!(
                    s,
                    "     recoverable from {} to {} (LSN {f} to {e})",
                    t(tl.recoverable_from_time),
                    t(tl.recoverable_to_time)
                );
            }
            _ => {
                let _ = writeln!(s, "     not recoverable: no complete backup leads here");
            }
        }
    }
    s
}

pub async fn list(reader: &Reader, json: bool, restore_points: bool) -> Result<()> {
    let mut l = gather(reader).await?;
    if restore_points {
        let view = crate::restore::plan::ArchiveView::load(reader).await?;
        let (points, complete) = crate::restore::restore_points(reader, &view).await?;
        l.restore_points = Some(
            points
                .into_iter()
                .map(|(timeline, p)| RestorePointRow { name: p.name, lsn: p.lsn, time: p.time, timeline })
                .collect(),
        );
        l.restore_points_complete = Some(complete);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else {
        print!("{}", text(&l));
    }
    Ok(())
}

#[derive(Serialize)]
struct RestorePointRow {
    name: String,
    lsn: Lsn,
    #[serde(with = "walvault_shared::time::rfc3339")]
    time: DateTime<Utc>,
    timeline: TimelineId,
}
