//! The uploader: compress, checksum and write WAL objects, and publish the archived watermark.
//!
//! * Chunks go up with at most `concurrency` in flight. Each is written once
//!   ([`walvault_shared::archive::put_once`]): identical content already there is success (a
//!   retry after a timeout, or a restart), different content is split brain and stops the agent.
//! * Every other failure (store down, throttled, hanging past `upload_timeout`, even a full
//!   disk) is retried with backoff forever: the replication slot holds the WAL meanwhile, and
//!   the metrics and logs say how much is waiting.
//! * The archived watermark advances only over the contiguous run of durable chunks (by stream
//!   sequence number), never past a chunk still in flight. It is what the agent reports to
//!   PostgreSQL as flushed.
//! * A whole segment is written once all of its chunks are durable; then its chunks are
//!   deleted. The per-chunk durable times go into the segment's metadata.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use walvault_shared::archive::envelope::{self, Compression, ObjectKind};
use walvault_shared::archive::walcat::{ChunkRecord, WalObjectMeta};
use walvault_shared::archive::{names, put_once, PutOnceError, PutOutcome};
use walvault_shared::lsn::Lsn;
use walvault_shared::storage::retry::RetryPolicy;
use walvault_shared::storage::{ObjectStore, StorageError};

use super::chunker::Job;
use crate::metrics::Metrics;

/// How often consolidated chunk records are written to the commit index.
const INDEX_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct UploadConfig {
    pub concurrency: usize,
    pub upload_timeout: Duration,
    pub zstd_level: i32,
    pub segment_size: u64,
}

/// A failure that must stop the agent.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct FatalUpload(#[from] pub PutOnceError);

enum Done {
    Chunk { seq: u64, end: Lsn, record: ChunkRecord, frame: Frame },
    Segment,
}

/// A durable chunk's compressed payload (one zstd frame) and its plain checksum: a whole segment
/// is the concatenation of its chunks' frames (zstd decodes concatenated frames as one stream),
/// so consolidation does not compress the segment a second time.
struct Frame {
    timeline: walvault_shared::lsn::TimelineId,
    end: Lsn,
    payload: Bytes,
    plain_crc: u32,
    plain_len: u64,
}

