//! Cutting the received WAL stream into chunks and whole segments.
//!
//! The chunker is fed XLogData payloads in stream order and returns [`Job`]s for the uploader:
//! * a [`Job::Chunk`] when the open chunk is sealed: by the time bound (the caller asks with
//!   [`Chunker::seal`] once `chunk_interval` has passed since its first byte), by the size bound
//!   (`chunk_max_bytes`), or at the end of a segment (a chunk never crosses a segment);
//! * a [`Job::Segment`] right after the chunk that completes a segment, when the chunker has
//!   seen the segment from its first byte (either streamed, or loaded back from the archive
//!   after a restart): the uploader then writes the whole-segment object from the chunks'
//!   compressed frames.
//!
//! When the stream starts inside a segment whose beginning the archive holds (a restart), the
//! server sends that beginning again: each archived piece is checked against the server's
//! bytes by length and crc32 — the agent never reads WAL back from the archive, which it could
//! not decrypt anyway — and a difference is split brain. The verified bytes then become a
//! [`Job::Prefix`], so that the segment can still be written whole.
//!
//! Compression happens here, as bytes arrive: the open chunk is a zstd frame being written by
//! streaming compression (one frame per chunk, one context reused for all) and a running crc32
//! of the plain bytes, so only compressed bytes are ever held (for pgbench-like WAL a fifth to a
//! tenth of the plain size), and a sealed chunk is a ready [`Frame`] that the uploader only
//! wraps in its envelope.
//!
//! Memory: the open chunk's compressed bytes, the chunker's zstd context (about 1 MiB at level
//! 1, kept from chunk to chunk) and, at a restart, the archived prefix of the current segment
//! being verified.

use std::time::Instant;

use bytes::BytesMut;
use walvault_shared::archive::walcat::CommitStats;
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::wal::SegmentName;
use walvault_shared::walreader::{EventKind, WalReader};
use zstd::stream::raw::{Encoder as RawEncoder, InBuffer, Operation, OutBuffer};

use super::uploader::Frame;

/// Work for the uploader. `seq` numbers chunks in stream order; the archived watermark is the
/// end of the longest run of durable chunks from the first.
#[derive(Debug)]
pub enum Job {
    Chunk {
        seq: u64,
        segment: SegmentName,
        start: Lsn,
        end: Lsn,
        /// The chunk's bytes, compressed (one zstd frame), with their plain length and crc32.
        frame: Frame,
        sealed_at: chrono::DateTime<chrono::Utc>,
        commits: CommitStats,
    },
    /// Write the whole segment once every chunk up to `after_seq` is durable, then delete the
    /// segment's chunks.
    Segment { after_seq: u64, segment: SegmentName },
    /// The beginning `[start, frame.end)` of the current segment, archived by an earlier
    /// session and now verified against the server, compressed: the uploader keeps it to build
    /// the whole segment.
    Prefix { start: Lsn, frame: Frame },
}

/// A piece of WAL the archive already holds: `[start, end)` whose plain crc32 is `crc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedPiece {
    pub start: Lsn,
    pub end: Lsn,
    pub crc: u32,
}

pub struct Chunker {
    segment_size: u64,
    /// What the archive already holds from the stream start (`verify_start`), piece by piece:
    /// the server's bytes there must have the same crc32 (else two histories are being mixed:
    /// split brain). Pieces are checked when their end is reached, in order of their ends.
    archived: std::collections::VecDeque<ArchivedPiece>,
    verify_start: Lsn,
    verify_end: Lsn,
    /// The server's bytes from `verify_start` while they are being verified.
    verified: BytesMut,
    max_chunk: usize,
    timeline: TimelineId,
    /// Next byte expected from the server.
    pos: Lsn,
    /// Whether the current segment was seen (streamed or verified) from its first byte.
    whole_segment: bool,
    /// The open chunk: compressed as it arrives.
    chunk: Option<OpenChunk>,
    /// Compresses the open chunk; one frame per chunk, the context reused.
    enc: RawEncoder<'static>,
    zstd_level: i32,
    chunk_start: Lsn,
    chunk_opened: Option<Instant>,
    next_seq: u64,
    /// Finds the commits in the stream (from the first segment start seen).
    reader: Option<WalReader>,
    commits: CommitStats,
}

