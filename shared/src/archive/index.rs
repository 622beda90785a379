//! The commit index: compact objects listing every archived chunk with its LSN range, commit
//! statistics and the time it became durable, so that the RPO audit reads a month of history
//! with a few dozen GETs instead of one per segment.
//!
//! * `index/batch/<day>/<HHMMSS>-<first LSN>`: written once by the agent every few minutes (or
//!   every few thousand chunks), holding the records of the segments consolidated since the last
//!   batch. `<day>`/`HHMMSS` are the UTC time of its first record's durability.
//! * `index/day/<day>`: all records of a finished day, merged from its batches by the agent
//!   (which then deletes the batches).
//!
//! Content: zstd-compressed JSON `{"records": [ChunkRecord, …]}` in a `Metadata` envelope.
//! Records may repeat across objects (a batch written twice after a crash); readers dedupe by
//! (timeline, start, end).

use serde::{Deserialize, Serialize};

use super::envelope::{self, Compression, ObjectKind};
use super::names::{self, ArchiveKey};
use super::walcat::ChunkRecord;
use crate::storage::{ObjectStore, PutMode};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct IndexContent {
    pub records: Vec<ChunkRecord>,
}

fn day_and_time(rfc3339: &str) -> (String, String) {
    match chrono::DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => {
            let t = t.with_timezone(&chrono::Utc);
            (t.format("%Y-%m-%d").to_string(), t.format("%H%M%S").to_string())
        }
        Err(_) => ("1970-01-01".into(), "000000".into()),
    }
}

pub fn encode(records: &[ChunkRecord]) -> Vec<u8> {
    let content = serde_json::to_vec(&IndexContent { records: records.to_vec() }).expect("serialise index");
    envelope::encode(ObjectKind::Metadata, &serde_json::json!({"index": records.len()}), &content, Compression::Zstd, 3)
}

pub fn decode(key: &str, raw: &[u8]) -> anyhow::Result<Vec<ChunkRecord>> {
    let d = envelope::decode(key, raw)?;
    let c: IndexContent = serde_json::from_slice(&d.content).map_err(|e| anyhow::anyhow!("index object {key}: {e}"))?;
    Ok(c.records)
}

/// Sort by position and drop repeats (a batch written twice after a crash).
fn sort_dedup(records: &mut Vec<ChunkRecord>) {
    records.sort_by_key(|r| (r.timeline, r.start_lsn, r.end_lsn));
    records.dedup_by_key(|r| (r.timeline, r.start_lsn, r.end_lsn));
}

/// Write a batch (no-op when empty). Returns its key.
pub async fn write_batch(store: &dyn ObjectStore, records: &[ChunkRecord]) -> anyhow::Result<Option<String>> {
    let Some(first) = records.first() else { return Ok(None) };
    let (day, hms) = day_and_time(&first.durable_at);
    let key = names::index_batch(&day, &hms, first.start_lsn);
    store.put(&key, encode(records).into(), PutMode::Overwrite).await?;
    Ok(Some(key))
}

/// Merge the batches of every day before `today` into that day's object, then delete them.
pub async fn rollup(store: &dyn ObjectStore, today: &str) -> anyhow::Result<()> {
    let mut by_day: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for o in store.list_all("index/batch/").await? {
        if let Some(ArchiveKey::IndexBatch { day }) = names::parse(&o.key, crate::lsn::DEFAULT_SEGMENT_SIZE) {
            if day.as_str() < today {
                by_day.entry(day).or_default().push(o.key);
            }
        }
    }
    for (day, keys) in by_day {
        let day_key = names::index_day(&day);
        let mut records = match store.get(&day_key).await {
            Ok(raw) => decode(&day_key, &raw)?,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        for k in &keys {
            records.extend(decode(k, &store.get(k).await?)?);
        }
        sort_dedup(&mut records);
        store.put(&day_key, encode(&records).into(), PutMode::Overwrite).await?;
        store.delete(&keys).await?;
        tracing::info!(day = %day, batches = keys.len(), records = records.len(), "commit index rolled up");
    }
    Ok(())
}

/// Every record in the index, deduplicated; and how many objects were read.
pub async fn load_all(store: &dyn ObjectStore) -> anyhow::Result<(Vec<ChunkRecord>, usize)> {
    let mut records = Vec::new();
    let mut gets = 0;
    for o in store.list_all(names::INDEX_PREFIX).await? {
        match names::parse(&o.key, crate::lsn::DEFAULT_SEGMENT_SIZE) {
            Some(ArchiveKey::IndexBatch { .. }) | Some(ArchiveKey::IndexDay { .. }) => {
                gets += 1;
                records.extend(decode(&o.key, &store.get(&o.key).await?)?);
            }
            _ => {}
        }
    }
    sort_dedup(&mut records);
    Ok((records, gets))
}