/// The segment `[start, end)` of `tli` as an envelope built from durable chunk frames, if they
/// cover it exactly and contiguously.
fn segment_from_frames(
    frames: &BTreeMap<Lsn, Frame>,
    tli: walvault_shared::lsn::TimelineId,
    start: Lsn,
    end: Lsn,
    meta: &WalObjectMeta,
) -> Option<Bytes> {
    let mut pos = start;
    let mut payload = bytes::BytesMut::new();
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    while pos < end {
        let f = frames.get(&pos).filter(|f| f.timeline == tli && f.end <= end)?;
        payload.extend_from_slice(&f.payload);
        crc.combine(&crc32fast::Hasher::new_with_initial_len(f.plain_crc, f.plain_len));
        len += f.plain_len;
        pos = f.end;
    }
    let meta = serde_json::to_vec(meta).ok()?;
    Some(envelope::encode_raw(ObjectKind::WalSegment, &meta, len, crc.finalize(), Compression::Zstd, &payload).into())
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Run until `jobs` is closed and everything received is durable (or a fatal error).
pub async fn run(
    store: Arc<dyn ObjectStore>,
    cfg: UploadConfig,
    mut jobs: mpsc::Receiver<Job>,
    first_seq: u64,
    watermark: watch::Sender<Lsn>,
    metrics: Arc<Metrics>,
    // Records of chunks archived by an earlier session in the segment being resumed.
    mut inherited: Vec<ChunkRecord>,
) -> Result<(), FatalUpload> {
    let mut in_flight = FuturesUnordered::new();
    let mut next_seq = first_seq;
    let mut done: BTreeMap<u64, Lsn> = BTreeMap::new();
    let mut records: HashMap<u64, ChunkRecord> = HashMap::new();
    let mut frames: BTreeMap<Lsn, Frame> = BTreeMap::new();
    let mut segments: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    // Commit index: records of consolidated segments, written as a batch every few minutes.
    let mut index_batch: Vec<ChunkRecord> = Vec::new();
    let mut index_since = std::time::Instant::now();
    let mut index_day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    loop {
        let draining = !open && in_flight.is_empty() && segments.is_empty();
        if !index_batch.is_empty() && (index_batch.len() >= 4096 || index_since.elapsed() >= INDEX_INTERVAL || draining)
        {
            let batch = std::mem::take(&mut index_batch);
            index_since = std::time::Instant::now();
            let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
            let roll = today != index_day;
            index_day = today.clone();
            let store = store.clone();
            // Best effort and off the critical path: the audit falls back to segment metadata.
            // The last batch (the stream is ending) is awaited so that it is not lost at exit.
            let write = tokio::spawn(async move {
                let policy = RetryPolicy { max_attempts: Some(5), ..Default::default() };
                if let Err(e) = policy
                    .run("write commit index batch", || async {
                        walvault_shared::archive::index::write_batch(&*store, &batch)
                            .await
                            .map_err(|e| StorageError::transient("put", "index", e))
                    })
                    .await
                {
                    tracing::warn!("could not write a commit index batch: {e}");
                }
                if roll {
                    if let Err(e) = walvault_shared::archive::index::rollup(&*store, &today).await {
                        tracing::warn!("could not roll up the commit index: {e:#}");
                    }
                }
            });
            if draining {
                let _ = write.await;
            }
        }
        // Start whole-segment uploads whose chunks are all durable.
        while segments.front().is_some_and(|j| matches!(j, Job::Segment { after_seq, .. } if *after_seq < next_seq)) {
            let Some(Job::Segment { segment, data, .. }) = segments.pop_front() else { unreachable!() };
            let start = segment.start_lsn(cfg.segment_size);
            let end = Lsn(start.0 + cfg.segment_size);
            let mut chunks: Vec<ChunkRecord> =
                records.values().filter(|r| r.start_lsn >= start && r.end_lsn <= end).cloned().collect();
            chunks.extend(
                inherited
                    .iter()
                    .filter(|r| r.timeline == segment.timeline && r.start_lsn >= start && r.end_lsn <= end)
                    .cloned(),
            );
            inherited.retain(|r| !(r.timeline == segment.timeline && r.start_lsn >= start && r.end_lsn <= end));
            chunks.sort_by_key(|r| r.start_lsn);
            records.retain(|_, r| r.start_lsn >= end);
            let key = names::segment(&segment, cfg.segment_size);
            let meta = WalObjectMeta {
                timeline: segment.timeline,
                start_lsn: start,
                end_lsn: end,
                segment_size: cfg.segment_size,
                sealed_at: rfc3339(chrono::Utc::now()),
                chunks,
                commits: None,
            };
            index_batch.extend(meta.chunks.iter().cloned());
            let prebuilt = segment_from_frames(&frames, segment.timeline, start, end, &meta);
            // Frames up to this segment's end are no longer needed.
            frames.retain(|s, f| f.timeline != segment.timeline || *s >= end);
            let (store, cfg, metrics) = (store.clone(), cfg.clone(), metrics.clone());
            in_flight.push(tokio::spawn(async move {
                let object = match prebuilt {
                    Some(o) => o,
                    None => encode(ObjectKind::WalSegment, &meta, &data, cfg.zstd_level).await,
                };
                upload(&*store, &cfg, &metrics, &key, object, data).await?;
                metrics.segments_archived.inc();
                // The segment now holds these bytes: its chunks can go.
                let prefix = format!("{key}.");
                let delete = RetryPolicy { max_attempts: Some(5), ..Default::default() };
                let chunk_keys = delete.run(&format!("list chunks of {key}"), || store.list_all(&prefix)).await;
                match chunk_keys {
                    Ok(list) => {
                        let keys: Vec<String> = list.into_iter().map(|m| m.key).collect();
                        if let Err(e) = delete.run(&format!("delete chunks of {key}"), || store.delete(&keys)).await {
                            tracing::warn!("could not delete chunks consolidated into {key}: {e} (they are removed at the next start)");
                        }
                    }
                    Err(e) => tracing::warn!("could not list chunks of {key}: {e}"),
                }
                Ok::<Done, FatalUpload>(Done::Segment)
            }));
        }
        if !open && in_flight.is_empty() && segments.is_empty() {
            return Ok(());
        }
        tokio::select! {
            job = jobs.recv(), if open && in_flight.len() < cfg.concurrency => match job {
                None => open = false,
                Some(Job::Chunk { seq, segment, start, end, data, sealed_at, commits }) => {
                    let key = names::chunk(&segment, cfg.segment_size, start, end);
                    let meta = WalObjectMeta {
                        timeline: segment.timeline,
                        start_lsn: start,
                        end_lsn: end,
                        segment_size: cfg.segment_size,
                        sealed_at: rfc3339(sealed_at),
                        chunks: Vec::new(),
                        commits: Some(commits),
                    };
                    let (store, cfg, metrics) = (store.clone(), cfg.clone(), metrics.clone());
                    in_flight.push(tokio::spawn(async move {
                        let len = data.len() as u64;
                        let object = encode(ObjectKind::WalChunk, &meta, &data, cfg.zstd_level).await;
                        let (header, _) = envelope::decode_header(&key, &object).expect("our own envelope");
                        let frame = Frame {
                            timeline: meta.timeline,
                            end,
                            payload: object.slice(header.payload_offset()..),
                            plain_crc: header.plain_crc,
                            plain_len: header.plain_len,
                        };
                        upload(&*store, &cfg, &metrics, &key, object, data).await?;
                        metrics.chunks_archived.inc();
                        metrics.wal_bytes_archived.add(len);
                        let record = ChunkRecord {
                            timeline: meta.timeline,
                            commits: meta.commits.clone(),
                            start_lsn: start,
                            end_lsn: end,
                            sealed_at: meta.sealed_at.clone(),
                            durable_at: rfc3339(chrono::Utc::now()),
                        };
                        Ok(Done::Chunk { seq, end, record, frame })
                    }));
                }
                Some(seg @ Job::Segment { .. }) => segments.push_back(seg),
            },
            Some(res) = in_flight.next() => {
                let res = res.unwrap_or_else(|e| panic!("upload task panicked: {e}"));
                match res? {
                    Done::Chunk { seq, end, record, frame } => {
                        frames.insert(record.start_lsn, frame);
                        done.insert(seq, end);
                        records.insert(seq, record);
                        let mut advanced = None;
                        while let Some(end) = done.remove(&next_seq) {
                            next_seq += 1;
                            advanced = Some(end);
                        }
                        if let Some(end) = advanced {
                            watermark.send_if_modified(|w| {
                                if end > *w {
                                    *w = end;
                                    true
                                } else {
                                    false
                                }
                            });
                            metrics.archived_lsn.set(watermark.borrow().0);
                            metrics.mark_archived_now();
                        }
                    }
                    Done::Segment => {}
                }
            }
        }
    }
}

/// Compress and wrap WAL bytes in the envelope, off the async threads.
async fn encode(kind: ObjectKind, meta: &WalObjectMeta, data: &Bytes, level: i32) -> Bytes {
    let (meta, content) = (meta.clone(), data.clone());
    tokio::task::spawn_blocking(move || envelope::encode(kind, &meta, &content, Compression::Zstd, level))
        .await
        .expect("encode task")
        .into()
}

/// Write one encoded object (plain content `data`), retrying everything but split brain.
async fn upload(
    store: &dyn ObjectStore,
    cfg: &UploadConfig,
    metrics: &Metrics,
    key: &str,
    object: Bytes,
    data: Bytes,
) -> Result<(), FatalUpload> {
    let policy = RetryPolicy { initial: Duration::from_millis(200), max: Duration::from_secs(10), max_attempts: None };
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let r = tokio::time::timeout(cfg.upload_timeout, put_once(store, key, object.clone(), &data)).await;
        let err = match r {
            Ok(Ok(outcome)) => {
                if outcome == PutOutcome::AlreadyThere {
                    tracing::info!("{key} was already archived with the same content");
                }
                metrics.bytes_uploaded.add(object.len() as u64);
                return Ok(());
            }
            Ok(Err(e @ PutOnceError::SplitBrain { .. })) => {
                metrics.upload_errors.inc();
                return Err(e.into());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => StorageError::Timeout { op: "put", key: key.to_string() }.to_string(),
        };
        metrics.upload_retries.inc();
        metrics.set_error(format!("upload {key}: {err}"));
        let delay = policy.delay(attempt);
        tracing::warn!(attempt, retry_in_ms = delay.as_millis() as u64, "upload {key} failed: {err}");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_shared::lsn::TimelineId;

    #[test]
    fn segment_from_chunk_frames_decodes_to_the_whole_segment() {
        let tli = TimelineId(1);
        let meta = |s: u64, e: u64| WalObjectMeta {
            timeline: tli,
            start_lsn: Lsn(s),
            end_lsn: Lsn(e),
            segment_size: 1 << 20,
            sealed_at: String::new(),
            chunks: vec![],
            commits: None,
        };
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut frames = BTreeMap::new();
        for (s, e) in [(0u64, 1000u64), (1000, 300_000), (300_000, 1 << 20)] {
            let o = envelope::encode(
                ObjectKind::WalChunk,
                &meta(s, e),
                &data[s as usize..e as usize],
                Compression::Zstd,
                1,
            );
            let (h, _) = envelope::decode_header("k", &o).unwrap();
            let payload = Bytes::from(o).slice(h.payload_offset()..);
            frames.insert(
                Lsn(s),
                Frame { timeline: tli, end: Lsn(e), payload, plain_crc: h.plain_crc, plain_len: h.plain_len },
            );
        }
        let seg = segment_from_frames(&frames, tli, Lsn(0), Lsn(1 << 20), &meta(0, 1 << 20))
            .expect("frames cover the segment");
        let d = envelope::decode("seg", &seg).unwrap();
        assert!(d.content == data);
        // A hole: no prebuilt segment (the uploader then compresses the segment itself).
        frames.remove(&Lsn(1000));
        assert!(segment_from_frames(&frames, tli, Lsn(0), Lsn(1 << 20), &meta(0, 1 << 20)).is_none());
    }
}
