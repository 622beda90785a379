//! Base backups over the replication protocol, streamed into the archive with bounded memory.
//!
//! 1. `BASE_BACKUP (LABEL, PROGRESS, CHECKPOINT fast|spread, MANIFEST 'yes',
//!    MANIFEST_CHECKSUMS 'CRC32C', TARGET 'client')` on its own replication connection: no file
//!    access to PGDATA is needed, and no WAL is included (the archive already has it).
//! 2. Each tar archive is cut into parts of `part_size` plain bytes; each part is compressed
//!    (zstd), checksummed and written once as `backups/<id>/part-NNNNNN`, with at most
//!    `concurrency` parts compressing/uploading at once (on 2 cores, 2 parts compress in
//!    parallel: that is where multiple threads pay). Memory stays below
//!    `part_size × (concurrency + 1)` plus their compressed copies, whatever the database size.
//! 3. The server's `backup_manifest` is stored beside the parts.
//! 4. The backup becomes visible as complete only when `backup.json` is written, and that
//!    happens only once the archive holds the WAL from the start LSN to the stop LSN (streamed
//!    by `walvault-agent run`, which must be running). An interrupted backup leaves parts and a
//!    `backup.lock` naming its host and PID; the next backup (or `expire`) removes it once that
//!    process is gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use walvault_shared::archive::backup::{self, ArchiveInfo, BackupDescription, BackupEntry, BackupLock, PartInfo};
use walvault_shared::archive::envelope::{self, Compression, ObjectKind};
use walvault_shared::archive::identity::{self, Identity};
use walvault_shared::archive::walcat::WalCatalog;
use walvault_shared::archive::{names, put_once};
use walvault_shared::storage::retry::RetryPolicy;
use walvault_shared::storage::{ObjectStore, PutMode};

use crate::replication::conninfo::ConnParams;
use crate::replication::{BackupEvent, Connection};

#[derive(Clone, Debug)]
pub struct BackupConfig {
    pub part_size: usize,
    pub concurrency: usize,
    pub zstd_level: i32,
    pub fast_checkpoint: bool,
    /// How long to wait for the WAL up to the stop LSN to reach the archive.
    pub wal_wait: Duration,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            part_size: 64 << 20,
            concurrency: 2,
            zstd_level: 3,
            fast_checkpoint: true,
            wal_wait: Duration::from_secs(300),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Remove incomplete backups whose writer is gone (same host, dead PID; another host: older
/// than a day; no lock: older than an hour). Returns the ids removed.
pub async fn remove_abandoned(store: &dyn ObjectStore, segment_size: u64) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let me = hostname();
    for e in backup::list(store, segment_size).await? {
        let BackupEntry::Incomplete { id, lock, .. } = e else { continue };
        let age = chrono::NaiveDateTime::parse_from_str(&id, "%Y%m%dT%H%M%SZ")
            .map(|t| chrono::Utc::now().naive_utc() - t)
            .unwrap_or_default();
        let abandoned = match &lock {
            Some(l) if l.host == me => !pid_alive(l.pid) || l.pid == std::process::id(),
            Some(_) => age > chrono::Duration::days(1),
            None => age > chrono::Duration::hours(1),
        };
        if abandoned {
            tracing::info!(backup = %id, "removing the leftovers of an interrupted backup");
            backup::delete_backup(store, &id).await?;
            removed.push(id);
        }
    }
    Ok(removed)
}

struct PartJob {
    n: u32,
    data: Bytes,
}

async fn upload_part(store: Arc<dyn ObjectStore>, id: String, job: PartJob, level: i32) -> Result<PartInfo> {
    let key = names::backup_part(&id, job.n);
    let plain = job.data;
    let crc = crc32fast::hash(&plain);
    let p2 = plain.clone();
    let meta = serde_json::json!({ "backup": id, "part": job.n });
    let object: Bytes = tokio::task::spawn_blocking(move || {
        envelope::encode(ObjectKind::BackupPart, &meta, &p2, Compression::Zstd, level)
    })
    .await?
    .into();
    let stored_len = object.len() as u64;
    let policy = RetryPolicy { max_attempts: Some(10), ..Default::default() };
    policy
        .run(&format!("upload {key}"), || {
            let (store, key, object, plain) = (store.clone(), key.clone(), object.clone(), plain.clone());
            async move {
                put_once(&*store, &key, object, &plain).await.map(|_| ()).map_err(|e| match e {
                    walvault_shared::archive::PutOnceError::Storage(s) => s,
                    other => walvault_shared::storage::StorageError::permanent("put", &key, other),
                })
            }
        })
        .await?;
    Ok(PartInfo { n: job.n, plain_len: plain.len() as u64, stored_len, crc32: crc })
}

/// Take one base backup now; returns its description once it is complete.
pub async fn take_backup(
    params: &ConnParams,
    store: Arc<dyn ObjectStore>,
    cfg: &BackupConfig,
) -> Result<BackupDescription> {
    let t0 = Instant::now();
    let mut conn = Connection::connect(params).await?;
    let system = conn.identify_system().await?;
    let segment_size = conn.wal_segment_size().await?;
    let version = conn.server_version_num().await?;
    if version < 150000 {
        bail!("PostgreSQL {} is not supported: walvault needs PostgreSQL 15 or later", version / 10000);
    }
    identity::ensure(&*store, &Identity::new(system.system_identifier, version / 10000, segment_size)).await?;
    remove_abandoned(&*store, segment_size).await?;

    // A fresh id (one per second); never reuse an existing one.
    let mut started = chrono::Utc::now();
    let mut id = names::backup_id(started);
    while !store.list_all(&format!("{}{id}/", names::BACKUPS_PREFIX)).await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        started = chrono::Utc::now();
        id = names::backup_id(started);
    }
    let lock = BackupLock { host: hostname(), pid: std::process::id(), started_at: started.to_rfc3339() };
    store
        .put(
            &names::backup_lock(&id),
            envelope::encode(ObjectKind::Metadata, &lock, b"", Compression::None, 0).into(),
            PutMode::IfAbsent,
        )
        .await?;

