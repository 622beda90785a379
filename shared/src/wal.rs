//! WAL file names and timeline history files, exactly as PostgreSQL spells them.
//!
//! # Names
//!
//! | what | grammar | example (16 MiB segments) |
//! |---|---|---|
//! | segment | `TTTTTTTTXXXXXXXXYYYYYYYY` (24 upper-case hex digits) | `000000010000000000000003` |
//! | partial segment | segment name + `.partial` | `000000010000000000000003.partial` |
//! | timeline history | `TTTTTTTT.history` | `00000002.history` |
//!
//! `T` is the timeline, `X` the "log id" (`segno / segments_per_xlogid`), `Y` the segment within
//! it (`segno % segments_per_xlogid`), where `segments_per_xlogid = 2^32 / segment_size`
//! (`XLogSegmentsPerXLogId`). The same segment number therefore has different names under
//! different segment sizes, which is why every conversion takes the segment size.
//!
//! # Timeline history files
//!
//! Text, one line per ancestor timeline, oldest first (`writeTimeLineHistory` in
//! `timeline.c`): `parentTLI<TAB>switchpoint<TAB>reason`, where `switchpoint` is the LSN at which
//! the child timeline branched off the parent. Lines starting with `#` and blank lines are
//! ignored. The history of timeline 3 that branched from 2 at `0/5000060`, which had branched
//! from 1 at `0/3000000`:
//!
//! ```text
//! 1<TAB>0/3000000<TAB>no recovery target specified
//!
//! 2<TAB>0/5000060<TAB>no recovery target specified
//! ```

use std::fmt;
use std::str::FromStr;

use crate::lsn::{is_valid_segment_size, Lsn, SegNo, TimelineId};

/// A WAL file name that does not follow PostgreSQL's grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalNameError {
    #[error("invalid WAL file name {0:?}: expected 24 upper-case hex digits, e.g. 000000010000000000000003")]
    BadSegment(String),
    #[error("invalid WAL file name {name:?}: segment part {seg:#X} does not exist with {segment_size}-byte segments")]
    SegmentOutOfRange { name: String, seg: u32, segment_size: u64 },
    #[error("invalid timeline history file name {0:?}: expected TTTTTTTT.history, e.g. 00000002.history")]
    BadHistory(String),
    #[error("invalid segment size {0}: PostgreSQL allows powers of two from 1 MiB to 1 GiB")]
    BadSegmentSize(u64),
}

/// A WAL segment: timeline and segment number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: TimelineId,
    pub segno: SegNo,
}

/// `XLogSegmentsPerXLogId`: segments per 4 GiB "log id".
pub fn segments_per_xlogid(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

impl SegmentName {
    pub fn new(timeline: TimelineId, segno: SegNo) -> Self {
        SegmentName { timeline, segno }
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: TimelineId, lsn: Lsn, segment_size: u64) -> Self {
        SegmentName { timeline, segno: lsn.segment_number(segment_size) }
    }

    /// The 24-hex file name (`XLogFileName`).
    pub fn file_name(&self, segment_size: u64) -> String {
        let per = segments_per_xlogid(segment_size);
        format!("{:08X}{:08X}{:08X}", self.timeline.0, self.segno.0 / per, self.segno.0 % per)
    }

    /// The `.partial` name PostgreSQL uses for the last, incomplete segment of an old timeline.
    pub fn partial_file_name(&self, segment_size: u64) -> String {
        format!("{}.partial", self.file_name(segment_size))
    }

    /// Parse a 24-hex file name (`XLogFromFileName`). Lower-case hex is refused, as
    /// `IsXLogFileName` refuses it.
    pub fn parse(name: &str, segment_size: u64) -> Result<Self, WalNameError> {
        if !is_valid_segment_size(segment_size) {
            return Err(WalNameError::BadSegmentSize(segment_size));
        }
        if !is_xlog_file_name(name) {
            return Err(WalNameError::BadSegment(name.to_string()));
        }
        let hex = |r: std::ops::Range<usize>| u32::from_str_radix(&name[r], 16).expect("checked hex");
        let (tli, log, seg) = (hex(0..8), hex(8..16), hex(16..24));
        let per = segments_per_xlogid(segment_size);
        if u64::from(seg) >= per {
            return Err(WalNameError::SegmentOutOfRange { name: name.to_string(), seg, segment_size });
        }
        Ok(SegmentName { timeline: TimelineId(tli), segno: SegNo(u64::from(log) * per + u64::from(seg)) })
    }

    pub fn start_lsn(&self, segment_size: u64) -> Lsn {
        // segno < 2^64 / segment_size by construction from a name or an Lsn.
        self.segno.start_lsn(segment_size).unwrap_or(Lsn::MAX)
    }

    pub fn next(&self) -> Self {
        SegmentName { timeline: self.timeline, segno: SegNo(self.segno.0 + 1) }
    }
}

/// `IsXLogFileName`: exactly 24 upper-case hex digits.
pub fn is_xlog_file_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// `TLHistoryFileName`: `TTTTTTTT.history`.
pub fn history_file_name(timeline: TimelineId) -> String {
    format!("{:08X}.history", timeline.0)
}

/// Parse `TTTTTTTT.history` (`IsTLHistoryFileName`).
pub fn parse_history_file_name(name: &str) -> Result<TimelineId, WalNameError> {
    let bad = || WalNameError::BadHistory(name.to_string());
    let hex = name.strip_suffix(".history").ok_or_else(bad)?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)) {
        return Err(bad());
    }
    Ok(TimelineId(u32::from_str_radix(hex, 16).map_err(|_| bad())?))
}