/// The open chunk: the compressed bytes of its frame so far, and the plain bytes' crc32. The
/// zstd context that compresses them belongs to the chunker and is reused chunk after chunk:
/// creating one per chunk (allocating and clearing about 1 MiB of tables) showed as about 5 %
/// of the agent's perf samples in synchronous mode, where a chunk is one group of commits (16
/// clients), though the agent's CPU time did not measurably drop from this alone.
struct OpenChunk {
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    len: usize,
}

impl OpenChunk {
    fn new() -> Self {
        OpenChunk { out: Vec::new(), crc: crc32fast::Hasher::new(), len: 0 }
    }

    /// Room for at least `want` more compressed bytes (zstd writes whatever fits, and is
    /// called again for the rest).
    fn room(&mut self, want: usize) -> OutBuffer<'_, Vec<u8>> {
        self.out.reserve(want.max(256));
        let pos = self.out.len();
        OutBuffer::around_pos(&mut self.out, pos)
    }

    fn add(&mut self, enc: &mut RawEncoder<'static>, data: &[u8]) {
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            let want = (data.len() - input.pos()) / 2;
            // Compressing into memory cannot fail.
            enc.run(&mut input, &mut self.room(want)).expect("compress into memory");
        }
        self.crc.update(data);
        self.len += data.len();
    }

    /// End the frame; `enc` is ready for the next one.
    fn finish(mut self, enc: &mut RawEncoder<'static>, timeline: TimelineId, end: Lsn) -> Frame {
        while enc.finish(&mut self.room(1024), false).expect("compress into memory") > 0 {}
        enc.reinit().expect("reset zstd context");
        let mut payload = self.out;
        // The Vec grew by doubling: up to half of it is spare capacity, which the frame would
        // otherwise keep until its segment is consolidated (measured with heaptrack: the
        // largest heap user of a streaming agent).
        payload.shrink_to_fit();
        Frame { timeline, end, payload: payload.into(), plain_crc: self.crc.finalize(), plain_len: self.len as u64 }
    }
}

/// What [`Chunker::push`] refuses.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// XLogData that does not start where the previous one ended.
    #[error(
        "WAL stream gap: expected data at {expected}, server sent data starting at {got}; refusing to skip or overlap"
    )]
    Gap { expected: Lsn, got: Lsn },
    #[error(
        "split brain: the server's WAL in {from}..{to} differs from what the archive holds there\nHINT: this archive holds WAL \
         of a different history of this cluster (a copy of it that diverged, or an old primary); give each its own \
         archive. Nothing was overwritten."
    )]
    Diverged { from: Lsn, to: Lsn },
}

impl Chunker {
    /// Stream from `start` on `timeline`. `archived` lists what the archive already holds from
    /// `start` on (contiguous, each piece starting at or after `start`): it is verified against
    /// what the server sends, not uploaded again. When `start` is a segment start the whole
    /// segment is emitted at its end; otherwise (the archive could not supply the segment's
    /// beginning) it stays as chunks.
    pub fn new(
        timeline: TimelineId,
        start: Lsn,
        segment_size: u64,
        max_chunk: usize,
        zstd_level: i32,
        mut archived: Vec<ArchivedPiece>,
        first_seq: u64,
    ) -> Self {
        archived.sort_by_key(|p| p.end);
        let verify_end = archived.last().map(|p| p.end).unwrap_or(start);
        Chunker {
            segment_size,
            archived: archived.into(),
            verify_start: start,
            verify_end,
            verified: BytesMut::new(),
            max_chunk: max_chunk.max(1),
            timeline,
            pos: start,
            whole_segment: start.is_segment_start(segment_size),
            chunk: None,
            enc: RawEncoder::new(zstd_level).expect("zstd context"),
            zstd_level,
            chunk_start: start,
            chunk_opened: None,
            next_seq: first_seq,
            reader: start.is_segment_start(segment_size).then(|| WalReader::new(start, segment_size)),
            commits: CommitStats::recording_restore_points(),
        }
    }

