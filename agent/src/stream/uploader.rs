//! The uploader: compress, seal and write WAL objects, and publish the archived watermark.
//!
//! * Chunks arrive compressed (the chunker compresses as WAL arrives) and go up with at most
//!   `concurrency` in flight. Each is written once ([`Writer::put_once_by_checksum`]): the same
//!   content already there (plain length and crc32, the existing object's own checksums
//!   verified) is success (a retry after a timeout, or a restart), different content is split
//!   brain and stops the agent.
//! * Every other failure (store down, throttled, hanging past `upload_timeout`, a full disk) is
//!   retried with backoff until it succeeds or the uploader is cancelled (shutdown past its
//!   deadline): the replication slot holds the WAL meanwhile, and the metrics and logs say how
//!   much is waiting. One exception to the timeout: a chunk put into the local store's commit
//!   journal (synchronous mode) runs on this thread, and holds it until its `fdatasync`
//!   returns.
//! * The archived watermark advances only over the contiguous run of durable chunks (by stream
//!   sequence number), never past a chunk still in flight. It is what the agent reports to
//!   PostgreSQL as flushed.
//! * A whole segment is written once all of its chunks are durable, from their compressed
//!   frames (zstd decodes concatenated frames as one stream, so nothing is compressed twice);
//!   then its chunks are deleted, and those of the previous segment that a lagging listing hid
//!   then. The per-chunk durable times go into the segment's metadata, and every
//!   [`INDEX_INTERVAL`] into a commit index batch.
//!
//! Memory: the compressed frames of the chunks in flight and queued, and those of the segment
//! being filled; an envelope copy of each frame while it uploads.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use walvault_shared::archive::envelope::{Compression, ObjectKind};
use walvault_shared::archive::names;
use walvault_shared::archive::walcat::{ChunkRecord, WalObjectMeta};
use walvault_shared::archive::write::{PutOnceError, PutOutcome, Writer};
use walvault_shared::lsn::{Lsn, SegNo, TimelineId};
use walvault_shared::storage::retry::{RetryError, RetryPolicy};
use walvault_shared::storage::StorageError;
use walvault_shared::wal::SegmentName;

use super::chunker::Job;
use crate::metrics::Metrics;

/// How often consolidated chunk records are written to the commit index.
pub const INDEX_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct UploadConfig {
    pub concurrency: usize,
    pub upload_timeout: Duration,
    pub segment_size: u64,
}

