//! Restore drill records: what `walvault-recover verify` found, kept in the archive it drilled
//! (`drills/<drill id>`, a metadata-only object, signed when the drill was given the signing
//! key), so that `list`, `audit`, `report` and the agent's metrics can say when the archive was
//! last proven to restore, and how long that took (the measured RTO).
//!
//! A record that cannot be read (damaged, or unsigned where `--verify-key` asks for signatures)
//! is skipped with a warning: a drill record is evidence, never something a restore depends on.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::names::{self, ArchiveKey};
use super::read::{Reader, Want};
use super::write::Writer;
use crate::lsn::Lsn;
use crate::storage::PutMode;

/// `drills/<id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub id: String,
    #[serde(with = "crate::time::rfc3339")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339")]
    pub finished_at: DateTime<Utc>,
    pub host: String,
    pub pass: bool,
    /// The step that failed, and why.
    pub failure: Option<String>,
    pub backup: Option<String>,
    /// What the drill recovered to: "latest", a time, or a backup's end.
    pub target: String,
    pub recovered_to: Option<Lsn>,
    pub last_replayed_commit: Option<String>,
    pub restored_mib: Option<u64>,
    /// The RTO, measured: download and unpack, replay to the target, checks; and their sum.
    pub restore_seconds: Option<f64>,
    pub replay_seconds: Option<f64>,
    pub checks_seconds: Option<f64>,
    pub rto_seconds: Option<f64>,
}

/// A fresh drill id for a drill started at `t`.
pub fn new_id(t: DateTime<Utc>) -> String {
    format!("{}-{:08x}", names::backup_id(t), rand::random::<u32>())
}

/// Write a record (once; ids are unique).
pub async fn write(writer: &Writer, rec: &DrillRecord) -> anyhow::Result<()> {
    let key = names::drill(&rec.id);
    writer.store().put(&key, writer.encode_metadata(&key, rec), PutMode::IfAbsent).await?;
    Ok(())
}

/// Every readable drill record, oldest first.
pub async fn list(reader: &Reader) -> anyhow::Result<Vec<DrillRecord>> {
    let mut out = Vec::new();
    for o in reader.store().list_all(names::DRILLS_PREFIX).await? {
        if !matches!(names::parse(&o.key, crate::lsn::DEFAULT_SEGMENT_SIZE), Some(ArchiveKey::Drill { .. })) {
            continue;
        }
        let rec = async {
            let d = reader.read(&o.key, Want::DESCRIPTION).await?;
            Ok::<DrillRecord, anyhow::Error>(d.metadata_as::<DrillRecord>(&o.key)?)
        }
        .await;
        match rec {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("skipping drill record {}: {e:#}", o.key),
        }
    }
    out.sort_by_key(|r| r.started_at);
    Ok(out)
}

/// The newest passed drill, reading records newest first (ids sort by time) until one passed:
/// one listing and usually one read, for status checks that run often.
pub async fn newest_pass_quick(reader: &Reader) -> anyhow::Result<Option<DrillRecord>> {
    let mut keys: Vec<String> = reader
        .store()
        .list_all(names::DRILLS_PREFIX)
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| matches!(names::parse(k, crate::lsn::DEFAULT_SEGMENT_SIZE), Some(ArchiveKey::Drill { .. })))
        .collect();
    keys.sort();
    for k in keys.iter().rev().take(50) {
        if let Ok(d) = reader.read(k, Want::DESCRIPTION).await {
            if let Ok(r) = d.metadata_as::<DrillRecord>(k) {
                if r.pass {
                    return Ok(Some(r));
                }
            }
        }
    }
    Ok(None)
}

/// The newest passed drill, if any.
pub fn newest_pass(records: &[DrillRecord]) -> Option<&DrillRecord> {
    records.iter().rev().find(|r| r.pass)
}