    /// Run the WAL reader over bytes just received; commits count for the open chunk (unless
    /// they end in bytes the archive already had).
    fn scan(&mut self, at: Lsn, bytes: &[u8]) {
        if self.reader.is_none() && at.is_segment_start(self.segment_size) {
            self.reader = Some(WalReader::new(at, self.segment_size));
        }
        let archived = self.archived_from();
        let Some(r) = self.reader.as_mut() else { return };
        if r.position() != at {
            self.reader = None;
            return;
        }
        for e in r.feed(bytes) {
            if e.end <= archived {
                continue;
            }
            match &e.kind {
                EventKind::Commit | EventKind::CommitPrepared => self.commits.add(e.time()),
                EventKind::RestorePoint(name) => self.commits.add_restore_point(name.clone(), e.lsn, e.time()),
                _ => {}
            }
        }
        if r.ended() {
            // Not WAL we understand from here on (should not happen on a live stream).
            self.reader = None;
        }
    }

    pub fn position(&self) -> Lsn {
        self.pos
    }
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    /// When the open chunk received its first byte (`None`: no open chunk).
    pub fn chunk_opened(&self) -> Option<Instant> {
        self.chunk_opened
    }

    /// The first LSN not yet known to be in the archive.
    pub fn archived_from(&self) -> Lsn {
        self.verify_end
    }

    /// Take the server's bytes that the archive already holds: check each archived piece whose
    /// end they reach; at the end of the archived part, hand the bytes over as a
    /// [`Job::Prefix`]. Returns how many bytes of `data` were taken.
    fn verify(&mut self, data: &[u8], jobs: &mut Vec<Job>) -> Result<usize, StreamError> {
        let n = data.len().min((self.verify_end.0 - self.pos.0) as usize);
        self.scan(self.pos, &data[..n]);
        self.verified.extend_from_slice(&data[..n]);
        self.pos = Lsn(self.pos.0 + n as u64);
        while let Some(p) = self.archived.front().filter(|p| p.end <= self.pos) {
            let a = (p.start.0 - self.verify_start.0) as usize;
            let b = (p.end.0 - self.verify_start.0) as usize;
            if crc32fast::hash(&self.verified[a..b]) != p.crc {
                return Err(StreamError::Diverged { from: p.start, to: p.end });
            }
            self.archived.pop_front();
        }
        if self.pos == self.verify_end {
            let data = self.verified.split().freeze();
            if self.whole_segment && !data.is_empty() {
                let frame = Frame::compress(self.timeline, self.verify_end, &data, self.zstd_level);
                jobs.push(Job::Prefix { start: self.verify_start, frame });
            }
            self.verified = BytesMut::new();
        }
        Ok(n)
    }

    /// Add WAL bytes that start at `start`.
    pub fn push(&mut self, start: Lsn, mut data: &[u8], jobs: &mut Vec<Job>) -> Result<(), StreamError> {
        if start != self.pos {
            return Err(StreamError::Gap { expected: self.pos, got: start });
        }
        if self.pos < self.verify_end {
            let n = self.verify(data, jobs)?;
            data = &data[n..];
        }
        while !data.is_empty() {
            if self.chunk.is_none() {
                self.chunk = Some(OpenChunk::new());
                self.chunk_start = self.pos;
                self.chunk_opened = Some(Instant::now());
            }
            let seg_end = self.pos.segment_start(self.segment_size).0 + self.segment_size;
            let room_in_segment = (seg_end - self.pos.0) as usize;
            let chunk = self.chunk.as_mut().expect("open");
            let room_in_chunk = self.max_chunk - chunk.len;
            let n = data.len().min(room_in_segment).min(room_in_chunk);
            chunk.add(&mut self.enc, &data[..n]);
            let full = chunk.len >= self.max_chunk;
            self.scan(self.pos, &data[..n]);
            data = &data[n..];
            self.pos = Lsn(self.pos.0 + n as u64);
            if self.pos.0 == seg_end || full {
                self.seal(jobs);
            }
        }
        Ok(())
    }

