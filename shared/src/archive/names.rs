//! The catalogue of every object name walvault writes. Nothing else in the code builds a key by
//! hand. A listing alone tells what an object is, its timeline, segment and LSN range.
//!
//! | object | grammar | example (timeline 1, 16 MiB segments) |
//! |---|---|---|
//! | repository identity | `walvault.repository` | `walvault.repository` |
//! | timeline history | `wal/TTTTTTTT.history` | `wal/00000002.history` |
//! | whole WAL segment | `wal/TTTTTTTT/<segment file name>` | `wal/00000001/000000010000000000000003` |
//! | WAL chunk | `wal/TTTTTTTT/<segment file name>.<start>-<end>` | `wal/00000001/000000010000000000000003.0000000003000000-00000000030A2000` |
//! | backup part | `backups/<backup id>/part-NNNNNN` | `backups/20261126T141500Z/part-000000` |
//! | backup manifest | `backups/<backup id>/backup_manifest` | `backups/20261126T141500Z/backup_manifest` |
//! | backup description | `backups/<backup id>/backup.json` | `backups/20261126T141500Z/backup.json` |
//! | backup writer lock | `backups/<backup id>/backup.lock` | `backups/20261126T141500Z/backup.lock` |
//! | commit index batch | `index/batch/<day>/<HHMMSS>-<first LSN>` | `index/batch/2026-11-26/141503-0000000003000000` |
//! | commit index of a day | `index/day/<day>` | `index/day/2026-11-26` |
//! | epoch key (encryption) | `keys/<epoch id>` | `keys/0f1e2d3c4b5a69788796a5b4c3d2e1f0` |
//! | restore drill record | `drills/<drill id>` | `drills/20261130T020000Z-3f9a2c1b` |
//!
//! `TTTTTTTT` is the timeline in 8 upper-case hex digits; `<start>`/`<end>` are LSNs as 16
//! upper-case hex digits, `end` exclusive, so chunks sort by position and a chunk's range is in
//! its name. A backup id is the backup's start time, `YYYYMMDDTHHMMSSZ` (UTC); a drill id is the
//! drill's start time the same way, `-`, and 8 random lower-case hex digits. An epoch id is
//! 32 lower-case hex digits (16 random bytes). Every object is stored in the envelope of
//! [`super::envelope`]; a name says nothing about compression or encryption. Which objects are
//! encrypted when the archive is: [`is_confidential`].

use crate::lsn::{Lsn, TimelineId};
use crate::wal::{history_file_name, parse_history_file_name, SegmentName};

pub const IDENTITY: &str = "walvault.repository";
pub const WAL_PREFIX: &str = "wal/";
pub const BACKUPS_PREFIX: &str = "backups/";
pub const INDEX_PREFIX: &str = "index/";
pub const KEYS_PREFIX: &str = "keys/";
pub const DRILLS_PREFIX: &str = "drills/";
pub const LEASES_PREFIX: &str = "leases/";

/// A restore drill's record.
pub fn drill(id: &str) -> String {
    format!("{DRILLS_PREFIX}{id}")
}

/// A restore's lease on its backups and WAL ([`super::lease`]).
pub fn lease(id: &str) -> String {
    format!("{LEASES_PREFIX}{id}")
}

/// An epoch key object (its id as 32 hex digits).
pub fn epoch_key(id_hex: &str) -> String {
    format!("keys/{id_hex}")
}

/// Whether an object carries database content, and so is encrypted when the archive is: WAL
/// chunks and segments, backup parts and manifests. (The identity, history files, backup
/// descriptions and locks, the commit index and key objects carry metadata only.)
pub fn is_confidential(key: &str) -> bool {
    matches!(
        parse(key, crate::lsn::DEFAULT_SEGMENT_SIZE),
        Some(
            ArchiveKey::Segment(_)
                | ArchiveKey::Chunk { .. }
                | ArchiveKey::BackupPart { .. }
                | ArchiveKey::BackupManifest { .. }
        )
    ) || key.starts_with(WAL_PREFIX) && !key.ends_with(".history")
}

/// A batch of chunk records (`day` = UTC day of the batch's first durable time).
pub fn index_batch(day: &str, hhmmss: &str, first: Lsn) -> String {
    format!("index/batch/{day}/{hhmmss}-{:016X}", first.0)
}

/// A whole day's chunk records, merged from its batches.
pub fn index_day(day: &str) -> String {
    format!("index/day/{day}")
}

pub fn timeline_dir(tli: TimelineId) -> String {
    format!("wal/{:08X}/", tli.0)
}

pub fn history(tli: TimelineId) -> String {
    format!("wal/{}", history_file_name(tli))
}