    let label = format!("walvault {id}");
    let (start_lsn, timeline, tablespaces) = conn.base_backup_start(&label, cfg.fast_checkpoint).await?;
    let estimate: u64 = tablespaces.iter().filter_map(|t| t.size).sum();
    let extra: Vec<String> =
        tablespaces.iter().filter_map(|t| Some(format!("{} at {}", t.oid?, t.location.as_deref()?))).collect();
    tracing::info!(backup = %id, %start_lsn, timeline = timeline.0, estimated_mib = estimate >> 20, tablespaces = ?extra, "base backup started");

    let mut archives: Vec<ArchiveInfo> = Vec::new();
    let mut buf = BytesMut::new();
    let mut manifest = BytesMut::new();
    let mut in_manifest = false;
    let mut next_part = 0u32;
    let mut in_flight = FuturesUnordered::new();
    let mut parts_of: Vec<(usize, PartInfo)> = Vec::new();
    let mut last_progress = Instant::now();
    let flush_part = |buf: &mut BytesMut, next_part: &mut u32, archive_ix: usize| -> Option<(usize, PartJob)> {
        if buf.is_empty() {
            return None;
        }
        let job = PartJob { n: *next_part, data: buf.split().freeze() };
        *next_part += 1;
        Some((archive_ix, job))
    };
    let end = loop {
        let ev = conn.base_backup_next().await?;
        let mut ready: Option<(usize, PartJob)> = None;
        match ev {
            BackupEvent::Archive { name, location } => {
                if let Some(ix) = archives.len().checked_sub(1) {
                    ready = flush_part(&mut buf, &mut next_part, ix);
                }
                archives.push(ArchiveInfo { name, location, parts: Vec::new(), raw_bytes: 0 });
            }
            BackupEvent::Data(d) if in_manifest => manifest.extend_from_slice(&d),
            BackupEvent::Data(d) => {
                let a = archives.last_mut().context("BASE_BACKUP sent data before naming an archive")?;
                a.raw_bytes += d.len() as u64;
                buf.extend_from_slice(&d);
                if buf.len() >= cfg.part_size {
                    ready = flush_part(&mut buf, &mut next_part, archives.len() - 1);
                }
            }
            BackupEvent::Progress(done) => {
                if last_progress.elapsed() > Duration::from_secs(10) {
                    tracing::info!(backup = %id, sent_mib = done >> 20, "base backup in progress");
                    last_progress = Instant::now();
                }
            }
            BackupEvent::Manifest => {
                if let Some(ix) = archives.len().checked_sub(1) {
                    ready = flush_part(&mut buf, &mut next_part, ix);
                }
                in_manifest = true;
            }
            BackupEvent::End { lsn, timeline } => {
                if !in_manifest {
                    if let Some(ix) = archives.len().checked_sub(1) {
                        ready = flush_part(&mut buf, &mut next_part, ix);
                    }
                }
                if let Some((ix, job)) = ready.take() {
                    in_flight.push(tokio::spawn({
                        let (store, id) = (store.clone(), id.clone());
                        let level = cfg.zstd_level;
                        async move { upload_part(store, id, job, level).await.map(|p| (ix, p)) }
                    }));
                }
                break (lsn, timeline, chrono::Utc::now());
            }
        }
        if let Some((ix, job)) = ready {
            // Bounded memory: wait for a slot before taking more from the server.
            while in_flight.len() >= cfg.concurrency.max(1) {
                let (ix2, p) = in_flight.next().await.expect("non-empty")??;
                parts_of.push((ix2, p));
            }
            in_flight.push(tokio::spawn({
                let (store, id) = (store.clone(), id.clone());
                let level = cfg.zstd_level;
                async move { upload_part(store, id, job, level).await.map(|p| (ix, p)) }
            }));
        }
    };
    while let Some(r) = in_flight.next().await {
        let (ix, p) = r??;
        parts_of.push((ix, p));
    }
    drop(conn);
    parts_of.sort_by_key(|(_, p)| p.n);
    for (ix, p) in parts_of {
        archives[ix].parts.push(p);
    }
    let (stop_lsn, stop_timeline, stopped) = end;
    let manifest_bytes = manifest.len() as u64;
    let manifest = manifest.freeze();
    let mkey = names::backup_manifest(&id);
    let mobj =
        envelope::encode(ObjectKind::Metadata, &serde_json::json!({"backup": id}), &manifest, Compression::Zstd, 3);
    put_once(&*store, &mkey, mobj.into(), &manifest).await?;
    tracing::info!(backup = %id, %stop_lsn, "base backup data stored; waiting for its WAL to be archived");

