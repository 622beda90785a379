//! Object storage: the one trait the archive is written against, and its backends.
//!
//! A repository lives at one URL:
//!
//! | URL | backend |
//! |---|---|
//! | `file:///var/lib/walvault/archive` or a plain absolute/relative path | [`local::LocalStore`], the embedded default |
//! | `s3://bucket/prefix` | [`s3::S3Store`]: AWS S3 and S3-compatible stores (R2, B2, Wasabi, MinIO, SeaweedFS, Ceph) |
//!
//! # Contract
//!
//! * Keys are relative to the repository root, `/`-separated, made of `[A-Za-z0-9._=+-]` and
//!   `/` ([`validate_key`]); no empty component, no `.`/`..` component. The archive's names are
//!   catalogued in [`crate::archive::names`].
//! * [`ObjectStore::put`] with [`PutMode::IfAbsent`] is write-once: exactly one of several
//!   concurrent writers of one key succeeds, the others get [`StorageError::AlreadyExists`].
//!   A put either leaves the whole new object or (on error) nothing new: never a torn object.
//!   A put that fails with [`StorageError::Timeout`] is *indeterminate*: the object may or may
//!   not exist; write-once callers re-read it and compare checksums before retrying.
//! * Listings are produced page by page as a stream, in no promised order: AWS S3 lists in key
//!   byte order, SeaweedFS directory by directory. Callers that need an order sort.
//! * Deleting a key that does not exist is not an error.
//! * Every error names the operation and the key ([`StorageError`]); callers branch on the
//!   variant and on [`StorageError::is_permanent`].

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

pub mod faulty;
pub mod journal;
pub mod local;
pub mod retry;
pub mod s3;

/// Whether a put may replace an existing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    /// Replace whatever is there (used only for objects that are meant to move, like indexes).
    Overwrite,
    /// Write-once: fail with [`StorageError::AlreadyExists`] if the key exists.
    IfAbsent,
}

/// What a listing or head says of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// A stream of an object's bytes.
pub type ByteStream = BoxStream<'static, Result<Bytes, StorageError>>;

