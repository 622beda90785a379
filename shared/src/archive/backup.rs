//! Base backup descriptions: what `backups/<id>/backup.json` says, and how to list backups.
//!
//! A backup is complete exactly when its `backup.json` exists. The agent writes it last, after
//! every part and the manifest are durable and after the archive holds the WAL from the
//! backup's start LSN to its stop LSN. An interrupted backup leaves parts (and its
//! `backup.lock`) but no description; [`list`] reports it as incomplete and the next backup or
//! `expire` removes it once its writer is gone.
//!
//! Incremental backups (PostgreSQL 17+) form chains: a full backup (`parent: None`,
//! `chain_depth: 0`) and incrementals, each naming its `parent` (the backup whose manifest the
//! server was given) and that parent's start LSN (`incremental_from`, what the server writes as
//! `INCREMENTAL FROM LSN` in the new backup's label); `chain_depth` counts the incrementals
//! down to the full. [`chain`] resolves and checks a chain; restore needs every member.

use serde::{Deserialize, Serialize};

use super::names::{self, ArchiveKey};
use super::read::{Reader, Want};
use crate::lsn::{Lsn, TimelineId};
use crate::storage::{ObjectStore, StorageError};

/// One part of a tar archive: `backups/<id>/part-NNNNNN`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub n: u32,
    pub plain_len: u64,
    pub stored_len: u64,
    pub crc32: u32,
}

/// One tar archive of the backup (`base.tar`, or `<oid>.tar` for a tablespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    pub name: String,
    /// Tablespace location on the server; empty for the main data directory.
    pub location: String,
    pub parts: Vec<PartInfo>,
    pub raw_bytes: u64,
}

/// `backups/<id>/backup.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupDescription {
    pub format_version: u16,
    pub id: String,
    pub label: String,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub timeline: TimelineId,
    pub stop_timeline: TimelineId,
    /// Agent clock (RFC 3339, µs); keep it NTP-synchronised with the server.
    #[serde(with = "crate::time::rfc3339")]
    pub start_time: chrono::DateTime<chrono::Utc>,
    #[serde(with = "crate::time::rfc3339")]
    pub stop_time: chrono::DateTime<chrono::Utc>,
    pub pg_version_num: u32,
    pub system_identifier: String,
    pub wal_segment_size: u64,
    pub archives: Vec<ArchiveInfo>,
    /// Size of the server's backup_manifest (stored at `backups/<id>/backup_manifest`).
    pub manifest_bytes: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub duration_seconds: f64,
    /// Incremental backups: the backup this one is incremental to (absent: a full backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Incremental backups: the parent's start LSN (the label's `INCREMENTAL FROM LSN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<Lsn>,
    /// Incrementals between this backup and its full backup, itself included (0: full).
    #[serde(default)]
    pub chain_depth: u32,
    /// SHA-256 (hex) of the server's `backup_manifest`, as stored at `backups/<id>/backup_manifest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    /// The server's `block_size` (BLCKSZ) and `segment_size` in blocks (RELSEG_SIZE), which
    /// lay out `INCREMENTAL.*` files; absent in older descriptions (8192 and 131072 then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relseg_blocks: Option<u32>,
}

impl BackupDescription {
    pub fn is_incremental(&self) -> bool {
        self.parent.is_some()
    }

    /// BLCKSZ of the server the backup was taken from.
    pub fn block_size(&self) -> u32 {
        self.block_size.unwrap_or(8192)
    }

    /// RELSEG_SIZE (blocks per relation segment file) of that server.
    pub fn relseg_blocks(&self) -> u32 {
        self.relseg_blocks.unwrap_or(131072)
    }

    /// "full" or "incr".
    pub fn kind(&self) -> &'static str {
        if self.is_incremental() {
            "incr"
        } else {
            "full"
        }
    }
}

/// The hex SHA-256 of a manifest, as [`BackupDescription::manifest_sha256`] records it.
pub fn manifest_sha256(manifest: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(manifest))
}

/// The chain that ends at `id`, oldest (the full backup) first, checked: every member is among
/// `backups` (complete), each incremental's `incremental_from` is its parent's start LSN on its
/// parent's timeline lineage, depths count down to 0 at a full backup, and all belong to one
/// system. A missing or inconsistent member is an error naming it.
pub fn chain<'a>(backups: &'a [BackupDescription], id: &str) -> anyhow::Result<Vec<&'a BackupDescription>> {
    let find = |id: &str| backups.iter().find(|b| b.id == id);
    let mut out = vec![find(id).ok_or_else(|| {
        anyhow::anyhow!(
            "backup {id} is not a complete backup of this archive\nHINT: `walvault-recover list` shows the backups"
        )
    })?];
    loop {
        let b = *out.last().expect("non-empty");
        let Some(pid) = &b.parent else { break };
        let Some(p) = find(pid) else {
            anyhow::bail!(
                "backup {} is incremental to backup {pid}, which the archive does not hold complete; the chain cannot be restored\nHINT: restore an older full backup's chain (--backup ID; `walvault-recover list` shows chains), or take a new full backup",
                b.id
            );
        };
        if b.incremental_from != Some(p.start_lsn)
            || p.system_identifier != b.system_identifier
            || b.chain_depth != p.chain_depth + 1
            || p.stop_lsn > b.start_lsn
        {
            anyhow::bail!(
                "backup {} does not follow its parent {pid} (incremental from {:?}, parent starts at {}, depths {} and {}); the chain is inconsistent\nHINT: the backup descriptions were damaged or forged; restore another chain",
                b.id, b.incremental_from.map(|l| l.to_string()), p.start_lsn, b.chain_depth, p.chain_depth
            );
        }
        if out.len() > 10_000 {
            anyhow::bail!("backup {id}: the chain does not end at a full backup");
        }
        out.push(p);
    }
    if out.last().expect("non-empty").chain_depth != 0 {
        anyhow::bail!("backup {id}: its chain ends at backup {}, which is not a full backup", out.last().unwrap().id);
    }
    out.reverse();
    Ok(out)
}

