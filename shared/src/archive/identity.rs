//! Repository identity: which cluster an archive belongs to.
//!
//! The first writer stamps the repository with `walvault.repository` (an
//! [`ObjectKind::Identity`] envelope whose metadata is [`Identity`] as JSON), written
//! write-once. Every later writer or reader compares its cluster's identity with the stamp and
//! refuses a mismatch, with a hint, before touching anything else.

use serde::{Deserialize, Serialize};

use super::envelope::{self, Compression, ObjectKind};
use super::names;
use crate::storage::{ObjectStore, PutMode, StorageError};

/// The archive belongs to another cluster (or a newer format): retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// What makes two clusters' WAL compatible.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The archive format version (see `docs/archive-format.md`).
    pub format_version: u16,
    /// `IDENTIFY_SYSTEM`'s systemid, as a decimal string (it does not fit a JSON double).
    pub system_identifier: String,
    /// PostgreSQL major version (15 for 15.x).
    pub pg_major: u32,
    pub wal_segment_size: u64,
    /// When the repository was stamped, RFC 3339.
    pub created_at: String,
}

impl Identity {
    pub fn new(system_identifier: u64, pg_major: u32, wal_segment_size: u64) -> Self {
        Identity {
            format_version: envelope::FORMAT_VERSION,
            system_identifier: system_identifier.to_string(),
            pg_major,
            wal_segment_size,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        }
    }

    /// Whether WAL from `other` may go into an archive stamped `self`; `Err` says why not.
    pub fn check_compatible(&self, other: &Identity, url: &str) -> anyhow::Result<()> {
        let mismatch = |what: &str, ours: &dyn std::fmt::Display, theirs: &dyn std::fmt::Display| {
            anyhow::Error::new(Mismatch(format!(
                "archive {url} belongs to another cluster: its {what} is {ours}, this server's is {theirs}\n\
                 HINT: each cluster needs its own archive; use a different archive URL or prefix \
                 (a cluster rebuilt by initdb or pg_upgrade is a new cluster)"
            )))
        };
        if self.system_identifier != other.system_identifier {
            return Err(mismatch("system identifier", &self.system_identifier, &other.system_identifier));
        }
        if self.pg_major != other.pg_major {
            return Err(mismatch("PostgreSQL major version", &self.pg_major, &other.pg_major));
        }
        if self.wal_segment_size != other.wal_segment_size {
            return Err(mismatch("WAL segment size", &self.wal_segment_size, &other.wal_segment_size));
        }
        Ok(())
    }
}

/// Read the repository's identity; `Ok(None)` for a repository nobody has stamped yet.
pub async fn load(store: &dyn ObjectStore) -> anyhow::Result<Option<Identity>> {
    let bytes = match store.get(names::IDENTITY).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let d = envelope::decode(names::IDENTITY, &bytes)?.expect_kind(names::IDENTITY, ObjectKind::Identity)?;
    let id: Identity = d.metadata_as(names::IDENTITY)?;
    if id.format_version > envelope::FORMAT_VERSION {
        return Err(Mismatch(format!(
            "archive {} uses format version {}, newer than this walvault ({})\nHINT: upgrade walvault",
            store.url(),
            id.format_version,
            envelope::FORMAT_VERSION
        ))
        .into());
    }
    Ok(Some(id))
}

/// Read the identity of a repository that must already exist (readers: list, restore, audit,
/// wal-fetch, expire); a missing stamp is an error with a hint.
pub async fn load_existing(store: &dyn ObjectStore) -> anyhow::Result<Identity> {
    load(store).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not a walvault archive (no walvault.repository)\nHINT: check the archive URL and prefix; nothing was ever archived there",
            store.url()
        )
    })
}

/// Stamp a new repository with `ours`, or check an existing stamp against it. Two agents
/// stamping at once: one wins, the other reads and checks the winner's stamp.
pub async fn ensure(store: &dyn ObjectStore, ours: &Identity) -> anyhow::Result<Identity> {
    if let Some(existing) = load(store).await? {
        existing.check_compatible(ours, &store.url())?;
        return Ok(existing);
    }
    let obj = envelope::encode(ObjectKind::Identity, ours, b"", Compression::None, 0);
    match store.put(names::IDENTITY, obj.into(), PutMode::IfAbsent).await {
        Ok(()) => Ok(ours.clone()),
        Err(StorageError::AlreadyExists { .. }) => {
            let existing =
                load(store).await?.ok_or_else(|| anyhow::anyhow!("identity vanished after a write-once conflict"))?;
            existing.check_compatible(ours, &store.url())?;
            Ok(existing)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStore;

    #[tokio::test]
    async fn stamp_then_refuse_another_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert!(load(&store).await.unwrap().is_none());
        let a = Identity::new(7_300_000_000_000_000_001, 15, 16 << 20);
        ensure(&store, &a).await.unwrap();
        ensure(&store, &Identity { created_at: "later".into(), ..a.clone() }).await.unwrap();
        let b = Identity::new(7_300_000_000_000_000_002, 15, 16 << 20);
        let err = format!("{:#}", ensure(&store, &b).await.unwrap_err());
        assert!(err.contains("another cluster") && err.contains("HINT"), "{err}");
        let c = Identity { pg_major: 16, ..a.clone() };
        assert!(ensure(&store, &c).await.is_err());
        assert_eq!(load(&store).await.unwrap().unwrap(), a);
    }
}