pub fn segment(seg: &SegmentName, segment_size: u64) -> String {
    format!("wal/{:08X}/{}", seg.timeline.0, seg.file_name(segment_size))
}

pub fn chunk(seg: &SegmentName, segment_size: u64, start: Lsn, end: Lsn) -> String {
    format!("{}.{:016X}-{:016X}", segment(seg, segment_size), start.0, end.0)
}

/// Whether `key` has a chunk object's shape, `wal/TTTTTTTT/<24 hex>.<16 hex>-<16 hex>`, whatever
/// the segment size (what the local store's commit journal takes).
pub fn is_chunk_key(key: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    let Some(rest) = key.strip_prefix(WAL_PREFIX) else { return false };
    let Some((dir, file)) = rest.split_once('/') else { return false };
    let Some((seg, range)) = file.split_once('.') else { return false };
    let Some((s, e)) = range.split_once('-') else { return false };
    hex(dir, 8) && hex(seg, 24) && hex(s, 16) && hex(e, 16)
}

/// The prefix every chunk of `seg` (and nothing else) starts with, for a listing.
pub fn chunks_of(seg: &SegmentName, segment_size: u64) -> String {
    format!("{}.", segment(seg, segment_size))
}

/// The prefix of every object of one backup.
pub fn backup_dir(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/")
}

/// The prefix of the commit index's batches.
pub const INDEX_BATCH_PREFIX: &str = "index/batch/";

pub fn backup_part(id: &str, n: u32) -> String {
    format!("backups/{id}/part-{n:06}")
}

pub fn backup_manifest(id: &str) -> String {
    format!("backups/{id}/backup_manifest")
}

pub fn backup_description(id: &str) -> String {
    format!("backups/{id}/backup.json")
}

pub fn backup_lock(id: &str) -> String {
    format!("backups/{id}/backup.lock")
}

/// What a key names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveKey {
    Identity,
    History(TimelineId),
    Segment(SegmentName),
    Chunk { segment: SegmentName, start: Lsn, end: Lsn },
    BackupPart { id: String, n: u32 },
    BackupManifest { id: String },
    BackupDescription { id: String },
    BackupLock { id: String },
    IndexBatch { day: String },
    IndexDay { day: String },
    EpochKey { id: String },
    Drill { id: String },
    Lease { id: String },
}

/// Parse a key back into what it names; `None` for a key that is not in the catalogue.
pub fn parse(key: &str, segment_size: u64) -> Option<ArchiveKey> {
    if key == IDENTITY {
        return Some(ArchiveKey::Identity);
    }
    if let Some(rest) = key.strip_prefix(WAL_PREFIX) {
        if let Ok(tli) = parse_history_file_name(rest) {
            return Some(ArchiveKey::History(tli));
        }
        let (dir, file) = rest.split_once('/')?;
        let (name, range) = match file.split_once('.') {
            Some((n, r)) => (n, Some(r)),
            None => (file, None),
        };
        let seg = SegmentName::parse(name, segment_size).ok()?;
        if dir != format!("{:08X}", seg.timeline.0) {
            return None;
        }
        let Some(range) = range else { return Some(ArchiveKey::Segment(seg)) };
        let (s, e) = range.split_once('-')?;
        let hex = |h: &str| {
            (h.len() == 16 && h.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
                .then(|| u64::from_str_radix(h, 16).ok())
                .flatten()
        };
        let (start, end) = (Lsn(hex(s)?), Lsn(hex(e)?));
        let seg_start = seg.start_lsn(segment_size);
        let seg_end = seg.segno.end_lsn(segment_size)?;
        if start >= end || start < seg_start || end > seg_end {
            return None;
        }
        return Some(ArchiveKey::Chunk { segment: seg, start, end });
    }
    if let Some(rest) = key.strip_prefix(KEYS_PREFIX) {
        let ok = rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        return ok.then(|| ArchiveKey::EpochKey { id: rest.to_string() });
    }
    for (prefix, drill) in [(DRILLS_PREFIX, true), (LEASES_PREFIX, false)] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (t, nonce) = rest.split_once('-')?;
            let ok = is_backup_id(t)
                && nonce.len() == 8
                && nonce.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let id = rest.to_string();
            return ok.then_some(if drill { ArchiveKey::Drill { id } } else { ArchiveKey::Lease { id } });
        }
    }
    if let Some(rest) = key.strip_prefix("index/day/") {
        return is_day(rest).then(|| ArchiveKey::IndexDay { day: rest.to_string() });
    }
    if let Some(rest) = key.strip_prefix("index/batch/") {
        let (day, name) = rest.split_once('/')?;
        let (hms, lsn) = name.split_once('-')?;
        let ok = is_day(day)
            && hms.len() == 6
            && hms.bytes().all(|b| b.is_ascii_digit())
            && lsn.len() == 16
            && u64::from_str_radix(lsn, 16).is_ok();
        return ok.then(|| ArchiveKey::IndexBatch { day: day.to_string() });
    }
    if let Some(rest) = key.strip_prefix(BACKUPS_PREFIX) {
        let (id, file) = rest.split_once('/')?;
        if !is_backup_id(id) {
            return None;
        }
        let id = id.to_string();
        return match file {
            "backup_manifest" => Some(ArchiveKey::BackupManifest { id }),
            "backup.json" => Some(ArchiveKey::BackupDescription { id }),
            "backup.lock" => Some(ArchiveKey::BackupLock { id }),
            _ => {
                let n = file.strip_prefix("part-")?;
                if n.len() != 6 || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Some(ArchiveKey::BackupPart { id, n: n.parse().ok()? })
            }
        };
    }
    None
}