/// What a `restore_command` may be asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalFileName {
    Segment(SegmentName),
    Partial(SegmentName),
    History(TimelineId),
}

impl WalFileName {
    pub fn parse(name: &str, segment_size: u64) -> Result<Self, WalNameError> {
        if let Some(seg) = name.strip_suffix(".partial") {
            return Ok(WalFileName::Partial(SegmentName::parse(seg, segment_size)?));
        }
        if name.ends_with(".history") {
            return Ok(WalFileName::History(parse_history_file_name(name)?));
        }
        Ok(WalFileName::Segment(SegmentName::parse(name, segment_size)?))
    }

    pub fn file_name(&self, segment_size: u64) -> String {
        match self {
            WalFileName::Segment(s) => s.file_name(segment_size),
            WalFileName::Partial(s) => s.partial_file_name(segment_size),
            WalFileName::History(t) => history_file_name(*t),
        }
    }
}

/// One line of a timeline history file: timeline `parent` was left at `switchpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent: TimelineId,
    pub switchpoint: Lsn,
    pub reason: String,
}

/// A timeline's ancestry, as in its `.history` file.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TimelineHistory {
    pub entries: Vec<HistoryEntry>,
}

/// A history file whose text PostgreSQL itself would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timeline history, line {line}: {message}")]
pub struct HistoryParseError {
    pub line: usize,
    pub message: String,
}

impl TimelineHistory {
    /// Parse as `readTimeLineHistory` does: `parentTLI<TAB>X/X[<TAB>reason]` per line, `#`
    /// comments and blank lines ignored; timelines must increase and so must switch points.
    pub fn parse(text: &str) -> Result<Self, HistoryParseError> {
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |m: &str| HistoryParseError { line: i + 1, message: m.to_string() };
            let mut parts = line.splitn(3, ['\t', ' ']);
            let tli =
                parts.next().and_then(|s| s.parse::<u32>().ok()).ok_or_else(|| err("expected a timeline number"))?;
            let lsn = parts
                .next()
                .and_then(|s| s.trim().parse::<Lsn>().ok())
                .ok_or_else(|| err("expected a switch point in X/X form"))?;
            let reason = parts.next().unwrap_or("").trim().to_string();
            if let Some(prev) = entries.last() {
                if tli <= prev.parent.0 {
                    return Err(err("timeline IDs must be in increasing sequence"));
                }
                if lsn < prev.switchpoint {
                    return Err(err("switch points must not go backwards"));
                }
            }
            entries.push(HistoryEntry { parent: TimelineId(tli), switchpoint: lsn, reason });
        }
        Ok(TimelineHistory { entries })
    }

    /// The text PostgreSQL writes (`writeTimeLineHistory`), a blank line between entries.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&format!("{}\t{}\t{}\n", e.parent, e.switchpoint, e.reason));
        }
        out
    }

    /// The timeline `lsn` lies on when following this history to `current` (the timeline whose
    /// history this is): the first ancestor whose switch point is beyond `lsn`.
    pub fn timeline_of(&self, lsn: Lsn, current: TimelineId) -> TimelineId {
        self.entries.iter().find(|e| lsn < e.switchpoint).map(|e| e.parent).unwrap_or(current)
    }
}

impl FromStr for TimelineHistory {
    type Err = HistoryParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TimelineHistory::parse(s)
    }
}

impl fmt::Display for SegmentName {
    /// Debug-friendly form that does not need the segment size: `tli/segno`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timeline {} segment {}", self.timeline, self.segno.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB16: u64 = 16 << 20;

