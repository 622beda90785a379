//! `s3://bucket/prefix`: AWS S3 and S3-compatible stores, through aws-sdk-s3.
//!
//! * Credentials and region come from the standard AWS chain (`AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE` and `~/.aws/{config,credentials}`,
//!   `AWS_REGION`, web identity, instance metadata). The endpoint comes from
//!   [`S3Options::endpoint`] or `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`. With no region
//!   anywhere, `us-east-1` is used (most S3-compatible stores ignore it but SigV4 needs one).
//! * Write-once puts send `If-None-Match: *`; the store answers 412 when the key exists, which
//!   becomes [`StorageError::AlreadyExists`]. Multipart uploads send it on
//!   CompleteMultipartUpload (AWS honours it there; a store that ignores it there gives
//!   write-once only for single-part objects, and the archive keeps WAL chunks single-part).
//! * Objects larger than [`S3Options::part_size`] go up as multipart uploads, with at most
//!   [`S3Options::part_concurrency`] parts in flight, so memory stays below
//!   `part_size × (part_concurrency + 1)` whatever the object size. A failed multipart upload
//!   is aborted.
//! * Retries: the SDK's standard retry mode (exponential backoff with full jitter, on throttling
//!   429/503/`SlowDown`, 5xx, and connection and timeout errors), [`S3Options::max_attempts`]
//!   attempts; each attempt is bounded by [`S3Options::attempt_timeout`].
//!   What is left after that is a [`StorageError`] for the caller's own retry loop.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as AwsBody;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::stream::{BoxStream, FuturesOrdered};
use futures::{StreamExt, TryStreamExt};

use super::{rechunk, validate_key, ByteStream, ObjectMeta, ObjectStore, PutMode, StorageError};

/// S3's smallest part size for all but the last part of a multipart upload (5 MiB).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// S3's largest DeleteObjects batch (1000 keys).
const MAX_DELETE_BATCH: usize = 1000;

/// S3 settings beyond bucket and prefix.
#[derive(Clone, Debug)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint` (needed for most
    /// self-hosted stores and for loopback).
    pub force_path_style: bool,
    pub part_size: usize,
    pub part_concurrency: usize,
    /// Keys per ListObjectsV2 page (S3 caps it at 1000).
    pub list_page_size: i32,
    pub max_attempts: u32,
    pub attempt_timeout: Duration,
    /// Explicit keys instead of the AWS chain (config files; tests). Never printed.
    pub credentials: Option<StaticCredentials>,
    /// Server-side encryption asked of the store for every object (`AES256` for SSE-S3,
    /// `aws:kms` for SSE-KMS): a complement to walvault's own encryption, not a substitute
    /// (the provider holds those keys).
    pub sse: Option<String>,
    /// The KMS key for `aws:kms` (else the bucket's default).
    pub sse_kms_key_id: Option<String>,
    /// The storage class of base backup objects (`backups/…`); WAL and metadata stay in the
    /// bucket's default class (they are read at every restore and often listed).
    pub backup_storage_class: Option<String>,
}

/// An access key pair given explicitly. `Debug` hides the secret.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            force_path_style: false,
            part_size: 16 << 20,
            part_concurrency: 4,
            list_page_size: 1000,
            max_attempts: 5,
            attempt_timeout: Duration::from_secs(60),
            credentials: None,
            sse: None,
            sse_kms_key_id: None,
            backup_storage_class: None,
        }
    }
}

/// Parse `--backup-storage-class`: the S3 classes an object can be read from at once.
/// Archive classes (GLACIER, DEEP_ARCHIVE) are refused: their objects need a restore request
/// before a read, and a restore that waits hours for that is not a restore.
pub fn parse_storage_class(s: &str) -> anyhow::Result<String> {
    let up = s.to_ascii_uppercase();
    match up.as_str() {
        "STANDARD" | "STANDARD_IA" | "ONEZONE_IA" | "INTELLIGENT_TIERING" | "GLACIER_IR" => Ok(up),
        "GLACIER" | "DEEP_ARCHIVE" | "GLACIER_FLEXIBLE_RETRIEVAL" => anyhow::bail!(
            "storage class {up} needs a restore request before every read\nHINT: use STANDARD_IA, INTELLIGENT_TIERING or GLACIER_IR (instant retrieval); move older backups to archive classes with a bucket lifecycle rule if you must"
        ),
        _ => anyhow::bail!(
            "unknown storage class {s:?}\nHINT: STANDARD, STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING or GLACIER_IR"
        ),
    }
}

