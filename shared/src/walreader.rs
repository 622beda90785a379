//! A streaming WAL reader: enough of PostgreSQL's page and record format (PostgreSQL 15, 16, 17
//! and 18) to find transaction commits and aborts (plain and two-phase), prepares and restore
//! points, with their LSNs, xids and timestamps.
//!
//! Majors: the page header's magic (`XLOG_PAGE_MAGIC`) says which one wrote the WAL: 0xD110
//! (15), 0xD113 (16), 0xD116 (17), 0xD118 (18). Page, record and block headers and the xact
//! record layouts are the same in all four except `xl_xact_stats_item` (dropped statistics in
//! commit and abort records), 12 bytes up to 17 and 16 bytes in 18 (`objid` became 64-bit).
//! A magic not in this list, or one that changes within a stream, ends the stream: the reader
//! does not guess at layouts it does not know.
//!
//! Feed it WAL bytes in order ([`WalReader::feed`]) from the start of a segment; it returns the
//! events whose records *end* in the bytes fed so far (a commit is durable once its last byte
//! is). Records may cross page and segment boundaries, record headers included; a segment that
//! starts inside a record (`XLP_FIRST_IS_CONTRECORD`) is handled by skipping the continuation
//! when the reader did not see the record's beginning. An `XLOG_SWITCH` record ends its segment
//! (the rest is padding). A zero `xl_tot_len` or a page header that does not match its position
//! is the end of valid WAL: the reader stops and ignores the rest ([`WalReader::ended`]).
//!
//! Layouts (`access/xlog_internal.h`, `access/xlogrecord.h`, `access/xact.h`):
//! * page header: magic u16, info u16, tli u32, pageaddr u64, rem_len u32; 24 bytes
//!   (`SizeOfXLogShortPHD`), 40 on a segment's first page (`SizeOfXLogLongPHD`: + sysid u64,
//!   seg_size u32, xlog_blcksz u32);
//! * record header: tot_len u32, xid u32, prev u64, info u8, rmid u8, 2 padding, crc u32; 24
//!   bytes; records start MAXALIGNed (8);
//! * after the header, block headers (id 0..=32), then optional origin (253), top-level xid
//!   (252), and the main-data header (255: u8 length, 254: u32 length); the main data is the
//!   record's last bytes.
//!
//! No input makes it panic or allocate more than the record length its (bounded) header claims:
//! `xl_tot_len` above 1 GiB (`XLogRecordMaxSize` is just under) ends the stream.

use crate::lsn::Lsn;

const SHORT_PHD: u64 = 24;
const LONG_PHD: u64 = 40;
const RECORD_HEADER: usize = 24;
const MAX_RECORD: u32 = 1 << 30;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_HAS_INFO: u8 = 0x80;

/// What a transaction-level record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Commit,
    Abort,
    Prepare,
    CommitPrepared,
    AbortPrepared,
    RestorePoint(String),
}

/// A transaction or restore-point record: its LSN (start), end, xid and timestamp
/// (microseconds since 2000-01-01 UTC, PostgreSQL's epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalEvent {
    pub lsn: Lsn,
    pub end: Lsn,
    pub xid: u32,
    pub kind: EventKind,
    pub timestamp: i64,
}

impl WalEvent {
    /// The timestamp as a UTC time.
    pub fn time(&self) -> chrono::DateTime<chrono::Utc> {
        crate::time::from_pg(self.timestamp)
    }

    /// A commit (plain or of a prepared transaction): what recovery targets and the RPO audit
    /// count.
    pub fn is_commit(&self) -> bool {
        matches!(self.kind, EventKind::Commit | EventKind::CommitPrepared)
    }
}

pub struct WalReader {
    segment_size: u64,
    block_size: u64,
    /// Next byte expected.
    pos: Lsn,
    /// Bytes of the record being assembled (header included), and how many it needs.
    rec: Vec<u8>,
    rec_start: Lsn,
    in_record: bool,
    /// Continuation bytes still to skip (a record whose beginning we did not see).
    skip: u64,
    /// A page header being assembled (it may be split across feeds).
    header: Vec<u8>,
    /// After an `XLOG_SWITCH`: skip everything up to this segment start.
    skip_to: Option<u64>,
    ended: bool,
    /// The page magic seen first, and the record layout it implies.
    magic: Option<u16>,
    layout: Layout,
}

