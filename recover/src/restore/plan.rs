//! The restore plan: which backup, along which timelines, how far the archive reaches, and
//! whether the target can be honoured — decided from what the archive says before a byte is
//! written. Everything here but [`ArchiveView::load`] is pure and unit-tested.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use walvault_shared::archive::backup::{self, BackupDescription};
use walvault_shared::archive::identity::{self, Identity};
use walvault_shared::archive::read::{Reader, WalListing};
use walvault_shared::archive::walcat::WalCatalog;
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::wal::TimelineHistory;

/// A recovery target.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Time(DateTime<chrono::FixedOffset>),
    Lsn(Lsn),
    Xid(u64),
    Name(String),
    Latest,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "xid {x}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
            Target::Latest => write!(f, "the end of the archived WAL"),
        }
    }
}

/// `--target-time`: RFC 3339 or PostgreSQL's text form, with a zone.
pub fn parse_time(s: &str) -> Result<DateTime<chrono::FixedOffset>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z", "%Y-%m-%d %H:%M:%S%.f %#z", "%Y-%m-%d %H:%M:%S %#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Ok(t);
        }
    }
    bail!(
        "invalid target time {s:?}: not a valid date and time with a zone\nHINT: e.g. 2026-11-26T14:03:27Z or '2026-11-26 14:03:27+01' (a zone is required)"
    )
}

/// `--target-name`: what PostgreSQL's configuration file can hold safely.
pub fn check_target_name(n: &str) -> Result<()> {
    if n.is_empty() || n.len() >= 64 || n.chars().any(|c| c.is_control() || c == '\\') {
        bail!(
            "invalid restore point name {n:?}\nHINT: restore points are 1 to 63 bytes without control characters or backslashes (as pg_create_restore_point makes them)"
        );
    }
    Ok(())
}

/// A timeline path step: a timeline to replay, from where, and until where it is left for
/// the next one (`None`: the last one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStep {
    pub timeline: TimelineId,
    pub from: Lsn,
    pub until: Option<Lsn>,
}

/// What the archive says, read once: identity, complete backups, one WAL listing, history
/// files.
pub struct ArchiveView {
    pub identity: Identity,
    pub backups: Vec<BackupDescription>,
    pub listing: WalListing,
    pub histories: BTreeMap<TimelineId, TimelineHistory>,
}

impl ArchiveView {
    pub async fn load(reader: &Reader) -> Result<Self> {
        let identity = identity::load_existing(reader).await?;
        let seg = identity.wal_segment_size;
        let backups = backup::complete(reader, seg).await?;
        let listing = reader.wal_listing(seg).await?;
        let mut histories = BTreeMap::new();
        for t in listing.catalog.histories.clone() {
            if let Some(h) = reader.history(t).await? {
                histories.insert(t, h);
            }
        }
        Ok(ArchiveView { identity, backups, listing, histories })
    }

    pub fn catalog(&self) -> &WalCatalog {
        &self.listing.catalog
    }

    /// The recoverable window, for hints.
    pub fn describe_window(&self) -> String {
        let Some(first) = self.backups.first() else { return "no complete base backup in the archive".into() };
        let cat = self.catalog();
        let last_tli = cat.highest_timeline().unwrap_or(first.timeline);
        let end = cat.ranges(last_tli).last().map(|r| r.1).unwrap_or(first.stop_lsn);
        format!(
            "the recoverable window is from {} (end of backup {}, {}) to {} on timeline {} (end of the archived WAL); `walvault-recover list` shows it with times",
            first.stop_lsn,
            first.id,
            walvault_shared::time::text(first.stop_time),
            end,
            last_tli
        )
    }

    /// The highest timeline in the archive that descends from `tli` (or `tli` itself).
    pub fn latest_timeline(&self, tli: TimelineId) -> TimelineId {
        let mut best = tli;
        for (t, h) in &self.histories {
            if *t > best && h.entries.iter().any(|e| e.parent == tli) {
                best = *t;
            }
        }
        best
    }

    /// The timelines from the backup's to `target_tli`, following `target_tli`'s history.
    pub fn timeline_path(&self, backup: &BackupDescription, target_tli: TimelineId) -> Result<Vec<PathStep>> {
        timeline_path(backup, target_tli, self.histories.get(&target_tli))
    }
}

