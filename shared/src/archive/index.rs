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

use super::envelope::{Compression, ObjectKind};
use super::names::{self, ArchiveKey};
use super::read::{sort_dedup, Reader, Want};
use super::walcat::ChunkRecord;
use super::write::Writer;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct IndexContent {
    pub records: Vec<ChunkRecord>,
}

fn day_and_time(t: chrono::DateTime<chrono::Utc>) -> (String, String) {
    (t.format("%Y-%m-%d").to_string(), t.format("%H%M%S").to_string())
}

pub fn encode(writer: &Writer, key: &str, records: &[ChunkRecord]) -> bytes::Bytes {
    let content = serde_json::to_vec(&IndexContent { records: records.to_vec() }).expect("serialise index");
    writer.encode(
        key,
        ObjectKind::Metadata,
        &serde_json::json!({"index": records.len()}),
        &content,
        Compression::Zstd,
        3,
    )
}

pub async fn read(reader: &Reader, key: &str) -> anyhow::Result<Option<Vec<ChunkRecord>>> {
    let Some(d) = reader.read_opt(key, Want::INDEX).await? else { return Ok(None) };
    let c: IndexContent = serde_json::from_slice(&d.content).map_err(|e| anyhow::anyhow!("index object {key}: {e}"))?;
    Ok(Some(c.records))
}

/// Write a batch (no-op when empty). Returns its key.
pub async fn write_batch(writer: &Writer, records: &[ChunkRecord]) -> anyhow::Result<Option<String>> {
    let Some(first) = records.first() else { return Ok(None) };
    let (day, hms) = day_and_time(first.durable_at);
    let key = names::index_batch(&day, &hms, first.start_lsn);
    writer.put_overwrite(&key, encode(writer, &key, records)).await?;
    Ok(Some(key))
}

/// Merge the batches of every day before `today` into that day's object, then delete them.
pub async fn rollup(writer: &Writer, today: &str) -> anyhow::Result<()> {
    let store = writer.store();
    let reader = Reader::new(store.clone(), None);
    let mut by_day: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for o in store.list_all(names::INDEX_BATCH_PREFIX).await? {
        if let Some(ArchiveKey::IndexBatch { day }) = names::parse(&o.key, crate::lsn::DEFAULT_SEGMENT_SIZE) {
            if day.as_str() < today {
                by_day.entry(day).or_default().push(o.key);
            }
        }
    }
    for (day, keys) in by_day {
        let day_key = names::index_day(&day);
        let mut records = read(&reader, &day_key).await?.unwrap_or_default();
        for k in &keys {
            records.extend(read(&reader, k).await?.unwrap_or_default());
        }
        sort_dedup(&mut records);
        writer.put_overwrite(&day_key, encode(writer, &day_key, &records)).await?;
        store.delete(&keys).await?;
        tracing::info!(day = %day, batches = keys.len(), records = records.len(), "commit index rolled up");
    }
    Ok(())
}

/// Every record in the index, deduplicated; and how many objects were read.
pub async fn load_all(reader: &Reader) -> anyhow::Result<(Vec<ChunkRecord>, usize)> {
    let mut records = Vec::new();
    let mut gets = 0;
    for o in reader.store().list_all(names::INDEX_PREFIX).await? {
        match names::parse(&o.key, crate::lsn::DEFAULT_SEGMENT_SIZE) {
            Some(ArchiveKey::IndexBatch { .. }) | Some(ArchiveKey::IndexDay { .. }) => {
                gets += 1;
                records.extend(read(reader, &o.key).await?.unwrap_or_default());
            }
            _ => {}
        }
    }
    sort_dedup(&mut records);
    Ok((records, gets))
}