/// Parse `--s3-sse`: `aes256` (SSE-S3) or `aws:kms` (SSE-KMS).
pub fn parse_sse(s: &str) -> anyhow::Result<String> {
    match s.to_ascii_lowercase().as_str() {
        "aes256" | "sse-s3" => Ok("AES256".into()),
        "aws:kms" | "kms" | "sse-kms" => Ok("aws:kms".into()),
        _ => anyhow::bail!("invalid server-side encryption {s:?}\nHINT: use aes256 (SSE-S3) or aws:kms (SSE-KMS, with --s3-sse-kms-key-id)"),
    }
}

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or a prefix without leading or trailing `/`.
    prefix: String,
    opts: S3Options,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store").field("url", &self.url()).finish()
    }
}

impl S3Store {
    /// Build a client. This does not touch the network; the first call reports a wrong
    /// endpoint, bucket or credentials.
    pub async fn connect(bucket: &str, prefix: &str, opts: &S3Options) -> anyhow::Result<Self> {
        if opts.part_size < MIN_PART_SIZE {
            anyhow::bail!("S3 part size {} is below S3's minimum of 5 MiB", opts.part_size);
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some(r) = &opts.region {
            loader = loader.region(Region::new(r.clone()));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(opts.force_path_style)
            .retry_config(RetryConfig::standard().with_max_attempts(opts.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .build(),
            );
        if shared.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        if let Some(ep) = &opts.endpoint {
            b = b.endpoint_url(ep);
        }
        if let Some(c) = &opts.credentials {
            b = b.credentials_provider(aws_sdk_s3::config::Credentials::new(
                &c.access_key_id,
                &c.secret_access_key,
                None,
                None,
                "walvault-config",
            ));
        }
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            opts: opts.clone(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn full_key(&self, op: &'static str, key: &str) -> Result<String, StorageError> {
        validate_key(op, key)?;
        Ok(if self.prefix.is_empty() { key.to_string() } else { format!("{}/{}", self.prefix, key) })
    }

    fn strip(&self, full: &str) -> String {
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.prefix).map(|s| s.trim_start_matches('/')).unwrap_or(full).to_string()
        }
    }

    /// The storage class to ask for `key`: the backup class for base backup parts and
    /// manifests (not their descriptions, which every listing reads).
    fn storage_class_for(&self, key: &str) -> Option<&str> {
        let backup_data = key.starts_with("backups/") && !key.ends_with("backup.json") && !key.ends_with("backup.lock");
        self.opts.backup_storage_class.as_deref().filter(|_| backup_data)
    }

    async fn put_single(&self, key: &str, full: &str, data: Bytes, mode: PutMode) -> Result<(), StorageError> {
        let mut req = self.client.put_object().bucket(&self.bucket).key(full).body(AwsBody::from(data));
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        if let Some(class) = self.storage_class_for(key) {
            req = req.storage_class(class.into());
        }
        if let Some(sse) = &self.opts.sse {
            req = req.server_side_encryption(sse.as_str().into());
            if let Some(k) = &self.opts.sse_kms_key_id {
                req = req.ssekms_key_id(k);
            }
        }
        req.send().await.map(|_| ()).map_err(|e| self.map_err("put", key, e))
    }

    async fn put_multipart(
        &self,
        key: &str,
        full: &str,
        first: Bytes,
        mut rest: BoxStream<'static, Result<Bytes, StorageError>>,
        mode: PutMode,
    ) -> Result<u64, StorageError> {
        if mode == PutMode::IfAbsent {
            // Cheap early refusal; the conditional complete below is what closes the race.
            match self.head(key).await {
                Ok(_) => return Err(StorageError::AlreadyExists { op: "put", key: key.to_string() }),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let mut create = self.client.create_multipart_upload().bucket(&self.bucket).key(full);
        if let Some(class) = self.storage_class_for(key) {
            create = create.storage_class(class.into());
        }
        if let Some(sse) = &self.opts.sse {
            create = create.server_side_encryption(sse.as_str().into());
            if let Some(k) = &self.opts.sse_kms_key_id {
                create = create.ssekms_key_id(k);
            }
        }
        let created = create.send().await.map_err(|e| self.map_err("put", key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StorageError::permanent("put", key, "store returned no multipart upload id"))?
            .to_string();
        let result = async {
            let mut parts = Vec::new();
            let mut in_flight = FuturesOrdered::new();
            let mut next: Option<Bytes> = Some(first);
            let mut number = 0i32;
            let mut total = 0u64;
            loop {
                while in_flight.len() < self.opts.part_concurrency.max(1) {
                    let body = match next.take() {
                        Some(b) => b,
                        None => match rest.try_next().await? {
                            Some(b) => b,
                            None => break,
                        },
                    };
                    number += 1;
                    total += body.len() as u64;
                    let req = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(full)
                        .upload_id(&upload_id)
                        .part_number(number)
                        .body(AwsBody::from(body));
                    let n = number;
                    in_flight.push_back(async move { (n, req.send().await) });
                }
                match in_flight.next().await {
                    None => break,
                    Some((n, r)) => {
                        let out = r.map_err(|e| self.map_err("put", key, e))?;
                        parts.push(
                            CompletedPart::builder().part_number(n).set_e_tag(out.e_tag().map(str::to_string)).build(),
                        );
                    }
                }
            }
            let mut req = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build());
            if mode == PutMode::IfAbsent {
                req = req.if_none_match("*");
            }
            req.send().await.map_err(|e| self.map_err("put", key, e))?;
            Ok::<u64, StorageError>(total)
        }
        .await;
        if result.is_err() {
            let _ =
                self.client.abort_multipart_upload().bucket(&self.bucket).key(full).upload_id(&upload_id).send().await;
        }
        result
    }

    fn map_err<E>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let key = key.to_string();
        let detail = DisplayErrorContext(&e).to_string();
        match &e {
            SdkError::TimeoutError(_) => StorageError::Timeout { op, key },
            SdkError::DispatchFailure(d) if d.is_timeout() => StorageError::Timeout { op, key },
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
                StorageError::Transient { op, key, message: format!("cannot reach the S3 endpoint: {detail}") }
            }
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or("");
                let message = format!(
                    "{} (HTTP {status}{}{})",
                    se.err().message().unwrap_or("S3 error"),
                    if code.is_empty() { "" } else { ", " },
                    code
                );
                let permanent = |hint: &str| StorageError::Permanent {
                    op,
                    key: key.clone(),
                    message: message.clone(),
                    hint: Some(hint.to_string()),
                };
                match (status, code) {
                    (_, "NoSuchBucket") => permanent(&format!("bucket {:?} does not exist at this endpoint; create it or fix the archive URL", self.bucket)),
                    (404, _) | (_, "NoSuchKey") => StorageError::NotFound { op, key },
                    (412, _) if op == "put" => StorageError::AlreadyExists { op, key },
                    (412, _) => StorageError::Precondition { op, key, message },
                    (403, _) | (_, "InvalidAccessKeyId") | (_, "SignatureDoesNotMatch") => permanent(
                        "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the profile in use) and that they may read and write this bucket",
                    ),
                    (409, _) | (429, _) | (500..=599, _) => StorageError::Transient { op, key, message },
                    _ => StorageError::Permanent { op, key, message, hint: None },
                }
            }
            _ => StorageError::Permanent { op, key, message: detail, hint: None },
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StorageError> {
        let full = self.full_key("put", key)?;
        if data.len() <= self.opts.part_size {
            return self.put_single(key, &full, data, mode).await;
        }
        let first = data.slice(..self.opts.part_size);
        let rest = data.slice(self.opts.part_size..);
        let rest = rechunk(futures::stream::once(async move { Ok(rest) }).boxed(), self.opts.part_size);
        self.put_multipart(key, &full, first, rest, mode).await.map(|_| ())
    }

    async fn put_stream(&self, key: &str, data: ByteStream, mode: PutMode) -> Result<u64, StorageError> {
        let full = self.full_key("put", key)?;
        let mut parts = rechunk(data, self.opts.part_size);
        let first = parts.try_next().await?.unwrap_or_default();
        if first.len() < self.opts.part_size {
            // The whole stream fitted in one part.
            let n = first.len() as u64;
            self.put_single(key, &full, first, mode).await?;
            return Ok(n);
        }
        self.put_multipart(key, &full, first, parts, mode).await
    }

    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        let full = self.full_key("get", key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.map_err("get", key, e))?;
        let k = key.to_string();
        Ok(futures::stream::unfold((out.body, k), |(mut body, k)| async move {
            match body.try_next().await {
                Ok(Some(b)) => Some((Ok(b), (body, k))),
                Ok(None) => None,
                Err(e) => {
                    let err = StorageError::transient("get", &k, format!("reading body: {e}"));
                    Some((Err(err), (body, k)))
                }
            }
        })
        .boxed())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        let full = self.full_key("get", key)?;
        if range.end <= range.start {
            self.head(key).await?;
            return Ok(Bytes::new());
        }
        let r = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await;
        let out = match r {
            Ok(out) => out,
            // 416: the range starts past the end; the contract clamps, so that is empty.
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => return Ok(Bytes::new()),
            Err(e) => return Err(self.map_err("get", key, e)),
        };
        let data =
            out.body.collect().await.map_err(|e| StorageError::transient("get", key, format!("reading body: {e}")))?;
        Ok(data.into_bytes())
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError> {
        let full = self.full_key("head", key)?;
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.map_err("head", key, e))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            last_modified: out
                .last_modified()
                .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
        })
    }

    fn list(&self, prefix: &str) -> BoxStream<'_, Result<ObjectMeta, StorageError>> {
        let full_prefix =
            if self.prefix.is_empty() { prefix.to_string() } else { format!("{}/{}", self.prefix, prefix) };
        let prefix = prefix.to_string();
        // State: Some(token) = more pages; the first page has no token.
        futures::stream::unfold(Some(None::<String>), move |state| {
            let full_prefix = full_prefix.clone();
            let prefix = prefix.clone();
            async move {
                let token = state?;
                let r = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .max_keys(self.opts.list_page_size)
                    .set_continuation_token(token)
                    .send()
                    .await;
                match r {
                    Err(e) => Some((Err(self.map_err("list", &prefix, e)), None)),
                    Ok(out) => {
                        let items: Vec<Result<ObjectMeta, StorageError>> = out
                            .contents()
                            .iter()
                            .filter_map(|o| {
                                Some(Ok(ObjectMeta {
                                    key: self.strip(o.key()?),
                                    size: o.size().unwrap_or(0).max(0) as u64,
                                    last_modified: o
                                        .last_modified()
                                        .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
                                }))
                            })
                            .collect();
                        let next = match (out.is_truncated(), out.next_continuation_token()) {
                            (Some(true), Some(t)) => Some(Some(t.to_string())),
                            _ => None,
                        };
                        Some((Ok(futures::stream::iter(items)), next))
                    }
                }
            }
        })
        .try_flatten()
        .boxed()
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        for batch in keys.chunks(MAX_DELETE_BATCH) {
            let mut ids = Vec::with_capacity(batch.len());
            for k in batch {
                let full = self.full_key("delete", k)?;
                ids.push(
                    ObjectIdentifier::builder()
                        .key(full)
                        .build()
                        .map_err(|e| StorageError::permanent("delete", k, e))?,
                );
            }
            let first = batch.first().map(String::as_str).unwrap_or("");
            let del = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StorageError::permanent("delete", first, e))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(del)
                .send()
                .await
                .map_err(|e| self.map_err("delete", first, e))?;
            if let Some(err) = out.errors().iter().find(|e| e.code() != Some("NoSuchKey")) {
                let k = err.key().map(|k| self.strip(k)).unwrap_or_default();
                return Err(StorageError::transient("delete", &k, err.message().unwrap_or("delete failed")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_storage_class;

    #[test]
    fn storage_classes_that_need_a_restore_request_are_refused() {
        assert_eq!(parse_storage_class("standard_ia").unwrap(), "STANDARD_IA");
        assert_eq!(parse_storage_class("GLACIER_IR").unwrap(), "GLACIER_IR");
        for refused in ["GLACIER", "deep_archive"] {
            let e = format!("{:#}", parse_storage_class(refused).unwrap_err());
            assert!(e.contains("restore request") && e.contains("HINT"), "{e}");
        }
        assert!(format!("{:#}", parse_storage_class("COLD").unwrap_err()).contains("unknown storage class"));
    }
}