/// A storage failure a caller can branch on. Every variant names the operation and the key.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {key}: object not found")]
    NotFound { op: &'static str, key: String },
    #[error("{op} {key}: object already exists (write-once)")]
    AlreadyExists { op: &'static str, key: String },
    #[error("{op} {key}: precondition failed: {message}")]
    Precondition { op: &'static str, key: String, message: String },
    /// The operation may or may not have taken effect.
    #[error("{op} {key}: timed out; the outcome is unknown")]
    Timeout { op: &'static str, key: String },
    /// Worth retrying: throttling, a dropped connection, a 5xx.
    #[error("{op} {key}: {message}")]
    Transient { op: &'static str, key: String, message: String },
    /// Retrying will not help: bad credentials, missing bucket, invalid key, full disk.
    #[error("{op} {key}: {message}{}", hint.as_ref().map(|h| format!("\nHINT: {h}")).unwrap_or_default())]
    Permanent { op: &'static str, key: String, message: String, hint: Option<String> },
}

impl StorageError {
    /// Retrying the same call cannot succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            StorageError::NotFound { .. }
                | StorageError::AlreadyExists { .. }
                | StorageError::Precondition { .. }
                | StorageError::Permanent { .. }
        )
    }
    /// The call may have taken effect even though it failed.
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, StorageError::Timeout { .. } | StorageError::Transient { .. })
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
    pub fn key(&self) -> &str {
        match self {
            StorageError::NotFound { key, .. }
            | StorageError::AlreadyExists { key, .. }
            | StorageError::Precondition { key, .. }
            | StorageError::Timeout { key, .. }
            | StorageError::Transient { key, .. }
            | StorageError::Permanent { key, .. } => key,
        }
    }
    pub fn permanent(op: &'static str, key: &str, message: impl fmt::Display) -> Self {
        StorageError::Permanent { op, key: key.to_string(), message: message.to_string(), hint: None }
    }
    pub fn transient(op: &'static str, key: &str, message: impl fmt::Display) -> Self {
        StorageError::Transient { op, key: key.to_string(), message: message.to_string() }
    }
}

/// What the archive needs from a store. Implementations: [`local::LocalStore`],
/// [`s3::S3Store`], and [`faulty::FaultyStore`] around either.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// The repository URL, without secrets, for messages.
    fn url(&self) -> String;

    /// Store `data` under `key`. On error nothing new is visible, except after
    /// [`StorageError::Timeout`]/[`StorageError::Transient`], where the put may have completed.
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StorageError>;

    /// Store a stream of unknown length under `key` with bounded memory (multipart on S3).
    /// Returns the number of bytes stored. Same failure contract as [`ObjectStore::put`]; an
    /// abandoned multipart upload is aborted.
    async fn put_stream(&self, key: &str, data: ByteStream, mode: PutMode) -> Result<u64, StorageError>;

    /// The whole object, streamed.
    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError>;

    /// Bytes `range` of the object (end exclusive, clamped to the object's size).
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError>;

    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError>;

    /// Objects whose key starts with `prefix`, fetched page by page, in no promised order.
    fn list(&self, prefix: &str) -> BoxStream<'_, Result<ObjectMeta, StorageError>>;

    /// Delete `keys` (batched); keys that do not exist are skipped silently.
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError>;

    /// The whole object in memory.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let mut s = self.get_stream(key).await?;
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = s.try_next().await? {
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// The whole object in memory, refused (without reading further) once it exceeds `max`
    /// bytes: what readers of an untrusted archive use.
    async fn get_bounded(&self, key: &str, max: u64) -> Result<Bytes, StorageError> {
        let mut s = self.get_stream(key).await?;
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = s.try_next().await? {
            if (buf.len() + chunk.len()) as u64 > max {
                return Err(StorageError::Permanent {
                    op: "get",
                    key: key.to_string(),
                    message: format!("object is larger than the {max} bytes an object of its kind may have"),
                    hint: Some("the object was forged or damaged; do not trust this archive location".into()),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// Every key under `prefix`, collected.
    async fn list_all(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.list(prefix).try_collect().await
    }
}

/// Check that `key` is one the archive may use (see the module contract).
pub fn validate_key(op: &'static str, key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.len() <= 900 // S3 allows 1024 bytes; leave room for a prefix.
        && key.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._=+-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StorageError::Permanent {
            op,
            key: key.to_string(),
            message: "invalid object key".into(),
            hint: Some("keys are /-separated components of [A-Za-z0-9._=+-], none empty, . or ..".into()),
        })
    }
}

/// A parsed repository URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepoUrl {
    Local(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl RepoUrl {
    /// `file:///abs/path`, a plain path, or `s3://bucket[/prefix]`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                anyhow::bail!("invalid archive URL {s:?}: no bucket\nHINT: write s3://BUCKET/PREFIX");
            }
            let prefix = prefix.trim_matches('/').to_string();
            if !prefix.is_empty() {
                validate_key("parse archive URL", &prefix)?;
            }
            return Ok(RepoUrl::S3 { bucket: bucket.to_string(), prefix });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                anyhow::bail!("invalid archive URL {s:?}: a file URL needs an absolute path\nHINT: write file:///abs/path (three slashes)");
            }
            return Ok(RepoUrl::Local(rest.into()));
        }
        if s.contains("://") {
            anyhow::bail!("unsupported archive URL {s:?}\nHINT: use file:///path, a plain path, or s3://bucket/prefix");
        }
        if s.is_empty() {
            anyhow::bail!("empty archive URL\nHINT: use file:///path, a plain path, or s3://bucket/prefix");
        }
        Ok(RepoUrl::Local(s.into()))
    }
}

/// Open the store a repository URL names. S3 settings beyond bucket and prefix come from
/// `s3opts` and the standard AWS environment.
pub async fn open(url: &str, s3opts: &s3::S3Options) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match RepoUrl::parse(url)? {
        RepoUrl::Local(path) => Ok(Arc::new(local::LocalStore::open(&path)?)),
        RepoUrl::S3 { bucket, prefix } => Ok(Arc::new(s3::S3Store::connect(&bucket, &prefix, s3opts).await?)),
    }
}

/// [`open`] for the streaming agent, the one writer of a local archive's commit journal
/// ([`journal`]): with `puts` (synchronous mode) WAL chunks are written through it
/// ([`local::LocalStore::with_journal`]); without, only its objects' deletes go through it (a
/// journal left by an earlier synchronous run drains as its chunks are consolidated). S3 is
/// opened as by [`open`].
pub async fn open_journaled(url: &str, s3opts: &s3::S3Options, puts: bool) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match RepoUrl::parse(url)? {
        RepoUrl::Local(path) => {
            let store = local::LocalStore::open(&path)?.with_journal()?;
            Ok(Arc::new(if puts { store } else { store.without_journal_puts() }))
        }
        RepoUrl::S3 { .. } => open(url, s3opts).await,
    }
}