/// Why the uploader stopped before everything was durable.
#[derive(Debug, thiserror::Error)]
pub enum UploadStop {
    /// Split brain: must stop the agent.
    #[error(transparent)]
    Fatal(#[from] PutOnceError),
    /// Cancelled (shutdown deadline) with WAL not yet durable.
    #[error("cancelled with WAL not yet archived")]
    Cancelled,
}

/// A chunk's compressed payload (one zstd frame) and its plain checksum.
#[derive(Clone, Debug)]
pub struct Frame {
    pub timeline: TimelineId,
    pub end: Lsn,
    pub payload: Bytes,
    pub plain_crc: u32,
    pub plain_len: u64,
}

impl Frame {
    /// Compress `data` (which starts at some LSN and ends at `end`) into one frame.
    pub fn compress(timeline: TimelineId, end: Lsn, data: &[u8], level: i32) -> Frame {
        Frame {
            timeline,
            end,
            payload: zstd::bulk::compress(data, level).expect("zstd compress into memory").into(),
            plain_crc: crc32fast::hash(data),
            plain_len: data.len() as u64,
        }
    }
}

enum Done {
    Chunk { seq: u64, end: Lsn, record: ChunkRecord, frame: Frame },
    Segment,
}

/// The frames of `[start, end)` of `tli`, if they cover it exactly and contiguously: their
/// payloads (shared, not copied), the plain length and the combined plain crc32.
fn join_frames(frames: &BTreeMap<Lsn, Frame>, tli: TimelineId, start: Lsn, end: Lsn) -> Option<(Vec<Bytes>, u64, u32)> {
    let mut pos = start;
    let mut payload = Vec::new();
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    while pos < end {
        let f = frames.get(&pos).filter(|f| f.timeline == tli && f.end <= end)?;
        payload.push(f.payload.clone());
        crc.combine(&crc32fast::Hasher::new_with_initial_len(f.plain_crc, f.plain_len));
        len += f.plain_len;
        pos = f.end;
    }
    Some((payload, len, crc.finalize()))
}

/// The uploader's state; [`Uploader::run`] drives it.
pub struct Uploader {
    writer: Writer,
    cfg: UploadConfig,
    metrics: Arc<Metrics>,
    watermark: watch::Sender<Lsn>,
    cancel: CancellationToken,
    in_flight: FuturesUnordered<tokio::task::JoinHandle<Result<Done, UploadStop>>>,
    /// Sequence number of the next chunk the watermark waits for.
    next_seq: u64,
    /// Durable chunks beyond `next_seq`: seq -> end.
    durable: BTreeMap<u64, Lsn>,
    /// Records of durable chunks not yet in a whole segment (this session's, and those an
    /// earlier session archived in the segment being resumed).
    records: Vec<ChunkRecord>,
    frames: BTreeMap<Lsn, Frame>,
    segments: VecDeque<(u64, SegmentName)>,
    index: IndexBatcher,
}

impl Uploader {
    /// `resumed`: the records of the chunks an earlier session archived in the segment being
    /// resumed (its bytes arrive, verified, as a [`Job::Prefix`]).
    pub fn new(
        writer: Writer,
        cfg: UploadConfig,
        watermark: watch::Sender<Lsn>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        resumed: Vec<ChunkRecord>,
    ) -> Self {
        let records = resumed;
        let index = IndexBatcher::new(writer.clone());
        Uploader {
            writer,
            cfg,
            metrics,
            watermark,
            cancel,
            in_flight: FuturesUnordered::new(),
            next_seq: 0,
            durable: BTreeMap::new(),
            records,
            frames: BTreeMap::new(),
            segments: VecDeque::new(),
            index,
        }
    }

    /// Run until `jobs` is closed and everything received is durable, or a fatal error, or
    /// cancellation.
    pub async fn run(mut self, mut jobs: mpsc::Receiver<Job>) -> Result<(), UploadStop> {
        let mut open = true;
        loop {
            self.start_ready_segments();
            let idle = self.in_flight.is_empty() && self.segments.is_empty();
            self.index.maybe_flush(!open && idle).await;
            if !open && idle {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(UploadStop::Cancelled),
                Some(res) = self.in_flight.next() => {
                    let done = res.unwrap_or_else(|e| panic!("upload task panicked: {e}"))?;
                    self.on_done(done);
                }
                job = jobs.recv(), if open && self.in_flight.len() < self.cfg.concurrency => match job {
                    None => open = false,
                    Some(Job::Segment { after_seq, segment }) => self.segments.push_back((after_seq, segment)),
                    Some(Job::Prefix { start, frame }) => {
                        self.frames.insert(start, frame);
                    }
                    Some(chunk) => self.start_chunk(chunk),
                },
            }
        }
    }

    fn start_chunk(&mut self, job: Job) {
        let Job::Chunk { seq, segment, start, end, frame, sealed_at, commits } = job else { return };
        let key = names::chunk(&segment, self.cfg.segment_size, start, end);
        let meta = WalObjectMeta {
            timeline: segment.timeline,
            start_lsn: start,
            end_lsn: end,
            segment_size: self.cfg.segment_size,
            sealed_at,
            chunks: Vec::new(),
            commits: Some(commits),
        };
        let (writer, cfg, metrics, cancel) =
            (self.writer.clone(), self.cfg.clone(), self.metrics.clone(), self.cancel.child_token());
        self.in_flight.push(tokio::spawn(async move {
            let len = frame.plain_len;
            let object = seal_chunk(&writer, &key, &meta, &frame).await;
            upload(&writer, &cfg, &metrics, &cancel, &key, object, frame.plain_len, frame.plain_crc).await?;
            metrics.chunks_archived.inc();
            metrics.wal_bytes_archived.add(len);
            let record = ChunkRecord {
                timeline: meta.timeline,
                start_lsn: start,
                end_lsn: end,
                sealed_at: meta.sealed_at,
                durable_at: walvault_shared::time::now(),
                commits: meta.commits,
            };
            Ok(Done::Chunk { seq, end, record, frame })
        }));
    }

