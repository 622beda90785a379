//! The archive: what is stored, under which names, in which envelope.
//!
//! * [`names`]: the catalogue of object names (grammar and examples).
//! * [`envelope`]: the versioned, checksummed, compressed container every object is stored in.
//! * [`identity`]: the repository's identity stamp, which keeps WAL of one cluster out of
//!   another cluster's archive.

pub mod backup;
pub mod envelope;
pub mod identity;
pub mod index;
pub mod names;
pub mod walcat;

use bytes::Bytes;

use crate::storage::{ObjectStore, PutMode, StorageError};

/// What [`put_once`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Written,
    /// The same content was already there (a retry after an unknown outcome, or a restart).
    AlreadyThere,
}

/// Write-once with a content check: identical content already under `key` is success;
/// different content is a split-brain error that must stop the writer.
#[derive(Debug, thiserror::Error)]
pub enum PutOnceError {
    #[error(
        "split brain: object {key} already exists with different content\nHINT: another writer (a second agent, or a \
         cluster restored from this archive) is writing to this archive; stop it, or give each writer its own archive. \
         Nothing was overwritten."
    )]
    SplitBrain { key: String },
    #[error("object {key} already exists and cannot be read back to compare: {source}")]
    Unreadable { key: String, source: anyhow::Error },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Put `object` (an encoded envelope whose plain content is `content`) under `key` write-once.
pub async fn put_once(
    store: &dyn ObjectStore,
    key: &str,
    object: Bytes,
    content: &[u8],
) -> Result<PutOutcome, PutOnceError> {
    match store.put(key, object, PutMode::IfAbsent).await {
        Ok(()) => Ok(PutOutcome::Written),
        Err(StorageError::AlreadyExists { .. }) => {
            let existing = store.get(key).await?;
            let decoded = envelope::decode(key, &existing)
                .map_err(|e| PutOnceError::Unreadable { key: key.to_string(), source: e.into() })?;
            if decoded.content == content {
                Ok(PutOutcome::AlreadyThere)
            } else {
                Err(PutOnceError::SplitBrain { key: key.to_string() })
            }
        }
        Err(e) => Err(e.into()),
    }
}