/// Open an existing repository for reading: a local directory must exist (nothing is created).
pub async fn open_existing(url: &str, s3opts: &s3::S3Options) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match RepoUrl::parse(url)? {
        RepoUrl::Local(path) => Ok(Arc::new(local::LocalStore::open_existing(&path)?)),
        RepoUrl::S3 { bucket, prefix } => Ok(Arc::new(s3::S3Store::connect(&bucket, &prefix, s3opts).await?)),
    }
}

/// Split a stream into chunks of at most `size` bytes (the last may be shorter), for uploads.
pub(crate) fn rechunk(data: ByteStream, size: usize) -> BoxStream<'static, Result<Bytes, StorageError>> {
    futures::stream::unfold((data, bytes::BytesMut::new(), false), move |(mut data, mut buf, mut done)| async move {
        loop {
            if buf.len() >= size {
                let out = buf.split_to(size).freeze();
                return Some((Ok(out), (data, buf, done)));
            }
            if done {
                if buf.is_empty() {
                    return None;
                }
                let out = buf.split().freeze();
                return Some((Ok(out), (data, buf, done)));
            }
            match data.next().await {
                Some(Ok(b)) => buf.extend_from_slice(&b),
                Some(Err(e)) => return Some((Err(e), (data, buf, true))),
                None => done = true,
            }
        }
    })
    .fuse()
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in ["a", "wal/00000001/000000010000000000000003", "x/a.b_c=d+e-f"] {
            validate_key("t", ok).unwrap();
        }
        for bad in ["", "/a", "a/", "a//b", "a/../b", "./a", "a b", "a\\b", "ä"] {
            assert!(validate_key("t", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(RepoUrl::parse("file:///x/y").unwrap(), RepoUrl::Local("/x/y".into()));
        assert_eq!(RepoUrl::parse("rel/dir").unwrap(), RepoUrl::Local("rel/dir".into()));
        assert_eq!(RepoUrl::parse("s3://b/p/q/").unwrap(), RepoUrl::S3 { bucket: "b".into(), prefix: "p/q".into() });
        assert_eq!(RepoUrl::parse("s3://b").unwrap(), RepoUrl::S3 { bucket: "b".into(), prefix: "".into() });
        assert!(RepoUrl::parse("file://rel").is_err());
        assert!(RepoUrl::parse("gs://b").is_err());
        assert!(RepoUrl::parse("s3:///p").is_err());
    }

    #[tokio::test]
    async fn rechunk_sizes() {
        let input: ByteStream =
            futures::stream::iter([3usize, 10, 1, 0, 7].map(|n| Ok::<_, StorageError>(Bytes::from(vec![1u8; n]))))
                .boxed();
        let sizes: Vec<usize> = rechunk(input, 4).map_ok(|b| b.len()).try_collect().await.unwrap();
        assert_eq!(sizes, vec![4, 4, 4, 4, 4, 1]);
    }
}
