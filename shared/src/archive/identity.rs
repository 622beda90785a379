//! Repository identity: which cluster an archive belongs to.
//!
//! The first writer stamps the repository with `walvault.repository` (an
//! [`ObjectKind::Identity`] envelope whose metadata is [`Identity`] as JSON), written
//! write-once. Every later writer or reader compares its cluster's identity with the stamp and
//! refuses a mismatch, with a hint, before touching anything else.

use serde::{Deserialize, Serialize};

use super::envelope::{self, Compression, ObjectKind};
use super::names;
use super::read::{Reader, Want};
use super::write::Writer;
use crate::storage::{PutMode, StorageError};

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
    /// When the repository was stamped.
    #[serde(with = "crate::time::rfc3339")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// `age` when the archive's content is encrypted (see `archive::crypt`); absent in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

impl Identity {
    pub fn new(system_identifier: u64, pg_major: u32, wal_segment_size: u64) -> Self {
        Identity {
            format_version: envelope::FORMAT_VERSION,
            system_identifier: system_identifier.to_string(),
            pg_major,
            wal_segment_size,
            created_at: crate::time::now(),
            encryption: None,
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
pub async fn load(reader: &Reader) -> anyhow::Result<Option<Identity>> {
    let Some(d) = reader.read_opt(names::IDENTITY, Want::IDENTITY).await? else { return Ok(None) };
    let id: Identity = d.metadata_as(names::IDENTITY)?;
    if id.format_version > envelope::FORMAT_VERSION {
        return Err(Mismatch(format!(
            "archive {} uses format version {}, newer than this walvault ({})\nHINT: upgrade walvault",
            reader.url(),
            id.format_version,
            envelope::FORMAT_VERSION
        ))
        .into());
    }
    Ok(Some(id))
}

/// Read the identity of a repository that must already exist (readers: list, restore, audit,
/// wal-fetch, expire); a missing stamp is an error with a hint.
pub async fn load_existing(reader: &Reader) -> anyhow::Result<Identity> {
    load(reader).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not a walvault archive (no walvault.repository)\nHINT: check the archive URL and prefix; nothing was ever archived there",
            reader.url()
        )
    })
}

/// Stamp a new repository with `ours`, or check an existing stamp against it. Two agents
/// stamping at once: one wins, the other reads and checks the winner's stamp. A writer with a
/// signing key re-stamps an unsigned identity (same fields) with its signature, so that readers
/// with `--verify-key` can open an archive that was signed only later (its older objects stay
/// unsigned, and are refused by them).
///
/// Encryption fails closed: a writer without encryption refuses an encrypted archive, and a
/// writer with encryption refuses an archive that already holds data in clear (an archive with
/// nothing but its identity is re-stamped as encrypted).
pub async fn ensure(writer: &Writer, ours: &Identity) -> anyhow::Result<Identity> {
    let reader = Reader::new(writer.store().clone(), None);
    if let Some(mut existing) = load(&reader).await? {
        existing.check_compatible(ours, &reader.url())?;
        match (existing.encryption.is_some(), writer.encrypts()) {
            (true, false) => {
                return Err(Mismatch(format!(
                    "archive {} is encrypted, and no recipients were given\nHINT: give the agent the archive's recipients (--encrypt-recipient age1…, --encrypt-recipients-file FILE or --encrypt-passphrase-file FILE); it never writes in clear into an encrypted archive",
                    reader.url()
                ))
                .into())
            }
            (false, true) if holds_data(writer).await? => {
                return Err(Mismatch(format!(
                    "archive {} already holds data in clear, and encryption is configured\nHINT: encrypt into a new archive prefix (keep this one for its retention), or drop the encryption settings; walvault never mixes clear and encrypted content in one archive (docs/operations.md, \"Encryption\")",
                    reader.url()
                ))
                .into())
            }
            (false, true) => {
                existing.encryption = Some("age".into());
                let obj = writer.encode(names::IDENTITY, ObjectKind::Identity, &existing, b"", Compression::None, 0);
                writer.put_overwrite(names::IDENTITY, obj).await?;
                tracing::info!("stamped the (still empty) archive as encrypted");
                return Ok(existing);
            }
            _ => {}
        }
        if writer.signer().is_some() {
            let (h, _) = reader.read_meta(names::IDENTITY, ObjectKind::Identity).await?;
            if h.signature.is_none() {
                let obj = writer.encode(names::IDENTITY, ObjectKind::Identity, &existing, b"", Compression::None, 0);
                writer.put_overwrite(names::IDENTITY, obj).await?;
                tracing::info!("signed the repository identity (it was written without a signing key)");
            }
        }
        return Ok(existing);
    }
    let ours = Identity { encryption: writer.encrypts().then(|| "age".to_string()), ..ours.clone() };
    let obj = writer.encode(names::IDENTITY, ObjectKind::Identity, &ours, b"", Compression::None, 0);
    match writer.store().put(names::IDENTITY, obj, PutMode::IfAbsent).await {
        Ok(()) => Ok(ours.clone()),
        Err(StorageError::AlreadyExists { .. }) => {
            let existing =
                load(&reader).await?.ok_or_else(|| anyhow::anyhow!("identity vanished after a write-once conflict"))?;
            existing.check_compatible(&ours, &reader.url())?;
            Ok(existing)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the archive holds any WAL or backup object.
async fn holds_data(writer: &Writer) -> anyhow::Result<bool> {
    use futures::TryStreamExt;
    for prefix in [names::WAL_PREFIX, names::BACKUPS_PREFIX] {
        let mut l = writer.store().list(prefix);
        if l.try_next().await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::sign::{SigningKey, VerifyKeys};
    use crate::storage::local::LocalStore;
    use crate::storage::ObjectStore;
    use std::sync::Arc;

    #[tokio::test]
    async fn stamp_then_refuse_another_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let (reader, writer) = (Reader::new(store.clone(), None), Writer::new(store.clone(), None));
        assert!(load(&reader).await.unwrap().is_none());
        let a = Identity::new(7_300_000_000_000_000_001, 15, 16 << 20);
        ensure(&writer, &a).await.unwrap();
        ensure(&writer, &Identity { created_at: crate::time::now(), ..a.clone() }).await.unwrap();
        let b = Identity::new(7_300_000_000_000_000_002, 15, 16 << 20);
        let err = format!("{:#}", ensure(&writer, &b).await.unwrap_err());
        assert!(err.contains("another cluster") && err.contains("HINT"), "{err}");
        let c = Identity { pg_major: 16, ..a.clone() };
        assert!(ensure(&writer, &c).await.is_err());
        assert_eq!(load(&reader).await.unwrap().unwrap(), a);
    }

    #[tokio::test]
    async fn a_signing_writer_signs_an_unsigned_identity_and_readers_with_the_key_accept_it() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let a = Identity::new(7_300_000_000_000_000_001, 15, 16 << 20);
        ensure(&Writer::new(store.clone(), None), &a).await.unwrap();
        let sk = Arc::new(SigningKey::generate());
        let keys = VerifyKeys(vec![sk.verify_key()]);
        let strict = Reader::new(store.clone(), Some(keys));
        assert!(load(&strict).await.is_err(), "unsigned identity refused under a verify key");
        ensure(&Writer::new(store.clone(), Some(sk)), &a).await.unwrap();
        assert_eq!(load(&strict).await.unwrap().unwrap(), a);
    }
}