/// `backups/<id>/backup.lock`: who is writing an unfinished backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupLock {
    pub host: String,
    pub pid: u32,
    #[serde(with = "crate::time::rfc3339")]
    pub started_at: chrono::DateTime<chrono::Utc>,
}

/// What a listing of `backups/` shows for one id.
#[derive(Clone, Debug)]
pub enum BackupEntry {
    Complete(Box<BackupDescription>),
    /// Parts without a description: running, or abandoned.
    Incomplete {
        id: String,
        keys: Vec<String>,
        lock: Option<BackupLock>,
    },
}

/// Read a backup's description.
pub async fn read_description(reader: &Reader, id: &str) -> anyhow::Result<BackupDescription> {
    let key = names::backup_description(id);
    let d = reader.read(&key, Want::DESCRIPTION).await?;
    let desc: BackupDescription = d.metadata_as(&key)?;
    if desc.id != id {
        anyhow::bail!(
            "object {key} describes backup {:?}, not {id:?}\nHINT: the object was moved or forged; do not trust it",
            desc.id
        );
    }
    Ok(desc)
}

/// All backups, complete (sorted by start LSN) and incomplete.
pub async fn list(reader: &Reader, segment_size: u64) -> anyhow::Result<Vec<BackupEntry>> {
    let objects = reader.store().list_all(names::BACKUPS_PREFIX).await?;
    let mut ids: std::collections::BTreeMap<String, (bool, Vec<String>, bool)> = Default::default();
    for o in objects {
        let id = match names::parse(&o.key, segment_size) {
            Some(ArchiveKey::BackupDescription { id }) => {
                ids.entry(id.clone()).or_default().0 = true;
                id
            }
            Some(ArchiveKey::BackupPart { id, .. }) | Some(ArchiveKey::BackupManifest { id }) => id,
            Some(ArchiveKey::BackupLock { id }) => {
                ids.entry(id.clone()).or_default().2 = true;
                id
            }
            _ => continue,
        };
        ids.entry(id).or_default().1.push(o.key);
    }
    let mut out = Vec::new();
    for (id, (complete, keys, locked)) in ids {
        if complete {
            out.push(BackupEntry::Complete(Box::new(read_description(reader, &id).await?)));
        } else {
            let lock = if locked { read_lock(reader, &id).await.ok() } else { None };
            out.push(BackupEntry::Incomplete { id, keys, lock });
        }
    }
    out.sort_by_key(|e| match e {
        BackupEntry::Complete(d) => (0, d.start_lsn, d.id.clone()),
        BackupEntry::Incomplete { id, .. } => (1, Lsn(0), id.clone()),
    });
    Ok(out)
}

async fn read_lock(reader: &Reader, id: &str) -> anyhow::Result<BackupLock> {
    let key = names::backup_lock(id);
    Ok(reader.read(&key, Want::DESCRIPTION).await?.metadata_as(&key)?)
}

/// The newest complete backup, by id (ids are start times), reading one description: one
/// listing and one read, for status checks that run often.
pub async fn newest(reader: &Reader, segment_size: u64) -> anyhow::Result<Option<BackupDescription>> {
    let objects = reader.store().list_all(names::BACKUPS_PREFIX).await?;
    let newest = objects
        .iter()
        .filter_map(|o| match names::parse(&o.key, segment_size) {
            Some(ArchiveKey::BackupDescription { id }) => Some(id),
            _ => None,
        })
        .max();
    match newest {
        Some(id) => Ok(Some(read_description(reader, &id).await?)),
        None => Ok(None),
    }
}

/// Complete backups only, oldest first.
pub async fn complete(reader: &Reader, segment_size: u64) -> anyhow::Result<Vec<BackupDescription>> {
    Ok(list(reader, segment_size)
        .await?
        .into_iter()
        .filter_map(|e| match e {
            BackupEntry::Complete(d) => Some(*d),
            _ => None,
        })
        .collect())
}

/// Delete every object of a backup (description first, so it stops looking complete at once).
pub async fn delete_backup(store: &dyn ObjectStore, id: &str) -> Result<(), StorageError> {
    store.delete(&[names::backup_description(id)]).await?;
    let keys: Vec<String> = store.list_all(&names::backup_dir(id)).await?.into_iter().map(|m| m.key).collect();
    store.delete(&keys).await
}
