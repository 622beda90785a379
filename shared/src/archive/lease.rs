//! Leases: a restore in progress, or the replay that follows it, protects its backups and the
//! WAL after them from `expire`.
//!
//! `leases/<id>` (id: the time taken, as a backup id, `-`, 8 hex digits) is a metadata envelope
//! whose JSON names who took it (`purpose`: restore, verify or dump; `host`, `pid`), the backups
//! it needs (a backup and its chain), the timeline and the LSN from which it needs WAL, and when
//! it was taken and expires. `walvault-recover` takes one before it downloads anything and,
//! where it replays in-process (`verify`, `dump`, `restore --start`), releases it when the replay
//! is over; after a plain `restore` PostgreSQL replays later, through `wal-fetch`, so that lease
//! stays until it expires (`--lease`, default 24 h). Taking a lease is best effort: with
//! read-only credentials the restore goes on, unprotected, and says so.
//!
//! `expire` keeps every backup an unexpired lease names (with its chain) and the WAL from the
//! lease's LSN, and deletes expired leases. A lease is honoured for at most [`MAX_TTL`] after it
//! was taken whatever it claims, so that whoever can write the bucket can delay retention by a
//! week at most, not pin the archive forever. Unreadable lease objects are ignored (logged).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::names::{self, ArchiveKey};
use super::read::{Reader, Want};
use super::write::Writer;
use crate::lsn::{Lsn, TimelineId};
use crate::storage::{ObjectStore, PutMode};

/// The longest a lease is honoured, whatever it says.
pub const MAX_TTL: chrono::Duration = chrono::Duration::days(7);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub purpose: String,
    pub host: String,
    pub pid: u32,
    /// The backups read: the chain, full backup first.
    pub backups: Vec<String>,
    pub timeline: TimelineId,
    /// WAL from here on (the chain's full backup's start) is needed.
    pub wal_from: Lsn,
    #[serde(with = "crate::time::rfc3339")]
    pub taken_at: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339")]
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// Until when `expire` honours it.
    pub fn honoured_until(&self) -> DateTime<Utc> {
        self.expires_at.min(self.taken_at + MAX_TTL)
    }
}

/// This machine's name, as leases, backup locks and drill records name it.
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A fresh lease id for a lease taken at `t`.
pub fn new_id(t: DateTime<Utc>) -> String {
    format!("{}-{:08x}", names::backup_id(t), rand::random::<u32>())
}

/// Write `lease` (once); returns its key.
pub async fn take(store: &Arc<dyn ObjectStore>, lease: &Lease) -> anyhow::Result<String> {
    let key = names::lease(&new_id(lease.taken_at));
    let writer = Writer::new(store.clone(), None);
    store.put(&key, writer.encode_metadata(&key, lease), PutMode::IfAbsent).await?;
    Ok(key)
}

/// Remove a lease (a missing one is fine).
pub async fn release(store: &Arc<dyn ObjectStore>, key: &str) -> anyhow::Result<()> {
    store.delete(&[key.to_string()]).await?;
    Ok(())
}

/// Every lease in the archive, split into those honoured at `now` and the keys of the others.
pub async fn all(reader: &Reader, now: DateTime<Utc>) -> anyhow::Result<(Vec<Lease>, Vec<String>)> {
    let mut active = Vec::new();
    let mut expired = Vec::new();
    for o in reader.store().list_all(names::LEASES_PREFIX).await? {
        if !matches!(names::parse(&o.key, 0), Some(ArchiveKey::Lease { .. })) {
            continue;
        }
        let lease: Lease = match reader.read(&o.key, Want::DESCRIPTION).await.and_then(|d| Ok(d.metadata_as(&o.key)?)) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(key = %o.key, "ignoring an unreadable lease: {e:#}");
                continue;
            }
        };
        if lease.honoured_until() > now {
            active.push(lease);
        } else {
            expired.push(o.key);
        }
    }
    Ok((active, expired))
}