    #[test]
    fn names_match_postgres() {
        let s = SegmentName::new(TimelineId(1), SegNo(3));
        assert_eq!(s.file_name(MB16), "000000010000000000000003");
        // Segment 256 with 16 MiB segments is log 1, seg 0.
        assert_eq!(SegmentName::new(TimelineId(2), SegNo(256)).file_name(MB16), "000000020000000100000000");
        // The same segment number with 1 GiB segments: 4 per log id.
        assert_eq!(SegmentName::new(TimelineId(1), SegNo(5)).file_name(1 << 30), "000000010000000100000001");
        assert_eq!(s.partial_file_name(MB16), "000000010000000000000003.partial");
        assert_eq!(history_file_name(TimelineId(0x1A)), "0000001A.history");
        let lsn: Lsn = "1/A0000028".parse().unwrap();
        assert_eq!(SegmentName::containing(TimelineId(1), lsn, MB16).file_name(MB16), "0000000100000001000000A0");
    }

    #[test]
    fn parse_rejects_what_postgres_rejects() {
        assert!(SegmentName::parse("00000001000000000000000g", MB16).is_err());
        assert!(SegmentName::parse("00000001000000000000000a", MB16).is_err());
        assert!(SegmentName::parse("0000000100000000000000003", MB16).is_err());
        // seg part 0x100 does not exist with 16 MiB segments (256 per log id).
        assert!(matches!(
            SegmentName::parse("000000010000000000000100", MB16),
            Err(WalNameError::SegmentOutOfRange { .. })
        ));
        assert!(SegmentName::parse("000000010000000000000001", 3 << 20).is_err());
        assert!(parse_history_file_name("00000002.histor").is_err());
        assert!(parse_history_file_name("0000002.history").is_err());
        assert_eq!(parse_history_file_name("0000000A.history").unwrap(), TimelineId(10));
    }

    #[test]
    fn wal_file_name_kinds() {
        assert_eq!(
            WalFileName::parse("000000010000000000000003.partial", MB16).unwrap(),
            WalFileName::Partial(SegmentName::new(TimelineId(1), SegNo(3)))
        );
        assert_eq!(WalFileName::parse("00000003.history", MB16).unwrap(), WalFileName::History(TimelineId(3)));
        assert!(WalFileName::parse("000000010000000000000003.backup", MB16).is_err());
    }

    #[test]
    fn history_parse_and_write() {
        let text = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000060\tat restore point \"x\"\n";
        let h = TimelineHistory::parse(text).unwrap();
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[1].parent, TimelineId(2));
        assert_eq!(h.entries[1].switchpoint, "0/5000060".parse().unwrap());
        assert_eq!(h.entries[1].reason, "at restore point \"x\"");
        assert_eq!(h.to_text(), text);
        assert_eq!(h.timeline_of("0/2000000".parse().unwrap(), TimelineId(3)), TimelineId(1));
        assert_eq!(h.timeline_of("0/3000000".parse().unwrap(), TimelineId(3)), TimelineId(2));
        assert_eq!(h.timeline_of("0/6000000".parse().unwrap(), TimelineId(3)), TimelineId(3));
        assert!(TimelineHistory::parse("# comment\n\n").unwrap().entries.is_empty());
        assert!(TimelineHistory::parse("2\t0/5\tx\n1\t0/6\ty\n").is_err());
        assert!(TimelineHistory::parse("x\t0/5\n").is_err());
        assert!(TimelineHistory::parse("1\tnope\n").is_err());
    }

    proptest! {
        #[test]
        fn segment_name_round_trip(tli in 1u32.., seg_shift in 20u32..=30, raw: u64) {
            let size = 1u64 << seg_shift;
            // Any segment whose start LSN fits in 64 bits.
            let segno = SegNo(raw % (u64::MAX / size));
            let s = SegmentName::new(TimelineId(tli), segno);
            let name = s.file_name(size);
            prop_assert!(is_xlog_file_name(&name));
            prop_assert_eq!(SegmentName::parse(&name, size).unwrap(), s);
        }

        #[test]
        fn history_round_trip(steps in proptest::collection::vec((1u32..5, 1u64..1 << 40, "[a-z ]{0,20}"), 0..6)) {
            let mut tli = 0u32;
            let mut lsn = 0u64;
            let mut entries = Vec::new();
            for (dt, dl, reason) in steps {
                tli += dt;
                lsn += dl;
                entries.push(HistoryEntry { parent: TimelineId(tli), switchpoint: Lsn(lsn), reason: reason.trim().to_string() });
            }
            let h = TimelineHistory { entries };
            prop_assert_eq!(TimelineHistory::parse(&h.to_text()).unwrap(), h);
        }
    }
}