    /// Start whole-segment uploads whose chunks are all durable.
    fn start_ready_segments(&mut self) {
        while self.segments.front().is_some_and(|(after, _)| *after < self.next_seq) {
            let (_, segment) = self.segments.pop_front().expect("checked");
            let start = segment.start_lsn(self.cfg.segment_size);
            let end = Lsn(start.0 + self.cfg.segment_size);
            let tli = segment.timeline;
            let in_segment = |r: &ChunkRecord| r.timeline == tli && r.start_lsn >= start && r.end_lsn <= end;
            let mut chunks: Vec<ChunkRecord> = self.records.iter().filter(|r| in_segment(r)).cloned().collect();
            self.records.retain(|r| !in_segment(r));
            chunks.sort_by_key(|r| r.start_lsn);
            let joined = join_frames(&self.frames, tli, start, end);
            self.frames.retain(|s, f| f.timeline != tli || *s >= end);
            let Some((payload, plain_len, plain_crc)) = joined else {
                // Cannot happen while the chunker emits segments only when it saw them whole;
                // the chunks stay and serve restores.
                tracing::warn!(segment = %segment.file_name(self.cfg.segment_size), "segment frames incomplete: left as chunks");
                continue;
            };
            self.index.add(&chunks);
            let key = names::segment(&segment, self.cfg.segment_size);
            let meta = WalObjectMeta {
                timeline: tli,
                start_lsn: start,
                end_lsn: end,
                segment_size: self.cfg.segment_size,
                sealed_at: walvault_shared::time::now(),
                chunks,
                commits: None,
            };
            let (writer, cfg, metrics, cancel) =
                (self.writer.clone(), self.cfg.clone(), self.metrics.clone(), self.cancel.child_token());
            self.in_flight.push(tokio::spawn(async move {
                let meta_json = serde_json::to_vec(&meta).expect("metadata serialises");
                let parts: Vec<&[u8]> = payload.iter().map(|b| b.as_ref()).collect();
                let object = writer.encode_raw_parts(
                    &key,
                    ObjectKind::WalSegment,
                    &meta_json,
                    plain_len,
                    plain_crc,
                    Compression::Zstd,
                    &parts,
                );
                drop(parts);
                drop(payload);
                upload(&writer, &cfg, &metrics, &cancel, &key, object, plain_len, plain_crc).await?;
                metrics.segments_archived.inc();
                delete_chunks_of(&writer, &key, &names::chunks_of(&segment, cfg.segment_size)).await;
                sweep_previous(&writer, &segment, cfg.segment_size).await;
                Ok::<Done, UploadStop>(Done::Segment)
            }));
        }
    }

