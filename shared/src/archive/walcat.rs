//! What WAL an archive holds: a catalogue built from one listing of `wal/` (the listing and
//! the reads themselves are [`super::read`]'s).
//!
//! Per timeline it knows the whole-segment objects and the chunk objects (which may overlap
//! after a crash: the bytes at one LSN of one timeline are the same in every object that holds
//! them), and answers coverage questions: how far WAL is contiguous from a point, which objects
//! to read for a byte range, which chunks a whole segment has made redundant.
//!
//! Also the metadata every WAL object carries in its envelope ([`WalObjectMeta`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::names::{self, ArchiveKey};
use crate::lsn::{Lsn, SegNo, TimelineId};
use crate::wal::SegmentName;

/// Envelope metadata of a WAL chunk or segment object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalObjectMeta {
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub segment_size: u64,
    /// When the agent sealed the data (RFC 3339, µs). The object became durable when the
    /// store acknowledged it (the store's last-modified time; `durable_at` of each chunk).
    #[serde(with = "crate::time::rfc3339")]
    pub sealed_at: DateTime<Utc>,
    /// For a segment consolidated from chunks: each chunk's range and the time it became
    /// durable, so consolidation loses no precision for the RPO audit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRecord>,
    /// Commits whose records end in this object (for a chunk; a segment has them per chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<CommitStats>,
}

/// Commit records ending in a range of WAL: how many, and the first and last commit time
/// (RFC 3339, µs). Commits are counted where their record ends: that is when they are durable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStats {
    pub count: u64,
    #[serde(default, with = "crate::time::rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub first: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub last: Option<DateTime<Utc>>,
    /// Restore points (`pg_create_restore_point`) whose record ends in the range, in WAL order.
    /// `None` in metadata written before walvault 0.2, which did not record them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_points: Option<Vec<RestorePoint>>,
}

/// A named restore point: its record's LSN and the time it was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub name: String,
    pub lsn: Lsn,
    #[serde(with = "crate::time::rfc3339")]
    pub time: DateTime<Utc>,
}

impl CommitStats {
    /// Count a commit at `t` (commits are added in WAL order).
    pub fn add(&mut self, t: DateTime<Utc>) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(t);
        }
        self.last = Some(t);
    }

    /// Stats of a range whose restore points are recorded (none yet).
    pub fn recording_restore_points() -> Self {
        CommitStats { restore_points: Some(Vec::new()), ..Default::default() }
    }

    /// Record a restore point (in WAL order).
    pub fn add_restore_point(&mut self, name: String, lsn: Lsn, time: DateTime<Utc>) {
        self.restore_points.get_or_insert_with(Vec::new).push(RestorePoint { name, lsn, time });
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    #[serde(default = "tli1")]
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    #[serde(with = "crate::time::rfc3339")]
    pub sealed_at: DateTime<Utc>,
    /// When the store acknowledged the chunk: from then on a crash of the primary loses none
    /// of its commits.
    #[serde(with = "crate::time::rfc3339")]
    pub durable_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<CommitStats>,
}

fn tli1() -> TimelineId {
    TimelineId(1)
}

/// One object holding WAL bytes `[start, end)` of a timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalPiece {
    pub key: String,
    pub start: Lsn,
    pub end: Lsn,
    pub whole_segment: bool,
}

#[derive(Clone, Debug, Default)]
pub struct TimelineWal {
    pub segments: BTreeSet<SegNo>,
    /// start -> chunks starting there (several after a crash, with different ends).
    pub chunks: BTreeMap<Lsn, Vec<WalPiece>>,
}

#[derive(Clone, Debug)]
pub struct WalCatalog {
    pub segment_size: u64,
    pub timelines: BTreeMap<TimelineId, TimelineWal>,
    pub histories: BTreeSet<TimelineId>,
}

impl WalCatalog {
    pub fn empty(segment_size: u64) -> Self {
        WalCatalog { segment_size, timelines: BTreeMap::new(), histories: BTreeSet::new() }
    }

    pub fn add_key(&mut self, key: &str) {
        match names::parse(key, self.segment_size) {
            Some(ArchiveKey::Segment(s)) => {
                self.timelines.entry(s.timeline).or_default().segments.insert(s.segno);
            }
            Some(ArchiveKey::Chunk { segment, start, end }) => {
                let piece = WalPiece { key: key.to_string(), start, end, whole_segment: false };
                self.timelines.entry(segment.timeline).or_default().chunks.entry(start).or_default().push(piece);
            }
            Some(ArchiveKey::History(t)) => {
                self.histories.insert(t);
            }
            _ => {}
        }
    }

    /// The object that holds the byte at `lsn` on `tli` and reaches furthest, if any.
    pub fn piece_at(&self, tli: TimelineId, lsn: Lsn) -> Option<WalPiece> {
        let t = self.timelines.get(&tli)?;
        let seg = SegmentName::containing(tli, lsn, self.segment_size);
        if t.segments.contains(&seg.segno) {
            return Some(WalPiece {
                key: names::segment(&seg, self.segment_size),
                start: seg.start_lsn(self.segment_size),
                end: seg.segno.end_lsn(self.segment_size)?,
                whole_segment: true,
            });
        }
        // Chunks never cross a segment, so only chunks starting in this segment can hold lsn.
        let seg_start = seg.start_lsn(self.segment_size);
        t.chunks
            .range(seg_start..=lsn)
            .flat_map(|(_, v)| v.iter())
            .filter(|p| p.end > lsn)
            .max_by_key(|p| p.end)
            .cloned()
    }