fn is_day(d: &str) -> bool {
    d.len() == 10 && chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok()
}

/// `YYYYMMDDTHHMMSSZ`.
pub fn is_backup_id(id: &str) -> bool {
    chrono::NaiveDateTime::parse_from_str(id, "%Y%m%dT%H%M%SZ").is_ok() && id.len() == 16
}

/// The backup id for a backup started at `t`.
pub fn backup_id(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::SegNo;

    const MB16: u64 = 16 << 20;

    #[test]
    fn catalogue_examples_round_trip() {
        let seg = SegmentName::new(TimelineId(1), SegNo(3));
        let s = segment(&seg, MB16);
        assert_eq!(s, "wal/00000001/000000010000000000000003");
        let c = chunk(&seg, MB16, Lsn(0x3000000), Lsn(0x30A2000));
        assert_eq!(c, "wal/00000001/000000010000000000000003.0000000003000000-00000000030A2000");
        assert_eq!(history(TimelineId(2)), "wal/00000002.history");
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-26T14:15:00Z").unwrap().with_timezone(&chrono::Utc);
        let id = backup_id(t);
        assert_eq!(id, "20261126T141500Z");
        let cases = [
            (IDENTITY.to_string(), ArchiveKey::Identity),
            (s.clone(), ArchiveKey::Segment(seg)),
            (c.clone(), ArchiveKey::Chunk { segment: seg, start: Lsn(0x3000000), end: Lsn(0x30A2000) }),
            (history(TimelineId(2)), ArchiveKey::History(TimelineId(2))),
            (backup_part(&id, 12), ArchiveKey::BackupPart { id: id.clone(), n: 12 }),
            (backup_manifest(&id), ArchiveKey::BackupManifest { id: id.clone() }),
            (backup_description(&id), ArchiveKey::BackupDescription { id: id.clone() }),
            (backup_lock(&id), ArchiveKey::BackupLock { id: id.clone() }),
            (index_batch("2026-11-26", "141503", Lsn(0x3000000)), ArchiveKey::IndexBatch { day: "2026-11-26".into() }),
            (index_day("2026-11-26"), ArchiveKey::IndexDay { day: "2026-11-26".into() }),
            (
                epoch_key("0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
                ArchiveKey::EpochKey { id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into() },
            ),
        ];
        for (key, want) in cases {
            crate::storage::validate_key("t", &key).unwrap();
            assert_eq!(parse(&key, MB16), Some(want), "{key}");
        }
    }

    #[test]
    fn chunks_sort_by_position_after_their_segment() {
        let seg = SegmentName::new(TimelineId(1), SegNo(3));
        let mut keys = [
            chunk(&seg, MB16, Lsn(0x3100000), Lsn(0x3200000)),
            segment(&seg.next(), MB16),
            chunk(&seg, MB16, Lsn(0x3000000), Lsn(0x3100000)),
            segment(&seg, MB16),
        ];
        keys.sort();
        assert_eq!(keys[0], segment(&seg, MB16));
        assert!(keys[1].contains("0000000003000000-"));
        assert_eq!(keys[3], segment(&seg.next(), MB16));
    }

    #[test]
    fn rejects_foreign_keys() {
        for k in [
            "wal/00000002/000000010000000000000003", // wrong dir
            "wal/00000001/000000010000000000000003.0000000004000000-0000000004100000", // outside segment
            "wal/00000001/000000010000000000000003.0000000003100000-0000000003000000", // reversed
            "wal/00000001/000000010000000000000003.3000000-30A2000",
            "backups/yesterday/backup.json",
            "backups/20261126T141500Z/part-1",
            "other/thing",
        ] {
            assert_eq!(parse(k, MB16), None, "{k}");
        }
    }
}