    // The backup is usable only with WAL [start, stop) in the archive.
    let deadline = Instant::now() + cfg.wal_wait;
    loop {
        let cat = WalCatalog::load(&*store, segment_size).await?;
        if cat.pieces_for(timeline, start_lsn, stop_lsn).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the archive does not hold the WAL from {start_lsn} to {stop_lsn} (timeline {timeline}) after {:?}; backup {id} is left incomplete\nHINT: walvault-agent run must be streaming this cluster into the same archive",
                cfg.wal_wait
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let raw_bytes = archives.iter().map(|a| a.raw_bytes).sum();
    let stored_bytes: u64 = archives.iter().flat_map(|a| &a.parts).map(|p| p.stored_len).sum();
    let desc = BackupDescription {
        format_version: envelope::FORMAT_VERSION,
        id: id.clone(),
        label,
        start_lsn,
        stop_lsn,
        timeline,
        stop_timeline,
        start_time: started.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        stop_time: stopped.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        pg_version_num: version,
        system_identifier: system.system_identifier.to_string(),
        wal_segment_size: segment_size,
        archives,
        manifest_bytes,
        raw_bytes,
        stored_bytes,
        duration_seconds: t0.elapsed().as_secs_f64(),
    };
    store.put(&names::backup_description(&id), backup::encode_description(&desc).into(), PutMode::IfAbsent).await?;
    store.delete(&[names::backup_lock(&id)]).await?;
    tracing::info!(
        backup = %id,
        raw_mib = raw_bytes >> 20,
        stored_mib = stored_bytes >> 20,
        seconds = format!("{:.1}", desc.duration_seconds),
        "base backup complete"
    );
    Ok(desc)
}