    /// The largest `x` such that `[from, x)` on `tli` is all in the archive (`from` itself if
    /// the byte at `from` is missing).
    pub fn contiguous_end(&self, tli: TimelineId, from: Lsn) -> Lsn {
        let mut pos = from;
        while let Some(p) = self.piece_at(tli, pos) {
            pos = p.end;
        }
        pos
    }

    /// Objects to read, in order, for bytes `[from, to)` of `tli`; `Err(lsn)` names the first
    /// missing byte.
    pub fn pieces_for(&self, tli: TimelineId, from: Lsn, to: Lsn) -> Result<Vec<WalPiece>, Lsn> {
        let mut out = Vec::new();
        let mut pos = from;
        while pos < to {
            let p = self.piece_at(tli, pos).ok_or(pos)?;
            pos = p.end;
            out.push(p);
        }
        Ok(out)
    }

    /// Covered ranges of `tli`, merged, ascending.
    pub fn ranges(&self, tli: TimelineId) -> Vec<(Lsn, Lsn)> {
        let Some(t) = self.timelines.get(&tli) else { return Vec::new() };
        let mut spans: Vec<(Lsn, Lsn)> = t
            .segments
            .iter()
            .filter_map(|s| Some((s.start_lsn(self.segment_size)?, s.end_lsn(self.segment_size)?)))
            .chain(t.chunks.values().flatten().map(|p| (p.start, p.end)))
            .collect();
        spans.sort();
        let mut merged: Vec<(Lsn, Lsn)> = Vec::new();
        for (s, e) in spans {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// Chunks made redundant by a whole-segment object (left over when an agent stopped between
    /// writing a segment and deleting its chunks).
    pub fn redundant_chunks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (tli, t) in &self.timelines {
            for pieces in t.chunks.values() {
                for p in pieces {
                    let seg = SegmentName::containing(*tli, p.start, self.segment_size);
                    if t.segments.contains(&seg.segno) {
                        out.push(p.key.clone());
                    }
                }
            }
        }
        out
    }

    /// Keys of the chunk objects of `seg` (each holds part of that segment).
    pub fn chunks_of(&self, seg: &SegmentName) -> Vec<String> {
        let Some(t) = self.timelines.get(&seg.timeline) else { return Vec::new() };
        let start = seg.start_lsn(self.segment_size);
        let end = Lsn(start.0 + self.segment_size);
        t.chunks.range(start..end).flat_map(|(_, v)| v.iter().map(|p| p.key.clone())).collect()
    }

    pub fn highest_timeline(&self) -> Option<TimelineId> {
        self.timelines.keys().next_back().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SZ: u64 = 1 << 20;

    fn cat(keys: &[String]) -> WalCatalog {
        let mut c = WalCatalog::empty(SZ);
        for k in keys {
            c.add_key(k);
        }
        c
    }

    #[test]
    fn coverage_across_segments_and_chunks() {
        let t = TimelineId(1);
        let s1 = SegmentName::new(t, SegNo(1));
        let s2 = SegmentName::new(t, SegNo(2));
        let c = cat(&[
            names::segment(&s1, SZ),
            names::chunk(&s2, SZ, Lsn(2 * SZ), Lsn(2 * SZ + 100)),
            names::chunk(&s2, SZ, Lsn(2 * SZ + 100), Lsn(2 * SZ + 300)),
            // A crash left an overlapping, shorter chunk.
            names::chunk(&s2, SZ, Lsn(2 * SZ + 100), Lsn(2 * SZ + 200)),
            names::chunk(&s2, SZ, Lsn(2 * SZ + 500), Lsn(2 * SZ + 600)),
            names::history(TimelineId(2)),
        ]);
        assert_eq!(c.contiguous_end(t, Lsn(SZ)), Lsn(2 * SZ + 300));
        assert_eq!(c.contiguous_end(t, Lsn(SZ + 5)), Lsn(2 * SZ + 300));
        assert_eq!(c.contiguous_end(t, Lsn(0)), Lsn(0));
        assert_eq!(c.contiguous_end(t, Lsn(2 * SZ + 500)), Lsn(2 * SZ + 600));
        assert_eq!(c.ranges(t), vec![(Lsn(SZ), Lsn(2 * SZ + 300)), (Lsn(2 * SZ + 500), Lsn(2 * SZ + 600))]);
        let p = c.pieces_for(t, Lsn(SZ + 10), Lsn(2 * SZ + 250)).unwrap();
        assert_eq!(p.len(), 3);
        assert!(p[0].whole_segment);
        assert_eq!(p[2].end, Lsn(2 * SZ + 300), "the furthest-reaching chunk is chosen");
        assert_eq!(c.pieces_for(t, Lsn(SZ), Lsn(2 * SZ + 550)).unwrap_err(), Lsn(2 * SZ + 300));
        assert!(c.histories.contains(&TimelineId(2)));
        assert!(c.redundant_chunks().is_empty());
        let c2 = cat(&[names::segment(&s2, SZ), names::chunk(&s2, SZ, Lsn(2 * SZ), Lsn(2 * SZ + 100))]);
        assert_eq!(c2.redundant_chunks().len(), 1);
    }
}