/// See [`ArchiveView::timeline_path`].
pub fn timeline_path(
    backup: &BackupDescription,
    target_tli: TimelineId,
    history: Option<&TimelineHistory>,
) -> Result<Vec<PathStep>> {
    let seg = backup.wal_segment_size;
    if target_tli == backup.timeline {
        return Ok(vec![PathStep { timeline: target_tli, from: backup.start_lsn, until: None }]);
    }
    let history = history.with_context(|| format!("the archive has no history file for timeline {target_tli}"))?;
    let mut steps = Vec::new();
    let mut from = backup.start_lsn;
    let mut on_path = false;
    for e in &history.entries {
        on_path |= e.parent == backup.timeline;
        if !on_path {
            continue;
        }
        if e.switchpoint < from {
            bail!(
                "backup {} (timeline {}, start {}) is not on the history of timeline {target_tli}: timeline {} ended at {}",
                backup.id,
                backup.timeline,
                backup.start_lsn,
                e.parent,
                e.switchpoint
            );
        }
        steps.push(PathStep { timeline: e.parent, from, until: Some(e.switchpoint) });
        // The next timeline's file for the switch segment holds the bytes before the switch too.
        from = e.switchpoint.segment_start(seg);
    }
    if !on_path {
        bail!("timeline {target_tli} does not descend from timeline {} of backup {}", backup.timeline, backup.id);
    }
    steps.push(PathStep { timeline: target_tli, from, until: None });
    Ok(steps)
}

/// How far the archive lets a restore go along `path`: the timeline and LSN where contiguous
/// WAL ends.
pub fn reachable_end(cat: &WalCatalog, path: &[PathStep]) -> (TimelineId, Lsn) {
    let mut last = (path[0].timeline, path[0].from);
    for step in path {
        let end = cat.contiguous_end(step.timeline, step.from);
        match step.until {
            Some(u) if end >= u => last = (step.timeline, u),
            _ => return (step.timeline, end),
        }
    }
    last
}

/// The newest backup that ends at or before the target (for a time target: whose stop time,
/// on the agent's clock, is at or before it) and whose chain (for an incremental backup) is
/// whole. A backup skipped for a broken chain is reported on stderr.
pub fn choose_backup<'a>(view: &'a ArchiveView, target: &Target) -> Result<&'a BackupDescription> {
    let backups = &view.backups;
    let fits = |b: &BackupDescription| match target {
        Target::Lsn(l) => b.stop_lsn <= *l,
        Target::Time(t) => b.stop_time <= *t,
        _ => true,
    };
    for b in backups.iter().rev().filter(|b| fits(b)) {
        match backup::chain(backups, &b.id) {
            Ok(_) => return Ok(b),
            Err(e) => eprintln!(
                "restore: WARNING: skipping backup {}: {}; trying an older one",
                b.id,
                format!("{e:#}").lines().next().unwrap_or("")
            ),
        }
    }
    bail!("no base backup ends at or before the target ({target})\nHINT: {}", view.describe_window())
}

/// The restore, decided.
#[derive(Debug, Clone)]
pub struct Plan {
    pub backup: BackupDescription,
    /// The backup's chain, its full backup first and the backup itself last (just the backup
    /// when it is a full one).
    pub chain: Vec<BackupDescription>,
    pub target_timeline: TimelineId,
    pub path: Vec<PathStep>,
    /// Where contiguous WAL ends along the path.
    pub reachable: (TimelineId, Lsn),
    /// Where archived WAL resumes after a gap on the reachable end's timeline, if it does.
    pub gap_resumes: Option<Lsn>,
}

