//! Writing the archive: every object is sealed (envelope; with the agent's signing key a
//! signature bound to its name; with encryption configured, the content of every confidential
//! object — [`names::is_confidential`] — encrypted under the current epoch key) by one
//! [`Writer`], and written once.
//!
//! Encryption fails closed: a confidential object cannot be encoded before an epoch key has
//! been written to the archive ([`Writer::new_epoch`]); nothing is ever uploaded in clear once
//! encryption is configured.
//!
//! Write-once with a content check ([`Writer::put_once`]): identical content already under the
//! name is success (a retry after a timeout whose outcome was unknown, or a restart); different
//! content is split brain and must stop the writer. Only derived objects that are meant to move
//! (commit index days) are overwritten ([`Writer::put_overwrite`]).

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::crypt::{EpochKey, Recipients};
use super::envelope::{self, Compression, Expect, ObjectKind, Seal};
use super::names;
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

/// Encryption at rest, on the writing side: the recipients and the current epoch key.
#[derive(Debug)]
pub struct Encryption {
    recipients: Recipients,
    current: std::sync::RwLock<Option<Arc<EpochKey>>>,
}

/// What a key object's metadata says (in clear).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyMeta {
    pub epoch: String,
    #[serde(with = "crate::time::rfc3339")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Fingerprints of the recipients the key is wrapped to (`passphrase` in that mode).
    pub recipients: Vec<String>,
}

/// Seals and writes objects. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<SigningKey>>,
    encryption: Option<Arc<Encryption>>,
}

impl Writer {
    pub fn new(store: Arc<dyn ObjectStore>, signer: Option<Arc<SigningKey>>) -> Self {
        Writer { store, signer, encryption: None }
    }

    /// Encrypt confidential objects to `recipients` (call [`Writer::new_epoch`] before writing).
    pub fn with_encryption(mut self, recipients: Recipients) -> Self {
        self.encryption = Some(Arc::new(Encryption { recipients, current: std::sync::RwLock::new(None) }));
        self
    }

    pub fn encrypts(&self) -> bool {
        self.encryption.is_some()
    }

    /// With encryption on: start the first epoch unless one is running. Returns the new epoch's
    /// id, if one was started.
    pub async fn ensure_epoch(&self) -> anyhow::Result<Option<String>> {
        match &self.encryption {
            Some(enc) if enc.current.read().expect("epoch lock").is_none() => Ok(Some(self.new_epoch().await?)),
            _ => Ok(None),
        }
    }

    /// Start a new epoch: draw a data key, write it wrapped to the recipients as
    /// `keys/<epoch id>` (signed, write-once), and only then use it. The previous key is
    /// forgotten (zeroed once the objects sealed with it are written). Returns the epoch id.
    pub async fn new_epoch(&self) -> anyhow::Result<String> {
        let enc = self.encryption.as_ref().ok_or_else(|| anyhow::anyhow!("encryption is not configured"))?;
        let epoch = Arc::new(EpochKey::generate());
        let wrapped = enc.recipients.wrap(&epoch)?;
        let key = names::epoch_key(&epoch.id_hex());
        let meta = KeyMeta {
            epoch: epoch.id_hex(),
            created_at: crate::time::now(),
            recipients: enc.recipients.fingerprints(),
        };
        let obj = envelope::encode(ObjectKind::Key, &meta, &wrapped, Compression::None, 0, self.seal(&key, None));
        self.store.put(&key, obj.into(), PutMode::IfAbsent).await?;
        *enc.current.write().expect("epoch lock") = Some(epoch.clone());
        Ok(epoch.id_hex())
    }

    /// The epoch key to encrypt `key` with: `Some` for a confidential object when encryption
    /// is on. Panics when encryption is on and no epoch was started: that would be a write in
    /// clear, which must never happen.
    fn epoch_for(&self, key: &str) -> Option<Arc<EpochKey>> {
        let enc = self.encryption.as_ref()?;
        if !names::is_confidential(key) {
            return None;
        }
        let current = enc.current.read().expect("epoch lock").clone();
        Some(current.unwrap_or_else(|| panic!("encryption configured but no epoch key written before {key}")))
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn signer(&self) -> Option<&SigningKey> {
        self.signer.as_deref()
    }

    fn seal<'a>(&'a self, key: &'a str, epoch: Option<&'a EpochKey>) -> Seal<'a> {
        Seal { key, signer: self.signer.as_deref(), epoch }
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
        let epoch = self.epoch_for(key);
        envelope::encode(kind, metadata, plain, compression, level, self.seal(key, epoch.as_deref())).into()
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
        self.encode_raw_parts(key, kind, meta_json, plain_len, plain_crc, compression, &[payload])
    }

    /// [`Writer::encode_raw`] for a payload in pieces, written into the object without joining
    /// them first.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_raw_parts(
        &self,
        key: &str,
        kind: ObjectKind,
        meta_json: &[u8],
        plain_len: u64,
        plain_crc: u32,
        compression: Compression,
        parts: &[&[u8]],
    ) -> Bytes {
        let epoch = self.epoch_for(key);
        envelope::encode_raw_parts(
            kind,
            meta_json,
            plain_len,
            plain_crc,
            compression,
            parts,
            self.seal(key, epoch.as_deref()),
        )
        .into()
    }

    /// A metadata-only object (descriptions, locks): JSON metadata, no content, never
    /// encrypted.
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

    /// The object under `key` exists: is its content `content`? An encrypted one (which the
    /// agent cannot decrypt) is compared by plain length and crc32.
    async fn compare_existing(&self, key: &str, content: &[u8]) -> Result<PutOutcome, PutOnceError> {
        let max = content.len() as u64;
        let existing = self.store.get_bounded(key, envelope::max_stored_len(max)).await?;
        let unreadable =
            |e: envelope::EnvelopeError| PutOnceError::Unreadable { key: key.to_string(), source: e.into() };
        let (h, _) = envelope::decode_header(key, &existing, None).map_err(unreadable)?;
        if h.encryption_block.is_some() {
            let same = h.plain_len == max && h.plain_crc == crc32fast::hash(content);
            return if same { Ok(PutOutcome::AlreadyThere) } else { Err(PutOnceError::SplitBrain { key: key.into() }) };
        }
        let expect = Expect { kind: None, max_plain: max, what: "existing object", verify: None, epoch: None };
        match envelope::decode(key, &existing, &expect) {
            Ok(d) if d.content == content => Ok(PutOutcome::AlreadyThere),
            Ok(_) | Err(envelope::EnvelopeError::TooLarge { .. }) => Err(PutOnceError::SplitBrain { key: key.into() }),
            Err(e) => Err(unreadable(e)),
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
                if let Ok((h, _)) = envelope::decode_header(key, &existing, None) {
                    if h.encryption_block.is_some() {
                        let same = h.plain_len == plain_len && h.plain_crc == plain_crc;
                        return if same {
                            Ok(PutOutcome::AlreadyThere)
                        } else {
                            Err(PutOnceError::SplitBrain { key: key.into() })
                        };
                    }
                }
                let expect =
                    Expect { kind: None, max_plain: plain_len, what: "existing object", verify: None, epoch: None };
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