/// What differs between majors in the records the reader decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of `xl_xact_stats_item`.
    pub stats_item: usize,
}

/// The major version a WAL page magic belongs to, and its record layout.
pub fn layout_of(magic: u16) -> Option<(u32, Layout)> {
    Some(match magic {
        0xD110 => (15, Layout { stats_item: 12 }),
        0xD113 => (16, Layout { stats_item: 12 }),
        0xD116 => (17, Layout { stats_item: 12 }),
        0xD118 => (18, Layout { stats_item: 16 }),
        _ => return None,
    })
}

impl WalReader {
    /// Read from `start`, which must be a segment start (where the page and record structure
    /// can be picked up).
    pub fn new(start: Lsn, segment_size: u64) -> Self {
        WalReader {
            segment_size,
            block_size: 8192,
            pos: start,
            rec: Vec::new(),
            rec_start: start,
            in_record: false,
            skip: 0,
            header: Vec::new(),
            skip_to: None,
            ended: false,
            magic: None,
            layout: Layout { stats_item: 12 },
        }
    }

    /// The PostgreSQL major whose WAL this is, once a page header was read.
    pub fn major(&self) -> Option<u32> {
        self.magic.and_then(layout_of).map(|(m, _)| m)
    }

    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// Whether the end of valid WAL was found (zeros, or a page that does not belong here).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Feed bytes starting at [`WalReader::position`]; returns the events completed.
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<WalEvent> {
        let mut out = Vec::new();
        while !data.is_empty() && !self.ended {
            if let Some(next) = self.skip_to {
                let n = ((next - self.pos.0) as usize).min(data.len());
                data = &data[n..];
                self.pos = Lsn(self.pos.0 + n as u64);
                if self.pos.0 == next {
                    self.skip_to = None;
                }
                continue;
            }
            let page_off = self.pos.0 % self.block_size;
            // A segment's first page has the long header (decided by where the page
            // starts: the header itself may arrive in pieces).
            let page_start = self.pos.0 - page_off;
            let hdr_len = if page_start % self.segment_size == 0 { LONG_PHD } else { SHORT_PHD };
            // A page header is due at every page start (tracked by `header` while incomplete).
            if page_off < hdr_len && (page_off == 0 || !self.header.is_empty()) {
                let need = (hdr_len - page_off) as usize;
                let n = need.min(data.len());
                self.header.extend_from_slice(&data[..n]);
                data = &data[n..];
                self.pos = Lsn(self.pos.0 + n as u64);
                if self.header.len() < hdr_len as usize {
                    continue;
                }
                let h = std::mem::take(&mut self.header);
                self.page_header(&h);
                continue;
            }
            let page_left = (self.block_size - page_off) as usize;
            if self.skip > 0 {
                let n = (self.skip.min(page_left as u64) as usize).min(data.len());
                data = &data[n..];
                self.pos = Lsn(self.pos.0 + n as u64);
                self.skip -= n as u64;
                continue;
            }
            if !self.in_record {
                // Records start MAXALIGNed; padding up to there is skipped.
                let aligned = (self.pos.0 + 7) & !7;
                if aligned != self.pos.0 {
                    let n = ((aligned - self.pos.0) as usize).min(data.len());
                    data = &data[n..];
                    self.pos = Lsn(self.pos.0 + n as u64);
                    continue;
                }
                self.in_record = true;
                self.rec_start = self.pos;
                self.rec.clear();
            }
            // Copy record bytes up to the page end.
            let want = if self.rec.len() < RECORD_HEADER { RECORD_HEADER } else { self.tot_len() as usize };
            let n = (want - self.rec.len()).min(page_left).min(data.len());
            self.rec.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.pos = Lsn(self.pos.0 + n as u64);
            if self.rec.len() == RECORD_HEADER && want == RECORD_HEADER {
                let tot = self.tot_len();
                if tot == 0 || (tot as usize) < RECORD_HEADER || tot > MAX_RECORD {
                    self.ended = true; // zeros or garbage: end of valid WAL
                    break;
                }
            }
            if self.rec.len() >= RECORD_HEADER && self.rec.len() == self.tot_len() as usize {
                self.in_record = false;
                let rec = std::mem::take(&mut self.rec);
                if let Some(ev) = decode(&rec, self.rec_start, self.pos, self.layout) {
                    out.push(ev);
                }
                if rec[17] == RM_XLOG_ID
                    && rec[16] & 0xF0 == XLOG_SWITCH
                    && !self.pos.is_segment_start(self.segment_size)
                {
                    // The rest of the segment is padding: continue at the next segment.
                    self.skip_to = Some((self.pos.0 / self.segment_size + 1) * self.segment_size);
                }
            }
        }
        out
    }