/// Choose the backup and timeline path and prove the WAL up to the target is there.
pub fn plan(
    view: &ArchiveView,
    target: &Target,
    target_timeline: Option<TimelineId>,
    backup_id: Option<&str>,
) -> Result<Plan> {
    if view.backups.is_empty() {
        bail!("the archive has no complete base backup\nHINT: take one with walvault-agent backup");
    }
    let chosen = match backup_id {
        Some(id) => view.backups.iter().find(|b| b.id == id).with_context(|| {
            format!("no complete backup {id} in the archive\nHINT: walvault-recover list shows the backups")
        })?,
        None => choose_backup(view, target)?,
    };
    let chain: Vec<BackupDescription> = backup::chain(&view.backups, &chosen.id)?.into_iter().cloned().collect();
    let target_tli = target_timeline.unwrap_or_else(|| view.latest_timeline(chosen.timeline));
    let path = view.timeline_path(chosen, target_tli)?;
    let cat = view.catalog();
    let reachable = reachable_end(cat, &path);
    // The WAL must reach at least the backup's end (consistency) and an LSN target.
    let need = match target {
        Target::Lsn(l) => (*l).max(chosen.stop_lsn),
        _ => chosen.stop_lsn,
    };
    let short = reachable.1 < need || (reachable.0 == chosen.timeline && reachable.1 < chosen.stop_lsn);
    if short {
        bail!(
            "the archive lacks WAL needed to restore backup {} to {target}: WAL is contiguous only up to {} on timeline {} (needed: {need} from {})\nHINT: {}",
            chosen.id,
            reachable.1,
            reachable.0,
            chosen.start_lsn,
            view.describe_window()
        );
    }
    let gap_resumes = cat.ranges(reachable.0).into_iter().map(|r| r.0).find(|s| *s > reachable.1);
    if let (Target::Latest | Target::Xid(_) | Target::Name(_), Some(resume)) = (target, gap_resumes) {
        bail!(
            "the archive is missing WAL on timeline {} from {} (archived WAL resumes at {resume}); a restore cannot reach past the gap\nHINT: restore to a target before {} (--target-lsn or --target-time), or find the missing WAL",
            reachable.0,
            reachable.1,
            reachable.1
        );
    }
    Ok(Plan { backup: chosen.clone(), chain, target_timeline: target_tli, path, reachable, gap_resumes })
}