    /// Seal the open chunk (no-op when empty); at a segment end also emit the whole segment.
    pub fn seal(&mut self, jobs: &mut Vec<Job>) {
        let Some(chunk) = self.chunk.take().filter(|c| c.len > 0) else {
            return;
        };
        let frame = chunk.finish(&mut self.enc, self.timeline, self.pos);
        let segment = SegmentName::containing(self.timeline, self.chunk_start, self.segment_size);
        let seq = self.next_seq;
        self.next_seq += 1;
        jobs.push(Job::Chunk {
            seq,
            segment,
            start: self.chunk_start,
            end: self.pos,
            frame,
            sealed_at: walvault_shared::time::now(),
            commits: std::mem::replace(&mut self.commits, CommitStats::recording_restore_points()),
        });
        self.chunk_opened = None;
        if self.pos.is_segment_start(self.segment_size) {
            if self.whole_segment {
                jobs.push(Job::Segment { after_seq: seq, segment });
            }
            // The next segment is streamed from its first byte.
            self.whole_segment = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SZ: u64 = 1 << 20;

    fn kinds(jobs: &[Job]) -> Vec<String> {
        jobs.iter()
            .map(|j| match j {
                Job::Chunk { start, end, .. } => format!("c{}-{}", start.0, end.0),
                Job::Segment { segment, .. } => format!("s{}", segment.segno.0),
                Job::Prefix { start, frame } => format!("p{}-{}", start.0, frame.end.0),
            })
            .collect()
    }

    #[test]
    fn splits_on_size_and_segment_and_emits_segments() {
        let mut c = Chunker::new(TimelineId(1), Lsn(SZ), SZ, 400_000, 1, vec![], 0);
        let mut jobs = Vec::new();
        let data = vec![7u8; SZ as usize + 100];
        c.push(Lsn(SZ), &data, &mut jobs).unwrap();
        assert_eq!(
            kinds(&jobs),
            vec![
                format!("c{}-{}", SZ, SZ + 400_000),
                format!("c{}-{}", SZ + 400_000, SZ + 800_000),
                format!("c{}-{}", SZ + 800_000, 2 * SZ),
                "s1".to_string(),
            ]
        );
        assert!(c.chunk_opened().is_some(), "100 bytes of the next segment are open");
        jobs.clear();
        c.seal(&mut jobs);
        assert_eq!(kinds(&jobs), vec![format!("c{}-{}", 2 * SZ, 2 * SZ + 100)]);
        assert!(matches!(c.push(Lsn(2 * SZ + 99), b"x", &mut jobs), Err(StreamError::Gap { .. })));
        assert!(matches!(c.push(Lsn(2 * SZ + 101), b"x", &mut jobs), Err(StreamError::Gap { .. })));
    }

    #[test]
    fn each_chunk_is_a_frame_of_its_own_bytes() {
        // One zstd context compresses chunk after chunk: each frame must decode alone to
        // exactly its chunk, whether the chunk was sealed by size, by the caller, or was a
        // single byte.
        let mut c = Chunker::new(TimelineId(1), Lsn(SZ), SZ, 300_000, 1, vec![], 0);
        let mut jobs = Vec::new();
        let data: Vec<u8> = (0..SZ as usize + 5000).map(|i| (i * 7 % 251) as u8 ^ (i >> 13) as u8).collect();
        let mut at = 0;
        for (i, n) in [1usize, 100, 70_000, 1, 500_000, 3].into_iter().enumerate() {
            c.push(Lsn(SZ + at as u64), &data[at..at + n], &mut jobs).unwrap();
            at += n;
            if i % 2 == 0 {
                c.seal(&mut jobs);
            }
        }
        c.push(Lsn(SZ + at as u64), &data[at..], &mut jobs).unwrap();
        c.seal(&mut jobs);
        let mut whole = Vec::new();
        for j in &jobs {
            if let Job::Chunk { start, end, frame, .. } = j {
                let plain = zstd::decode_all(&frame.payload[..]).unwrap();
                assert_eq!(&plain[..], &data[(start.0 - SZ) as usize..(end.0 - SZ) as usize]);
                assert_eq!((frame.plain_len, frame.plain_crc), (plain.len() as u64, crc32fast::hash(&plain)));
                whole.extend_from_slice(&plain);
            }
        }
        assert_eq!(whole, data);
        let chunks = jobs.iter().filter(|j| matches!(j, Job::Chunk { .. })).count();
        assert_eq!(chunks, 7, "{}", kinds(&jobs).join(" "));
    }

    #[test]
    fn archived_prefix_is_verified_not_reuploaded() {
        let mut jobs = Vec::new();
        let archived_bytes = vec![3u8; 1000];
        // Two archived chunks, the second overlapping the first (left by a crash).
        let pieces = || {
            vec![
                ArchivedPiece { start: Lsn(SZ), end: Lsn(SZ + 600), crc: crc32fast::hash(&archived_bytes[..600]) },
                ArchivedPiece {
                    start: Lsn(SZ + 500),
                    end: Lsn(SZ + 1000),
                    crc: crc32fast::hash(&archived_bytes[500..]),
                },
            ]
        };
        let mut c = Chunker::new(TimelineId(1), Lsn(SZ), SZ, SZ as usize, 1, pieces(), 5);
        assert_eq!(c.archived_from(), Lsn(SZ + 1000));
        // The server resends the archived bytes (in two messages), then new ones.
        c.push(Lsn(SZ), &[3u8; 600], &mut jobs).unwrap();
        let mut more = vec![3u8; 400];
        more.extend_from_slice(&vec![9u8; SZ as usize - 1000]);
        c.push(Lsn(SZ + 600), &more, &mut jobs).unwrap();
        assert_eq!(
            kinds(&jobs),
            vec![format!("p{}-{}", SZ, SZ + 1000), format!("c{}-{}", SZ + 1000, 2 * SZ), "s1".to_string()]
        );
        match (&jobs[0], &jobs[1], &jobs[2]) {
            (Job::Prefix { frame, .. }, Job::Chunk { seq, frame: new, .. }, Job::Segment { after_seq, .. }) => {
                let data = zstd::decode_all(&frame.payload[..]).unwrap();
                assert_eq!(&data[..], &archived_bytes[..], "the verified prefix, from the server");
                assert_eq!((*seq, *after_seq), (5, 5));
                let new_plain = zstd::decode_all(&new.payload[..]).unwrap();
                assert_eq!(
                    (new_plain[0], new_plain.len() as u64),
                    (9, new.plain_len),
                    "only the new bytes are uploaded"
                );
                assert_eq!(new.plain_crc, crc32fast::hash(&new_plain));
            }
            j => panic!("{j:?}"),
        }
        // Different bytes where the archive has some: split brain, naming the piece.
        let mut c = Chunker::new(TimelineId(1), Lsn(SZ), SZ, SZ as usize, 1, pieces(), 0);
        let mut bad = vec![3u8; 700];
        bad[650] = 4;
        c.push(Lsn(SZ), &bad[..600], &mut jobs).unwrap();
        match c.push(
            Lsn(SZ + 600),
            &[3u8; 400].iter().enumerate().map(|(i, b)| if i == 50 { 4 } else { *b }).collect::<Vec<_>>(),
            &mut jobs,
        ) {
            Err(StreamError::Diverged { from, to }) => assert_eq!((from, to), (Lsn(SZ + 500), Lsn(SZ + 1000))),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn mid_segment_start_is_left_as_chunks() {
        let start = Lsn(SZ + 10);
        let mut jobs = Vec::new();
        let mut c = Chunker::new(TimelineId(1), start, SZ, SZ as usize, 1, vec![], 5);
        c.push(start, &vec![1u8; SZ as usize - 10], &mut jobs).unwrap();
        assert_eq!(kinds(&jobs), vec![format!("c{}-{}", SZ + 10, 2 * SZ)]);
    }
}