    fn on_done(&mut self, done: Done) {
        let Done::Chunk { seq, end, record, frame } = done else {
            // A whole segment's buffers (its compressed frames, the sealed object, the S3
            // client's request) were just freed: give the free pages back to the system, so
            // that RSS follows what is held rather than what was once held.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free memory.
            unsafe {
                libc::malloc_trim(0);
            }
            return;
        };
        self.frames.insert(record.start_lsn, frame);
        self.records.push(record);
        self.durable.insert(seq, end);
        let mut advanced = None;
        while let Some(end) = self.durable.remove(&self.next_seq) {
            self.next_seq += 1;
            advanced = Some(end);
        }
        self.metrics.durable_seq.set(self.next_seq);
        if let Some(end) = advanced {
            self.watermark.send_if_modified(|w| {
                let moved = end > *w;
                if moved {
                    *w = end;
                }
                moved
            });
            self.metrics.archived_lsn.set(self.watermark.borrow().0);
            self.metrics.mark_archived_now();
        }
    }
}

/// Whatever ends the uploader (done, split brain, cancelled): uploads still in flight stop.
impl Drop for Uploader {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Seal a chunk's frame in its envelope (off the async thread: encryption and signing cost
/// CPU): the object to upload.
async fn seal_chunk(writer: &Writer, key: &str, meta: &WalObjectMeta, frame: &Frame) -> Bytes {
    let seal = |writer: &Writer, key: &str, meta: &WalObjectMeta, frame: &Frame| {
        let meta_json = serde_json::to_vec(meta).expect("metadata serialises");
        writer.encode_raw(
            key,
            ObjectKind::WalChunk,
            &meta_json,
            frame.plain_len,
            frame.plain_crc,
            Compression::Zstd,
            &frame.payload,
        )
    };
    // A small chunk (synchronous mode seals one per group of commits) costs microseconds:
    // sealed here, without a thread hop on the commit's path.
    if frame.payload.len() <= SEAL_INLINE_MAX {
        return seal(writer, key, meta, frame);
    }
    let (writer, key, meta, frame) = (writer.clone(), key.to_string(), meta.clone(), frame.clone());
    tokio::task::spawn_blocking(move || seal(&writer, &key, &meta, &frame)).await.expect("seal task")
}

/// Largest compressed chunk sealed on the async thread.
const SEAL_INLINE_MAX: usize = 64 << 10;

/// The segment's chunks are now redundant: delete them (best effort; leftovers are removed at
/// the next start).
async fn delete_chunks_of(writer: &Writer, segment_key: &str, prefix: &str) {
    let store = writer.store();
    let policy = RetryPolicy::attempts(5);
    match policy.run(&format!("list chunks of {segment_key}"), || store.list_all(prefix)).await {
        Ok(list) => {
            let keys: Vec<String> = list.into_iter().map(|m| m.key).collect();
            if keys.is_empty() {
                return;
            }
            if let Err(e) = policy.run(&format!("delete chunks of {segment_key}"), || store.delete(&keys)).await {
                tracing::warn!(
                    "could not delete chunks consolidated into {segment_key}: {e} (they are removed at the next start)"
                );
            }
        }
        Err(e) => tracing::warn!("could not list chunks of {segment_key}: {e}"),
    }
}

/// Chunks of the previous segment that a lagging listing (an eventually consistent store, or
/// a restart that could not see its predecessor's newest chunks) hid when that segment was
/// consolidated: deleted now, once the previous segment is known to exist whole (a head, which
/// is consistent where listings are not). Best effort, like [`delete_chunks_of`].
async fn sweep_previous(writer: &Writer, segment: &SegmentName, segment_size: u64) {
    let Some(prev) = segment.segno.0.checked_sub(1) else { return };
    let prev = SegmentName::new(segment.timeline, SegNo(prev));
    let key = names::segment(&prev, segment_size);
    if matches!(writer.store().head(&key).await, Ok(m) if m.size > 0) {
        delete_chunks_of(writer, &key, &names::chunks_of(&prev, segment_size)).await;
    }
}

/// Why one upload attempt failed.
enum Attempt {
    SplitBrain(PutOnceError),
    Retry(String),
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::SplitBrain(e) => write!(f, "{e}"),
            Attempt::Retry(e) => write!(f, "{e}"),
        }
    }
}

/// Write one sealed object once, retrying everything but split brain until it succeeds or
/// `cancel` fires. Its plain content is known by length and crc32 (chunks are compressed as
/// they arrive and segments assembled from their frames: neither is held decompressed), so an
/// object already there is the same when it decodes, checksums verified, to that length and
/// crc32; anything else is split brain.
#[allow(clippy::too_many_arguments)]
async fn upload(
    writer: &Writer,
    cfg: &UploadConfig,
    metrics: &Metrics,
    cancel: &CancellationToken,
    key: &str,
    object: Bytes,
    plain_len: u64,
    plain_crc: u32,
) -> Result<(), UploadStop> {
    let attempt = |_| {
        let object = object.clone();
        async move {
            let r = tokio::time::timeout(
                cfg.upload_timeout,
                writer.put_once_by_checksum(key, object, plain_len, plain_crc),
            )
            .await;
            match r {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(e @ PutOnceError::SplitBrain { .. })) => Err(Attempt::SplitBrain(e)),
                Ok(Err(e)) => Err(Attempt::Retry(e.to_string())),
                Err(_) => Err(Attempt::Retry(StorageError::Timeout { op: "put", key: key.to_string() }.to_string())),
            }
        }
    };
    let retryable = |e: &Attempt| {
        if let Attempt::Retry(msg) = e {
            metrics.upload_retries.inc();
            metrics.set_error(format!("upload {key}: {msg}"));
        }
        matches!(e, Attempt::Retry(_))
    };
    match RetryPolicy::forever().retry(&format!("upload {key}"), cancel, retryable, attempt).await {
        Ok(outcome) => {
            if outcome == PutOutcome::AlreadyThere {
                tracing::info!("{key} was already archived with the same content");
            }
            metrics.bytes_uploaded.add(object.len() as u64);
            Ok(())
        }
        Err(RetryError::Failed(Attempt::SplitBrain(e))) => {
            metrics.upload_errors.inc();
            Err(UploadStop::Fatal(e))
        }
        Err(_) => Err(UploadStop::Cancelled),
    }
}

