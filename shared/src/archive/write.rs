//! Writing the archive: every object is sealed (envelope, and with the agent's signing key a
//! signature bound to its name) by one [`Writer`], and written once.
//!
//! Write-once with a content check ([`Writer::put_once`]): identical content already under the
//! name is success (a retry after a timeout whose outcome was unknown, or a restart); different
//! content is split brain and must stop the writer. Only derived objects that are meant to move
//! (commit index days) are overwritten ([`Writer::put_overwrite`]).

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::envelope::{self, Compression, Expect, ObjectKind, Seal};
use super::sign::SigningKey;
use crate::storage::{ObjectStore, PutMode, StorageError};

/// What [`Writer::put_once`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Written,
    /// The same content was already there (a retry after an unknown outcome, or a restart).
    AlreadyThere,
}

/// Why a write-once put failed.
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

/// Seals and writes objects. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<SigningKey>>,
}

impl Writer {
    pub fn new(store: Arc<dyn ObjectStore>, signer: Option<Arc<SigningKey>>) -> Self {
        Writer { store, signer }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn signer(&self) -> Option<&SigningKey> {
        self.signer.as_deref()
    }

    fn seal<'a>(&'a self, key: &'a str) -> Seal<'a> {
        Seal { key, signer: self.signer.as_deref() }
    }

    /// The sealed object for `plain` under `key` (zstd at `level`, or stored as is).
    pub fn encode<M: Serialize>(
        &self,
        key: &str,
        kind: ObjectKind,
        metadata: &M,
        plain: &[u8],
        compression: Compression,
        level: i32,
    ) -> Bytes {
        envelope::encode(kind, metadata, plain, compression, level, self.seal(key)).into()
    }

    /// The sealed object for an already-compressed payload.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_raw(
        &self,
        key: &str,
        kind: ObjectKind,
        meta_json: &[u8],
        plain_len: u64,
        plain_crc: u32,
        compression: Compression,
        payload: &[u8],
    ) -> Bytes {
        envelope::encode_raw(kind, meta_json, plain_len, plain_crc, compression, payload, self.seal(key)).into()
    }

    /// A metadata-only object (descriptions, locks): JSON metadata, no content.
    pub fn encode_metadata<M: Serialize>(&self, key: &str, metadata: &M) -> Bytes {
        self.encode(key, ObjectKind::Metadata, metadata, b"", Compression::None, 0)
    }

    /// Write `object` (sealed by this writer, plain content `content`) under `key`, once.
    pub async fn put_once(&self, key: &str, object: Bytes, content: &[u8]) -> Result<PutOutcome, PutOnceError> {
        match self.store.put(key, object, PutMode::IfAbsent).await {
            Ok(()) => Ok(PutOutcome::Written),
            Err(StorageError::AlreadyExists { .. }) => self.compare_existing(key, content).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The object under `key` exists: is its content `content`?
    async fn compare_existing(&self, key: &str, content: &[u8]) -> Result<PutOutcome, PutOnceError> {
        let max = content.len() as u64;
        let existing = self.store.get_bounded(key, envelope::max_stored_len(max)).await?;
        let expect = Expect { kind: None, max_plain: max, what: "existing object", verify: None };
        match envelope::decode(key, &existing, &expect) {
            Ok(d) if d.content == content => Ok(PutOutcome::AlreadyThere),
            Ok(_) | Err(envelope::EnvelopeError::TooLarge { .. }) => Err(PutOnceError::SplitBrain { key: key.into() }),
            Err(e) => Err(PutOnceError::Unreadable { key: key.to_string(), source: e.into() }),
        }
    }

    /// Write-once for an object whose plain content is known by length and crc32 only (a whole
    /// segment assembled from its chunks' compressed frames): an existing object is the same
    /// when it decodes (checksums verified) to that length and crc32.
    pub async fn put_once_by_checksum(
        &self,
        key: &str,
        object: Bytes,
        plain_len: u64,
        plain_crc: u32,
    ) -> Result<PutOutcome, PutOnceError> {
        match self.store.put(key, object, PutMode::IfAbsent).await {
            Ok(()) => Ok(PutOutcome::Written),
            Err(StorageError::AlreadyExists { .. }) => {
                let existing = self.store.get_bounded(key, envelope::max_stored_len(plain_len)).await?;
                let expect = Expect { kind: None, max_plain: plain_len, what: "existing object", verify: None };
                match envelope::decode(key, &existing, &expect) {
                    Ok(d) if d.header.plain_len == plain_len && d.header.plain_crc == plain_crc => {
                        Ok(PutOutcome::AlreadyThere)
                    }
                    Ok(_) | Err(envelope::EnvelopeError::TooLarge { .. }) => {
                        Err(PutOnceError::SplitBrain { key: key.into() })
                    }
                    Err(e) => Err(PutOnceError::Unreadable { key: key.to_string(), source: e.into() }),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replace whatever is under `key` (derived objects only: commit index days).
    pub async fn put_overwrite(&self, key: &str, object: Bytes) -> Result<(), StorageError> {
        self.store.put(key, object, PutMode::Overwrite).await
    }
}