/// A time target must not lie beyond the WAL the archive holds: `end_sealed` is when the last
/// reachable WAL was sealed by the agent.
pub fn check_time_target(
    view: &ArchiveView,
    plan: &Plan,
    t: DateTime<Utc>,
    end_sealed: Option<DateTime<Utc>>,
) -> Result<()> {
    let Some(n) = end_sealed else { return Ok(()) };
    if t <= n {
        return Ok(());
    }
    let n = walvault_shared::time::text(n);
    match plan.gap_resumes {
        Some(resume) => bail!(
            "the archive is missing WAL on timeline {} from {} (archived WAL resumes at {resume}), and the target time {t} lies beyond that gap (WAL before it was sealed at {n})\nHINT: {}",
            plan.reachable.0,
            plan.reachable.1,
            view.describe_window()
        ),
        None => bail!(
            "the target time {t} is after the newest archived WAL (sealed at {n})\nHINT: {}; use --latest to recover everything archived",
            view.describe_window()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_shared::archive::names;
    use walvault_shared::lsn::SegNo;
    use walvault_shared::storage::ObjectMeta;
    use walvault_shared::wal::SegmentName;

    const SZ: u64 = 1 << 20;

    fn backup(id: &str, tli: u32, start: u64, stop: u64, stop_time: &str) -> BackupDescription {
        BackupDescription {
            format_version: 2,
            id: id.into(),
            label: String::new(),
            start_lsn: Lsn(start),
            stop_lsn: Lsn(stop),
            timeline: TimelineId(tli),
            stop_timeline: TimelineId(tli),
            start_time: walvault_shared::time::parse(stop_time).unwrap(),
            stop_time: walvault_shared::time::parse(stop_time).unwrap(),
            pg_version_num: 150000,
            system_identifier: "1".into(),
            wal_segment_size: SZ,
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

    fn view(backups: Vec<BackupDescription>, keys: &[String], histories: &[(u32, &str)]) -> ArchiveView {
        let objects = keys.iter().map(|k| ObjectMeta { key: k.clone(), size: 0, last_modified: None }).collect();
        ArchiveView {
            identity: Identity::new(1, 15, SZ),
            backups,
            listing: WalListing::new(objects, SZ),
            histories: histories
                .iter()
                .map(|(t, text)| (TimelineId(*t), TimelineHistory::parse(text).unwrap()))
                .collect(),
        }
    }

    fn seg(t: u32, n: u64) -> String {
        names::segment(&SegmentName::new(TimelineId(t), SegNo(n)), SZ)
    }

    #[test]
    fn newest_backup_before_the_target_and_wal_proven() {
        let v = view(
            vec![
                backup("a", 1, SZ, SZ + 100, "2026-11-26T10:00:00Z"),
                backup("b", 1, 3 * SZ, 3 * SZ + 100, "2026-11-26T12:00:00Z"),
            ],
            &[seg(1, 1), seg(1, 2), seg(1, 3), seg(1, 4)],
            &[],
        );
        let t = |s: &str| Target::Time(parse_time(s).unwrap());
        assert_eq!(plan(&v, &t("2026-11-26T11:00:00Z"), None, None).unwrap().backup.id, "a");
        assert_eq!(plan(&v, &t("2026-11-26T13:00:00Z"), None, None).unwrap().backup.id, "b");
        assert_eq!(plan(&v, &Target::Lsn(Lsn(2 * SZ)), None, None).unwrap().backup.id, "a");
        let p = plan(&v, &Target::Latest, None, None).unwrap();
        assert_eq!((p.backup.id.as_str(), p.reachable), ("b", (TimelineId(1), Lsn(5 * SZ))));
        let e = plan(&v, &t("2026-11-26T09:00:00Z"), None, None).unwrap_err().to_string();
        assert!(e.contains("no base backup ends at or before") && e.contains("HINT"), "{e}");
        let e = plan(&v, &Target::Lsn(Lsn(6 * SZ)), None, None).unwrap_err().to_string();
        assert!(e.contains("lacks WAL") && e.contains("contiguous only up to 0/500000"), "{e}");
        assert!(plan(&v, &Target::Latest, None, Some("zzz"))
            .unwrap_err()
            .to_string()
            .contains("no complete backup zzz"));
    }

    #[test]
    fn a_gap_stops_latest_but_not_an_earlier_lsn() {
        let v =
            view(vec![backup("a", 1, SZ, SZ + 100, "2026-11-26T10:00:00Z")], &[seg(1, 1), seg(1, 2), seg(1, 4)], &[]);
        let e = plan(&v, &Target::Latest, None, None).unwrap_err().to_string();
        assert!(e.contains("missing WAL on timeline 1 from 0/300000") && e.contains("resumes at 0/400000"), "{e}");
        let p = plan(&v, &Target::Lsn(Lsn(2 * SZ + 5)), None, None).unwrap();
        assert_eq!(p.gap_resumes, Some(Lsn(4 * SZ)));
        let end = walvault_shared::time::parse("2026-11-26T10:30:00Z");
        assert!(check_time_target(&v, &p, walvault_shared::time::parse("2026-11-26T10:20:00Z").unwrap(), end).is_ok());
        let e =
            check_time_target(&v, &p, walvault_shared::time::parse("2026-11-26T11:00:00Z").unwrap(), end).unwrap_err();
        assert!(e.to_string().contains("beyond that gap"), "{e}");
    }

    #[test]
    fn timeline_path_follows_the_history_across_a_promotion() {
        // Timeline 2 branched from 1 at 0/280000 (inside segment 2).
        let keys = [seg(1, 1), seg(1, 2), seg(2, 2), seg(2, 3), names::history(TimelineId(2))];
        let v = view(
            vec![backup("a", 1, SZ, SZ + 100, "2026-11-26T10:00:00Z")],
            &keys,
            &[(2, "1\t0/280000\tno recovery target specified\n")],
        );
        let p = plan(&v, &Target::Latest, None, None).unwrap();
        assert_eq!(p.target_timeline, TimelineId(2));
        assert_eq!(
            p.path,
            vec![
                PathStep { timeline: TimelineId(1), from: Lsn(SZ), until: Some(Lsn(0x280000)) },
                PathStep { timeline: TimelineId(2), from: Lsn(2 * SZ), until: None },
            ]
        );
        assert_eq!(p.reachable, (TimelineId(2), Lsn(4 * SZ)));
        // Along timeline 1 only, WAL stops where timeline 1's archive stops.
        let p1 = plan(&v, &Target::Latest, Some(TimelineId(1)), None).unwrap();
        assert_eq!(p1.reachable, (TimelineId(1), Lsn(3 * SZ)));
        // A backup on a later timeline is not on timeline 1's path.
        let v2 =
            view(vec![backup("b", 2, 3 * SZ, 3 * SZ + 10, "2026-11-26T11:00:00Z")], &keys, &[(2, "1\t0/280000\tx\n")]);
        assert!(plan(&v2, &Target::Latest, Some(TimelineId(1)), None).is_err());
    }

    #[test]
    fn target_names_that_the_config_file_cannot_hold_are_refused() {
        check_target_name("before-migration").unwrap();
        for bad in ["", "a\nrestore_command='id'", "a\\b", &"x".repeat(64)] {
            assert!(check_target_name(bad).is_err(), "{bad:?}");
        }
    }
}
