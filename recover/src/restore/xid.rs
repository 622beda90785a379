//! `--target-xid`: where the transaction ends, found in the archived WAL before anything is
//! written.
//!
//! PostgreSQL stops at the commit (or abort) record of the target transaction, and a backup
//! whose end lies after that record cannot stop there at all (the server would replay to the end
//! of the WAL looking for it). So the transaction's end is located first: the WAL after the
//! newest backup is decoded, then the WAL between each older backup and the next, newest first,
//! until the record is found; the restore then uses the newest backup that ends before it. The
//! cost is at most one read of the WAL that the restore replays anyway (the usual case: the
//! transaction is after the newest backup and only that WAL is read).
//!
//! Transaction ids are compared on their low 32 bits (as `recovery_target_xid` does: an
//! epoch-qualified id from `txid_current()` is accepted).

use anyhow::{bail, Result};
use walvault_shared::archive::read::Reader;
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::walreader::{EventKind, WalEvent, WalReader};

use super::plan::{ArchiveView, PathStep, Plan, Target};

/// The target transaction's end record, and the timeline it is on.
pub struct Found {
    pub event: WalEvent,
    pub timeline: TimelineId,
}

/// Decode `[from, to)` along `path` (a segment at a time, one reader per timeline step) and
/// return the first commit or abort record of `xid` that ends after `from`.
async fn scan(
    reader: &Reader,
    view: &ArchiveView,
    path: &[PathStep],
    from: Lsn,
    to: Lsn,
    xid: u32,
) -> Result<Option<Found>> {
    let cat = view.catalog();
    let seg = cat.segment_size;
    for step in path {
        let lo = step.from.max(from).segment_start(seg);
        let hi = step.until.unwrap_or(to).min(to).min(cat.contiguous_end(step.timeline, step.from));
        if lo >= hi {
            continue;
        }
        let mut wr = WalReader::new(lo, seg);
        let mut pos = lo;
        while pos < hi {
            let end = Lsn((pos.0 + seg).min(hi.0));
            let w = reader.read_wal(&view.listing, step.timeline, pos, end).await?;
            for event in wr.feed(&w.bytes) {
                let ends = matches!(
                    event.kind,
                    EventKind::Commit | EventKind::Abort | EventKind::CommitPrepared | EventKind::AbortPrepared
                );
                if ends && event.xid == xid && event.end > from {
                    return Ok(Some(Found { event, timeline: step.timeline }));
                }
            }
            pos = end;
        }
    }
    Ok(None)
}

/// Find the transaction's end and plan the restore with the newest backup that ends before it
/// (or check that the backup the operator chose does).
pub async fn plan_for_xid(
    reader: &Reader,
    view: &ArchiveView,
    first: Plan,
    xid: u64,
    target_timeline: Option<TimelineId>,
    backup_id: Option<&str>,
) -> Result<Plan> {
    let x = xid as u32;
    let tli = first.target_timeline;
    // Windows newest first: after the newest candidate backup, then between each older one and
    // the next. A window reaches one segment past its end so a record crossing it is whole.
    let mut candidates: Vec<_> = view
        .backups
        .iter()
        .filter(|b| view.timeline_path(b, tli).is_ok() && b.stop_lsn <= first.backup.stop_lsn)
        .collect();
    candidates.sort_by_key(|b| b.stop_lsn);
    let seg = view.catalog().segment_size;
    let mut upper = first.reachable.1;
    let mut found = None;
    for b in candidates.iter().rev() {
        let path = view.timeline_path(b, tli)?;
        if let Some(f) = scan(reader, view, &path, b.stop_lsn, upper, x).await? {
            found = Some(f);
            break;
        }
        upper = Lsn(b.stop_lsn.segment_start(seg).0 + seg);
        if backup_id.is_some() {
            break; // the chosen backup only
        }
    }
    let Some(f) = found else {
        bail!(
            "transaction {xid} does not commit or abort in the archived WAL after backup {} (end {}) up to {} on timeline {}\nHINT: {}; check the id (SELECT txid_current() in the transaction), or use --target-time",
            candidates.first().map(|b| b.id.as_str()).unwrap_or(&first.backup.id),
            candidates.first().map(|b| b.stop_lsn).unwrap_or(first.backup.stop_lsn),
            first.reachable.1,
            first.reachable.0,
            view.describe_window()
        );
    };
    let what = match f.event.kind {
        EventKind::Abort | EventKind::AbortPrepared => "aborts (its changes will not be there)",
        _ => "commits",
    };
    eprintln!(
        "restore: transaction {xid} {what} at {} ({}, timeline {})",
        f.event.lsn,
        walvault_shared::time::text(f.event.time()),
        f.timeline
    );
    let mut plan = super::plan::plan(view, &Target::Lsn(f.event.end), target_timeline.or(Some(tli)), backup_id)?;
    if plan.backup.stop_lsn > f.event.lsn {
        bail!(
            "backup {} ends at {}, after transaction {xid} ends ({}): recovery cannot stop there\nHINT: choose an older backup or leave out --backup",
            plan.backup.id,
            plan.backup.stop_lsn,
            f.event.lsn
        );
    }
    plan.target_timeline = tli;
    Ok(plan)
}