/// Records of consolidated segments, written as a commit index batch every [`INDEX_INTERVAL`]
/// (or 4096 records), best effort and off the critical path (the audit falls back to segment
/// metadata). Writes in progress are owned here and awaited when the stream drains.
struct IndexBatcher {
    writer: Writer,
    batch: Vec<ChunkRecord>,
    since: std::time::Instant,
    day: String,
    writes: tokio::task::JoinSet<()>,
}

impl IndexBatcher {
    fn new(writer: Writer) -> Self {
        IndexBatcher {
            writer,
            batch: Vec::new(),
            since: std::time::Instant::now(),
            day: chrono::Utc::now().format("%Y-%m-%d").to_string(),
            writes: tokio::task::JoinSet::new(),
        }
    }

    fn add(&mut self, records: &[ChunkRecord]) {
        self.batch.extend(records.iter().cloned());
    }

    async fn maybe_flush(&mut self, draining: bool) {
        while self.writes.try_join_next().is_some() {}
        let due = self.batch.len() >= 4096 || self.since.elapsed() >= INDEX_INTERVAL || draining;
        if !self.batch.is_empty() && due {
            let batch = std::mem::take(&mut self.batch);
            self.since = std::time::Instant::now();
            let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
            let roll = today != self.day;
            self.day = today.clone();
            let writer = self.writer.clone();
            self.writes.spawn(async move {
                let policy = RetryPolicy::attempts(5);
                let r = policy
                    .run("write commit index batch", || async {
                        walvault_shared::archive::index::write_batch(&writer, &batch)
                            .await
                            .map_err(|e| StorageError::transient("put", "index", e))
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!("could not write a commit index batch: {e}");
                }
                if roll {
                    if let Err(e) = walvault_shared::archive::index::rollup(&writer, &today).await {
                        tracing::warn!("could not roll up the commit index: {e:#}");
                    }
                }
            });
        }
        if draining {
            while self.writes.join_next().await.is_some() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_shared::archive::envelope::{self, Expect};

    #[test]
    fn segment_from_chunk_frames_decodes_to_the_whole_segment() {
        let tli = TimelineId(1);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut frames = BTreeMap::new();
        for (s, e) in [(0u64, 1000u64), (1000, 300_000), (300_000, 1 << 20)] {
            frames.insert(Lsn(s), Frame::compress(tli, Lsn(e), &data[s as usize..e as usize], 1));
        }
        let (payload, len, crc) = join_frames(&frames, tli, Lsn(0), Lsn(1 << 20)).expect("frames cover the segment");
        let parts: Vec<&[u8]> = payload.iter().map(|b| b.as_ref()).collect();
        let obj = envelope::encode_raw_parts(
            ObjectKind::WalSegment,
            b"{}",
            len,
            crc,
            Compression::Zstd,
            &parts,
            envelope::Seal::unsigned("seg"),
        );
        let d = envelope::decode(
            "seg",
            &obj,
            &Expect { kind: None, max_plain: 1 << 20, what: "t", verify: None, epoch: None },
        )
        .unwrap();
        assert!(d.content == data);
        // A hole: no segment.
        frames.remove(&Lsn(1000));
        assert!(join_frames(&frames, tli, Lsn(0), Lsn(1 << 20)).is_none());
    }
}
