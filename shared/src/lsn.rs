//! Log sequence numbers, timelines and segment numbers.
//!
//! An [`Lsn`] is a byte position in PostgreSQL's write-ahead log: a `u64`, written by PostgreSQL
//! as two hexadecimal halves, `X/X` (high 32 bits, low 32 bits, no leading zeros), e.g.
//! `0/16B3748` is `0x0000_0000_016B_3748`. [`Lsn`] parses and prints exactly that form, and
//! serialises as that string in JSON and TOML.
//!
//! Segment arithmetic always takes the segment size as a parameter: it is chosen at `initdb`
//! (`--wal-segsize`, 1 MiB to 1 GiB, a power of two) and read from the server, never assumed.
//!
//! ```
//! use walvault_shared::lsn::Lsn;
//! let lsn: Lsn = "0/16B3748".parse().unwrap();
//! assert_eq!(lsn.0, 0x16B_3748);
//! assert_eq!(lsn.segment_number(16 << 20).0, 1);
//! assert_eq!(lsn.segment_offset(16 << 20), 0x6B_3748);
//! assert_eq!(lsn.to_string(), "0/16B3748");
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in the WAL stream (`XLogRecPtr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// A WAL timeline (`TimeLineID`). Timeline 0 is never valid; a new cluster starts on 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

/// A WAL segment number (`XLogSegNo`): `lsn / segment_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegNo(pub u64);

/// Smallest WAL segment size PostgreSQL accepts (`WalSegMinSize`, 1 MiB).
pub const MIN_SEGMENT_SIZE: u64 = 1 << 20;
/// Largest WAL segment size PostgreSQL accepts (`WalSegMaxSize`, 1 GiB).
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;
/// PostgreSQL's default segment size (16 MiB).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;

/// Whether `size` is a segment size PostgreSQL accepts (`IsValidWalSegSize`): a power of two
/// from 1 MiB to 1 GiB.
pub fn is_valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size)
}

/// An LSN text that is not `X/X` with 1–8 hex digits on each side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected PostgreSQL's X/X form, e.g. 0/16B3748")]
pub struct LsnParseError(pub String);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);
    pub const MAX: Lsn = Lsn(u64::MAX);

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }
    pub fn checked_sub(self, n: u64) -> Option<Lsn> {
        self.0.checked_sub(n).map(Lsn)
    }
    pub fn saturating_sub(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
    /// Bytes from `self` up to `later`, or `None` when `later` is behind.
    pub fn distance_to(self, later: Lsn) -> Option<u64> {
        later.0.checked_sub(self.0)
    }

    /// Segment holding this byte (`XLByteToSeg`).
    pub fn segment_number(self, segment_size: u64) -> SegNo {
        debug_assert!(is_valid_segment_size(segment_size));
        SegNo(self.0 / segment_size)
    }
    /// Offset of this byte inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, segment_size: u64) -> u64 {
        debug_assert!(is_valid_segment_size(segment_size));
        self.0 % segment_size
    }
    /// Whether this LSN is the first byte of a segment.
    pub fn is_segment_start(self, segment_size: u64) -> bool {
        self.segment_offset(segment_size) == 0
    }
    /// Start of the segment holding this byte.
    pub fn segment_start(self, segment_size: u64) -> Lsn {
        Lsn(self.0 - self.segment_offset(segment_size))
    }
}

impl SegNo {
    /// First LSN of this segment (`XLogSegNoOffsetToRecPtr` with offset 0), `None` on overflow.
    pub fn start_lsn(self, segment_size: u64) -> Option<Lsn> {
        self.0.checked_mul(segment_size).map(Lsn)
    }
    /// LSN just past this segment's last byte, `None` on overflow.
    pub fn end_lsn(self, segment_size: u64) -> Option<Lsn> {
        self.0.checked_add(1)?.checked_mul(segment_size).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| -> Result<u64, LsnParseError> {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_postgres_forms() {
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("ffffffff/ffffffff".parse::<Lsn>().unwrap(), Lsn::MAX);
        for bad in ["", "0", "/0", "0/", "1/2/3", "123456789/0", "g/0", "0/-1", " 0/1"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn segment_arithmetic() {
        let seg = 16 << 20;
        let lsn = Lsn(0x1_0000_0000 + 3 * seg + 5);
        assert_eq!(lsn.segment_number(seg), SegNo(256 + 3));
        assert_eq!(lsn.segment_offset(seg), 5);
        assert_eq!(lsn.segment_start(seg), Lsn(0x1_0000_0000 + 3 * seg));
        assert_eq!(SegNo(259).start_lsn(seg), Some(lsn.segment_start(seg)));
        assert_eq!(SegNo(259).end_lsn(seg), Some(Lsn(0x1_0000_0000 + 4 * seg)));
        assert_eq!(SegNo(u64::MAX).end_lsn(seg), None);
        assert!(is_valid_segment_size(1 << 20));
        assert!(is_valid_segment_size(1 << 30));
        assert!(!is_valid_segment_size(1 << 31));
        assert!(!is_valid_segment_size(3 << 20));
    }

    #[test]
    fn checked_arithmetic() {
        assert_eq!(Lsn::MAX.checked_add(1), None);
        assert_eq!(Lsn(0).checked_sub(1), None);
        assert_eq!(Lsn(5).distance_to(Lsn(3)), None);
        assert_eq!(Lsn(3).distance_to(Lsn(5)), Some(2));
    }

    #[test]
    fn serde_as_string() {
        let v = serde_json::to_string(&Lsn(0x1_0000_00A0)).unwrap();
        assert_eq!(v, "\"1/A0\"");
        assert_eq!(serde_json::from_str::<Lsn>(&v).unwrap(), Lsn(0x1_0000_00A0));
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
    }

    proptest! {
        #[test]
        fn text_round_trip(v: u64) {
            let s = Lsn(v).to_string();
            prop_assert_eq!(s.parse::<Lsn>().unwrap(), Lsn(v));
        }

        #[test]
        fn segment_round_trip(v: u64, shift in 20u32..=30) {
            let seg = 1u64 << shift;
            let lsn = Lsn(v);
            let start = lsn.segment_number(seg).start_lsn(seg).unwrap();
            prop_assert_eq!(start.0 + lsn.segment_offset(seg), v);
        }
    }
}