    fn tot_len(&self) -> u32 {
        u32::from_le_bytes(self.rec[0..4].try_into().expect("4 bytes"))
    }

    fn page_header(&mut self, h: &[u8]) {
        let magic = u16::from_le_bytes([h[0], h[1]]);
        let info = u16::from_le_bytes([h[2], h[3]]);
        let pageaddr = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let rem_len = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
        let page_start = self.pos.0 - h.len() as u64;
        if pageaddr != page_start || self.magic.is_some_and(|m| m != magic) {
            self.ended = true;
            return;
        }
        if self.magic.is_none() {
            match layout_of(magic) {
                Some((_, layout)) => {
                    self.magic = Some(magic);
                    self.layout = layout;
                }
                None => {
                    // Zeros (the end of WAL) or a major this reader does not know.
                    self.ended = true;
                    return;
                }
            }
        }
        if h.len() as u64 == LONG_PHD {
            let blcksz = u32::from_le_bytes(h[36..40].try_into().expect("4 bytes")) as u64;
            if blcksz.is_power_of_two() && (1024..=65536).contains(&blcksz) {
                self.block_size = blcksz;
            }
        }
        let cont = info & XLP_FIRST_IS_CONTRECORD != 0;
        if self.in_record && !cont {
            // The record we were assembling was never finished (overwritten contrecord): drop it.
            self.in_record = false;
            self.rec.clear();
        } else if !self.in_record && cont && self.skip == 0 && self.skip_to.is_none() {
            // We start inside a record whose beginning we did not see.
            self.skip = rem_len as u64;
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn i64_at(b: &[u8], o: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// The record's main data (its last bytes), found by walking the block headers as
/// `DecodeXLogRecord` does: headers continue while more bytes remain than the data they
/// announce (block data and images), so a record with block images and no main data is read
/// right.
fn main_data(rec: &[u8]) -> Option<&[u8]> {
    let mut off = RECORD_HEADER;
    let mut main_len = 0usize;
    let mut datatotal = 0usize;
    while rec.len().checked_sub(off)? > datatotal {
        let id = *rec.get(off)?;
        off += 1;
        match id {
            255 => {
                main_len = *rec.get(off)? as usize;
                break;
            }
            254 => {
                main_len = u32_at(rec, off)? as usize;
                break;
            }
            253 => off += 2,
            252 => off += 4,
            0..=32 => {
                let fork_flags = *rec.get(off)?;
                let data_len = u16::from_le_bytes(rec.get(off + 1..off + 3)?.try_into().ok()?) as usize;
                datatotal += data_len;
                off += 3; // fork_flags, data_length u16
                if fork_flags & 0x10 != 0 {
                    // XLogRecordBlockImageHeader: length u16, hole_offset u16, bimg_info u8
                    let img_len = u16::from_le_bytes(rec.get(off..off + 2)?.try_into().ok()?) as usize;
                    datatotal += img_len;
                    let bimg_info = *rec.get(off + 4)?;
                    off += 5;
                    if bimg_info & 0x01 != 0 && bimg_info & (0x04 | 0x08 | 0x10) != 0 {
                        off += 2; // hole_length (compressed image with a hole)
                    }
                }
                if fork_flags & 0x80 == 0 {
                    off += 12; // RelFileLocator
                }
                off += 4; // BlockNumber
            }
            _ => return None,
        }
    }
    if main_len == 0 {
        return None;
    }
    rec.get(rec.len().checked_sub(main_len)?..)
}

fn decode(rec: &[u8], lsn: Lsn, end: Lsn, layout: Layout) -> Option<WalEvent> {
    let xid = u32_at(rec, 4)?;
    let info = rec[16];
    let rmid = rec[17];
    match rmid {
        RM_XLOG_ID if info & 0xF0 == XLOG_RESTORE_POINT => {
            let d = main_data(rec)?;
            let ts = i64_at(d, 0)?;
            let name_bytes = d.get(8..)?;
            let name_end = name_bytes.iter().position(|b| *b == 0).unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..name_end]).into_owned();
            Some(WalEvent { lsn, end, xid, kind: EventKind::RestorePoint(name), timestamp: ts })
        }
        RM_XACT_ID => {
            let op = info & XLOG_XACT_OPMASK;
            let d = main_data(rec)?;
            let kind = match op {
                0x00 => EventKind::Commit,
                0x10 => EventKind::Prepare,
                0x20 => EventKind::Abort,
                0x30 => EventKind::CommitPrepared,
                0x40 => EventKind::AbortPrepared,
                _ => return None,
            };
            if kind == EventKind::Prepare {
                // TwoPhaseFileHeader: magic, total_len, xid, database, prepared_at.
                return Some(WalEvent { lsn, end, xid: u32_at(d, 8)?, kind, timestamp: i64_at(d, 16)? });
            }
            let ts = i64_at(d, 0)?;
            let mut xid = xid;
            if matches!(kind, EventKind::CommitPrepared | EventKind::AbortPrepared) && info & XLOG_XACT_HAS_INFO != 0 {
                // The header's xid is 0 here; a record whose parts do not add up keeps it (the
                // commit and its time still count).
                xid = twophase_xid(d, kind == EventKind::CommitPrepared, layout).unwrap_or(xid);
            }
            Some(WalEvent { lsn, end, xid, kind, timestamp: ts })
        }
        _ => None,
    }
}

/// The prepared transaction's xid in a COMMIT/ABORT PREPARED record (`ParseCommitRecord`,
/// `ParseAbortRecord`): after the timestamp and xinfo, the optional parts in their order, each
/// a count and its items, then the two-phase xid. Every count is checked against the record.
fn twophase_xid(d: &[u8], commit: bool, layout: Layout) -> Option<u32> {
    let xinfo = u32_at(d, 8)?;
    let mut off = 12usize;
    let skip_items = |off: &mut usize, size: usize| -> Option<()> {
        let n = u32_at(d, *off)? as usize;
        *off = off.checked_add(4)?.checked_add(n.checked_mul(size)?)?;
        (*off <= d.len()).then_some(())
    };
    if xinfo & (1 << 0) != 0 {
        off += 8; // dbinfo
    }
    if xinfo & (1 << 1) != 0 {
        skip_items(&mut off, 4)?; // subxacts
    }
    if xinfo & (1 << 2) != 0 {
        skip_items(&mut off, 12)?; // relfilelocators
    }
    if xinfo & (1 << 8) != 0 {
        skip_items(&mut off, layout.stats_item)?; // dropped stats
    }
    if commit && xinfo & (1 << 3) != 0 {
        skip_items(&mut off, 16)?; // invalidation messages
    }
    if xinfo & (1 << 4) != 0 {
        return u32_at(d, off);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..20000), cut in 0usize..20000) {
            let mut r = WalReader::new(Lsn(1 << 24), 1 << 24);
            let cut = cut.min(data.len());
            let _ = r.feed(&data[..cut]);
            let _ = r.feed(&data[cut..]);
        }
    }

    #[test]
    fn zeros_end_the_stream() {
        let mut r = WalReader::new(Lsn(0), 1 << 24);
        assert!(r.feed(&[0u8; 100]).is_empty());
        assert!(r.ended());
    }
}
