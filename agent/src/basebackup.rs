//! Base backups over the replication protocol, streamed into the archive with bounded memory.
//!
//! 1. `BASE_BACKUP (LABEL, PROGRESS, CHECKPOINT fast|spread, MANIFEST 'yes',
//!    MANIFEST_CHECKSUMS 'CRC32C', TARGET 'client')` on its own replication connection: no file
//!    access to PGDATA is needed, and no WAL is included (the archive already has it).
//! 2. Each tar archive is cut into parts of `part_size` plain bytes (default 16 MiB). The bytes
//!    go, as they arrive, to a compressor thread (a streaming zstd encoder per part: receiving
//!    and compressing use both cores), so only compressed bytes are held; each finished part is
//!    checksummed and written once as `backups/<id>/part-NNNNNN`, at most `concurrency` at once.
//!    Memory: the part being compressed, one finished part waiting, and `concurrency` uploading
//!    (each with its envelope copy), all compressed: about 6 compressed parts, whatever the
//!    database size. When the store is slower than the server, the stream waits.
//! 3. The server's `backup_manifest` is stored beside the parts.
//! 4. The backup becomes visible as complete only when `backup.json` is written, and that
//!    happens only once the archive holds the WAL from the start LSN to the stop LSN (streamed
//!    by `walvault-agent run`, which must be running). An interrupted backup leaves parts and a
//!    `backup.lock` naming its host and PID; the next backup (or `expire`) removes it once that
//!    process is gone.
//!
//! Incremental backups (`--incremental`, PostgreSQL 17+ with `summarize_wal = on`): the parent
//! is the newest complete backup in the archive; its `backup_manifest` (read back from the
//! archive and checked against the SHA-256 its description records, or, when the archive is
//! encrypted and the agent cannot read it, the copy kept in `--state-dir`) is given to the
//! server with `UPLOAD_MANIFEST`, then `BASE_BACKUP (INCREMENTAL, …)` sends only changed blocks
//! of relation files. The description records `parent`, `incremental_from` (the parent's start
//! LSN) and `chain_depth`. A full backup is taken instead when the archive has none yet, or
//! when the chain's full backup is older than `--full-every`. An incremental that cannot be
//! taken (server older than 17, `summarize_wal` off, no usable parent manifest) is refused
//! with a hint, unless `--fallback-full` asks for a full backup then.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use walvault_shared::archive::backup::{self, ArchiveInfo, BackupDescription, BackupEntry, BackupLock, PartInfo};
use walvault_shared::archive::envelope::{self, Compression, ObjectKind};
use walvault_shared::archive::identity::{self, Identity};
use walvault_shared::archive::names;
use walvault_shared::archive::read::{Reader, Want};
use walvault_shared::archive::write::{PutOnceError, Writer};
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::storage::retry::RetryPolicy;
use walvault_shared::storage::{PutMode, StorageError};

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
    /// Take incremental backups (PostgreSQL 17+).
    pub incremental: bool,
    /// With `incremental`: a full backup when the chain's full backup finished this long ago.
    pub full_every: Option<Duration>,
    /// With `incremental`: take a full backup when an incremental cannot be taken.
    pub fallback_full: bool,
    /// Where copies of the manifests of the backups taken here are kept (needed for
    /// incrementals on an encrypted archive, whose manifests the agent cannot read back).
    pub state_dir: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            part_size: 16 << 20,
            concurrency: 2,
            zstd_level: 3,
            fast_checkpoint: true,
            wal_wait: Duration::from_secs(300),
            incremental: false,
            full_every: None,
            fallback_full: false,
            state_dir: None,
        }
    }
}

fn hostname() -> String {
    walvault_shared::archive::lease::this_host()
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Remove incomplete backups whose writer is gone (same host, dead PID; another host: older
/// than a day; no lock: older than an hour). Returns the ids removed.
pub async fn remove_abandoned(reader: &Reader, segment_size: u64) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let me = hostname();
    for e in backup::list(reader, segment_size).await? {
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
            backup::delete_backup(&**reader.store(), &id).await?;
            removed.push(id);
        }
    }
    Ok(removed)
}

/// A part compressed by the compressor thread: one zstd frame and its plain length and crc32.
struct CompressedPart {
    archive_ix: usize,
    n: u32,
    payload: Vec<u8>,
    plain_len: u64,
    plain_crc: u32,
}

async fn upload_part(writer: Writer, id: String, part: CompressedPart) -> Result<PartInfo> {
    let key = names::backup_part(&id, part.n);
    let meta = serde_json::json!({ "backup": id, "part": part.n });
    let (plain_len, plain_crc) = (part.plain_len, part.plain_crc);
    let object: Bytes = tokio::task::spawn_blocking({
        let (writer, key) = (writer.clone(), key.clone());
        move || {
            let meta = serde_json::to_vec(&meta).expect("metadata serialises");
            writer.encode_raw(
                &key,
                ObjectKind::BackupPart,
                &meta,
                plain_len,
                plain_crc,
                Compression::Zstd,
                &part.payload,
            )
        }
    })
    .await?;
    let stored_len = object.len() as u64;
    RetryPolicy::attempts(10)
        .run(&format!("upload {key}"), || {
            let (writer, key, object) = (writer.clone(), key.clone(), object.clone());
            async move {
                writer.put_once_by_checksum(&key, object, plain_len, plain_crc).await.map(|_| ()).map_err(|e| match e {
                    PutOnceError::Storage(s) => s,
                    other => StorageError::permanent("put", &key, other),
                })
            }
        })
        .await?;
    Ok(PartInfo { n: part.n, plain_len, stored_len, crc32: plain_crc })
}

/// What the receive loop gives the compressor thread.
enum ToCompressor {
    Data(Bytes),
    /// The current part ends here.
    Cut {
        archive_ix: usize,
        n: u32,
    },
}

/// The compressor thread: a streaming zstd encoder per part, fed as the tar stream arrives, so
/// that only compressed bytes are held; finished parts go to `out` (bounded: when uploads lag,
/// compression and then the receive loop wait, and the server's stream with them).
fn compressor(
    level: i32,
    mut rx: tokio::sync::mpsc::Receiver<ToCompressor>,
    out: tokio::sync::mpsc::Sender<CompressedPart>,
) -> Result<()> {
    use std::io::Write;
    let new_encoder = || zstd::stream::write::Encoder::new(Vec::new(), level).context("zstd encoder");
    let mut enc = new_encoder()?;
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    while let Some(m) = rx.blocking_recv() {
        match m {
            ToCompressor::Data(d) => {
                enc.write_all(&d).context("compress")?;
                crc.update(&d);
                len += d.len() as u64;
            }
            ToCompressor::Cut { archive_ix, n } => {
                let payload = std::mem::replace(&mut enc, new_encoder()?).finish().context("compress")?;
                let part = CompressedPart {
                    archive_ix,
                    n,
                    payload,
                    plain_len: std::mem::take(&mut len),
                    plain_crc: std::mem::take(&mut crc).finalize(),
                };
                if out.blocking_send(part).is_err() {
                    return Ok(()); // the uploads stopped; their error is reported
                }
            }
        }
    }
    Ok(())
}

/// The server a backup is taken from.
struct Source {
    conn: Connection,
    system_identifier: u64,
    segment_size: u64,
    version: u32,
    block_size: u32,
    relseg_blocks: u32,
}

/// Connect for the backup and check the server against the archive's identity.
async fn connect(params: &ConnParams, writer: &Writer) -> Result<Source> {
    let mut conn = Connection::connect(params).await?;
    let system = conn.identify_system().await?;
    let segment_size = conn.wal_segment_size().await?;
    let version = conn.server_version_num().await?;
    crate::stream::check_supported(version)?;
    identity::ensure(writer, &Identity::new(system.system_identifier, version / 10000, segment_size)).await?;
    writer.ensure_epoch().await?;
    let block_size: u32 = conn.show("block_size").await?.parse().context("SHOW block_size")?;
    // SHOW segment_size gives bytes with a unit ("1GB"): RELSEG_SIZE × BLCKSZ.
    let relseg_bytes =
        crate::replication::parse_size(&conn.show("segment_size").await?).context("SHOW segment_size")?;
    let relseg_blocks = (relseg_bytes / block_size.max(1) as u64) as u32;
    Ok(Source { conn, system_identifier: system.system_identifier, segment_size, version, block_size, relseg_blocks })
}

/// The parent of an incremental backup: its description and its manifest, byte for byte.
struct Parent {
    desc: BackupDescription,
    manifest: Bytes,
}

/// Why an incremental backup cannot be taken: refused, or (with `--fallback-full`) a full one.
fn cannot_incremental(cfg: &BackupConfig, why: String) -> Result<Option<Parent>> {
    if cfg.fallback_full {
        tracing::warn!(
            "taking a full backup instead of an incremental one (--fallback-full): {}",
            why.lines().next().unwrap_or("")
        );
        return Ok(None);
    }
    bail!(
        "{why}{}",
        if why.contains("HINT") {
            ", or add --fallback-full to take a full backup then"
        } else {
            "\nHINT: add --fallback-full to take a full backup when an incremental one cannot be taken"
        }
    )
}

/// The state directory's copy of a backup's manifest.
fn cached_manifest_path(dir: &std::path::Path, id: &str) -> PathBuf {
    dir.join("manifests").join(format!("{id}.backup_manifest"))
}

/// Keep a copy of a new backup's manifest in the state directory (mode 0600), and drop the
/// copies of backups the archive no longer holds.
fn cache_manifest(dir: &std::path::Path, id: &str, manifest: &[u8], keep: &[String]) -> Result<()> {
    let mdir = dir.join("manifests");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&mdir)
            .with_context(|| format!("create {}", mdir.display()))?;
    }
    walvault_shared::fsutil::write_atomically(&cached_manifest_path(dir, id), manifest, 0o600)?;
    for e in std::fs::read_dir(&mdir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(other) = name.strip_suffix(".backup_manifest") {
            if other != id && !keep.iter().any(|k| k == other) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Decide what an `--incremental` backup is incremental to (`None`: take a full one).
async fn choose_parent(
    src: &mut Source,
    reader: &Reader,
    writer: &Writer,
    cfg: &BackupConfig,
) -> Result<Option<Parent>> {
    if src.version < 170000 {
        return cannot_incremental(cfg, format!(
            "incremental backups need PostgreSQL 17 or later; this server is PostgreSQL {}\nHINT: drop --incremental (full backups work on every supported major)",
            crate::stream::version_text(src.version)
        ));
    }
    let summarize = src.conn.show("summarize_wal").await?;
    if summarize != "on" {
        return cannot_incremental(cfg, format!(
            "incremental backups need summarize_wal = on, and this server has summarize_wal = {summarize}\nHINT: ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf(); then take a full backup (incrementals build on backups taken while WAL is summarized)"
        ));
    }
    let backups = backup::complete(reader, src.segment_size).await?;
    let Some(newest) = backups.iter().max_by_key(|b| (b.stop_lsn, b.id.clone())).cloned() else {
        tracing::info!("the archive has no complete backup yet: taking a full backup to start the chain");
        return Ok(None);
    };
    if let Some(every) = cfg.full_every {
        let full = backup::chain(&backups, &newest.id).ok().and_then(|c| c.first().map(|f| (*f).clone()));
        match full {
            Some(f)
                if walvault_shared::time::now() - f.stop_time
                    < chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX) => {}
            Some(f) => {
                tracing::info!(full = %f.id, "the chain's full backup is older than --full-every ({}): taking a full backup", humantime::format_duration(every));
                return Ok(None);
            }
            None => {
                tracing::warn!(backup = %newest.id, "the newest backup's chain is incomplete: taking a full backup");
                return Ok(None);
            }
        }
    }
    // Read the parent back through the agent's own signature check when it signs.
    let verify = writer.signer().map(|k| walvault_shared::archive::sign::VerifyKeys(vec![k.verify_key()]));
    let checked = Reader::new(writer.store().clone(), verify);
    let desc = match backup::read_description(&checked, &newest.id).await {
        Ok(d) => d,
        Err(e) => {
            return cannot_incremental(cfg, format!(
                "backup {} cannot be the parent of an incremental backup: {e:#}\nHINT: take a full backup (drop --incremental)",
                newest.id
            ))
        }
    };
    let manifest: Result<Bytes> = if writer.encrypts() {
        match &cfg.state_dir {
            Some(dir) => {
                let p = cached_manifest_path(dir, &desc.id);
                std::fs::read(&p).map(Bytes::from).with_context(|| format!("read {}", p.display()))
            }
            None => Err(anyhow::anyhow!("the archive is encrypted, so the agent cannot read the manifest back from it, and no --state-dir keeps a copy")),
        }
    } else {
        checked
            .read(&names::backup_manifest(&desc.id), Want::manifest(desc.manifest_bytes))
            .await
            .map(|d| Bytes::from(d.content))
    };
    let manifest = match manifest {
        Ok(m) if desc.manifest_sha256.as_deref().is_none_or(|h| h == backup::manifest_sha256(&m)) => m,
        Ok(_) => {
            return cannot_incremental(cfg, format!(
                "the manifest of backup {} differs from the one its description records (SHA-256)\nHINT: take a full backup (drop --incremental)",
                desc.id
            ))
        }
        Err(e) => {
            return cannot_incremental(cfg, format!(
                "cannot read the manifest of backup {}, the parent of this incremental backup: {e:#}\nHINT: with an encrypted archive, give the agent a --state-dir (it keeps copies of the manifests of the backups it takes there) and take a full backup",
                desc.id
            ))
        }
    };
    Ok(Some(Parent { desc, manifest }))
}

/// A server error of an incremental backup, with what to do about it.
fn explain_incremental_error(e: anyhow::Error, parent: &BackupDescription) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("WAL summar") {
        e.context(format!(
            "the server cannot take a backup incremental to {} (started at {})\nHINT: the WAL summaries since that backup are missing: it was taken before summarize_wal was on, or they expired (wal_summary_keep_time); take a full backup",
            parent.id, parent.start_lsn
        ))
    } else {
        e.context(format!("incremental backup on top of {}", parent.id))
    }
}

/// A fresh backup id (one per second; never an existing one), claimed with a lock object.
async fn claim_id(writer: &Writer) -> Result<(String, chrono::DateTime<chrono::Utc>)> {
    let store = writer.store();
    let mut started = walvault_shared::time::now();
    let mut id = names::backup_id(started);
    while !store.list_all(&names::backup_dir(&id)).await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        started = walvault_shared::time::now();
        id = names::backup_id(started);
    }
    let lock = BackupLock { host: hostname(), pid: std::process::id(), started_at: started };
    let key = names::backup_lock(&id);
    store.put(&key, writer.encode_metadata(&key, &lock), PutMode::IfAbsent).await?;
    Ok((id, started))
}

/// What the server sent: the tar archives (as stored parts), the manifest, the end position.
struct Streamed {
    archives: Vec<ArchiveInfo>,
    manifest: Bytes,
    stop_lsn: Lsn,
    stop_timeline: TimelineId,
    stopped: chrono::DateTime<chrono::Utc>,
}

/// Upload compressed parts as they come, at most `limit` at once.
async fn upload_parts(
    writer: Writer,
    id: String,
    limit: usize,
    mut parts: tokio::sync::mpsc::Receiver<CompressedPart>,
) -> Result<Vec<(usize, PartInfo)>> {
    let mut in_flight = FuturesUnordered::new();
    let mut done = Vec::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            Some(r) = in_flight.next(), if !in_flight.is_empty() => {
                let r: Result<Result<(usize, PartInfo)>, tokio::task::JoinError> = r;
                done.push(r??);
            }
            p = parts.recv(), if open && in_flight.len() < limit.max(1) => match p {
                Some(p) => {
                    let (writer, id, ix) = (writer.clone(), id.clone(), p.archive_ix);
                    in_flight.push(tokio::spawn(async move { upload_part(writer, id, p).await.map(|i| (ix, i)) }));
                }
                None => open = false,
            },
        }
    }
    done.sort_by_key(|(_, p)| p.n);
    Ok(done)
}

/// Read the BASE_BACKUP stream to its end, cutting each tar archive into parts of `part_size`
/// plain bytes, compressed on a thread of their own as they arrive and uploaded
/// `concurrency` at once.
async fn stream_parts(conn: &mut Connection, writer: &Writer, id: &str, cfg: &BackupConfig) -> Result<Streamed> {
    let (to_comp, comp_rx) = tokio::sync::mpsc::channel::<ToCompressor>(16);
    let (part_tx, part_rx) = tokio::sync::mpsc::channel::<CompressedPart>(1);
    let level = cfg.zstd_level;
    let comp = std::thread::Builder::new()
        .name("backup-compress".into())
        .spawn(move || compressor(level, comp_rx, part_tx))
        .context("start the compressor thread")?;
    let uploads = tokio::spawn(upload_parts(writer.clone(), id.to_string(), cfg.concurrency, part_rx));
    let received = receive_parts(conn, id, cfg, &to_comp).await;
    drop(to_comp);
    let comp_result = tokio::task::spawn_blocking(move || comp.join()).await?;
    // An upload failure stops the compressor and then the receive loop: report the cause.
    let uploaded = uploads.await??;
    let (mut streamed, _) = received?;
    comp_result.map_err(|_| anyhow::anyhow!("the compressor thread panicked"))??;
    for (ix, p) in uploaded {
        streamed.archives[ix].parts.push(p);
    }
    Ok(streamed)
}

/// The receive loop of [`stream_parts`]: tar bytes to the compressor, cut every `part_size`.
async fn receive_parts(
    conn: &mut Connection,
    id: &str,
    cfg: &BackupConfig,
    to_comp: &tokio::sync::mpsc::Sender<ToCompressor>,
) -> Result<(Streamed, u32)> {
    let mut archives: Vec<ArchiveInfo> = Vec::new();
    let mut manifest = BytesMut::new();
    let mut in_manifest = false;
    let mut next_part = 0u32;
    let mut in_part = 0usize;
    let mut last_progress = Instant::now();
    let gone = || anyhow::anyhow!("the backup's compressor stopped");
    loop {
        let ev = conn.base_backup_next().await?;
        let cut_here = matches!(ev, BackupEvent::Archive { .. } | BackupEvent::Manifest | BackupEvent::End { .. });
        if cut_here && in_part > 0 {
            to_comp
                .send(ToCompressor::Cut { archive_ix: archives.len() - 1, n: next_part })
                .await
                .map_err(|_| gone())?;
            next_part += 1;
            in_part = 0;
        }
        match ev {
            BackupEvent::Archive { name, location } => {
                archives.push(ArchiveInfo { name, location, parts: Vec::new(), raw_bytes: 0 });
            }
            BackupEvent::Data(d) if in_manifest => manifest.extend_from_slice(&d),
            BackupEvent::Data(d) => {
                let a = archives.last_mut().context("BASE_BACKUP sent data before naming an archive")?;
                a.raw_bytes += d.len() as u64;
                let mut d = d;
                while !d.is_empty() {
                    let take = d.len().min(cfg.part_size - in_part);
                    let piece = d.split_to(take);
                    in_part += piece.len();
                    to_comp.send(ToCompressor::Data(piece)).await.map_err(|_| gone())?;
                    if in_part >= cfg.part_size {
                        let archive_ix = archives.len() - 1;
                        to_comp.send(ToCompressor::Cut { archive_ix, n: next_part }).await.map_err(|_| gone())?;
                        next_part += 1;
                        in_part = 0;
                    }
                }
            }
            BackupEvent::Progress(done) => {
                if last_progress.elapsed() > Duration::from_secs(10) {
                    tracing::info!(backup = %id, sent_mib = done >> 20, "base backup in progress");
                    last_progress = Instant::now();
                }
            }
            BackupEvent::Manifest => in_manifest = true,
            BackupEvent::End { lsn, timeline } => {
                let streamed = Streamed {
                    archives,
                    manifest: manifest.freeze(),
                    stop_lsn: lsn,
                    stop_timeline: timeline,
                    stopped: walvault_shared::time::now(),
                };
                return Ok((streamed, next_part));
            }
        }
    }
}

/// Wait until the archive holds WAL `[start, stop)` on `timeline` (streamed by `run`).
async fn wait_for_wal(
    reader: &Reader,
    seg: u64,
    timeline: TimelineId,
    start: Lsn,
    stop: Lsn,
    wait: Duration,
    id: &str,
) -> Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        let listing = reader.wal_listing(seg).await?;
        if listing.catalog.pieces_for(timeline, start, stop).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the archive does not hold the WAL from {start} to {stop} (timeline {timeline}) after {wait:?}; backup {id} is left incomplete\nHINT: walvault-agent run must be streaming this cluster into the same archive"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Take one base backup now; returns its description once it is complete.
pub async fn take_backup(params: &ConnParams, writer: &Writer, cfg: &BackupConfig) -> Result<BackupDescription> {
    let t0 = Instant::now();
    let mut src = connect(params, writer).await?;
    let reader = Reader::new(writer.store().clone(), None);
    remove_abandoned(&reader, src.segment_size).await?;
    let parent = if cfg.incremental { choose_parent(&mut src, &reader, writer, cfg).await? } else { None };
    if let Some(p) = &parent {
        src.conn.upload_manifest(&p.manifest).await.map_err(|e| explain_incremental_error(e, &p.desc))?;
    }
    let (id, started) = claim_id(writer).await?;
    let label = format!("walvault {id}");
    let begun = src.conn.base_backup_start(&label, cfg.fast_checkpoint, parent.is_some()).await;
    let (start_lsn, timeline, tablespaces) = match begun {
        Ok(b) => b,
        Err(e) => {
            // Nothing was stored but the lock.
            let _ = writer.store().delete(&[names::backup_lock(&id)]).await;
            return Err(match &parent {
                Some(p) => explain_incremental_error(e, &p.desc),
                None => e,
            });
        }
    };
    let estimate: u64 = tablespaces.iter().filter_map(|t| t.size).sum();
    let extra: Vec<String> =
        tablespaces.iter().filter_map(|t| Some(format!("{} at {}", t.oid?, t.location.as_deref()?))).collect();
    match &parent {
        Some(p) => {
            tracing::info!(backup = %id, %start_lsn, timeline = timeline.0, parent = %p.desc.id, depth = p.desc.chain_depth + 1, tablespaces = ?extra, "incremental base backup started")
        }
        None => {
            tracing::info!(backup = %id, %start_lsn, timeline = timeline.0, estimated_mib = estimate >> 20, tablespaces = ?extra, "base backup started")
        }
    }
    let streamed = stream_parts(&mut src.conn, writer, &id, cfg).await?;
    drop(src.conn);
    let mkey = names::backup_manifest(&id);
    let mobj = writer.encode(
        &mkey,
        ObjectKind::Metadata,
        &serde_json::json!({"backup": id}),
        &streamed.manifest,
        Compression::Zstd,
        3,
    );
    writer.put_once(&mkey, mobj, &streamed.manifest).await?;
    if let Some(dir) = &cfg.state_dir {
        let keep: Vec<String> = backup::complete(&reader, src.segment_size).await?.into_iter().map(|b| b.id).collect();
        cache_manifest(dir, &id, &streamed.manifest, &keep)
            .with_context(|| format!("keep a copy of the manifest in --state-dir {}", dir.display()))?;
    }
    tracing::info!(backup = %id, stop_lsn = %streamed.stop_lsn, "base backup data stored; waiting for its WAL to be archived");
    wait_for_wal(&reader, src.segment_size, timeline, start_lsn, streamed.stop_lsn, cfg.wal_wait, &id).await?;
    let raw_bytes = streamed.archives.iter().map(|a| a.raw_bytes).sum();
    let stored_bytes: u64 = streamed.archives.iter().flat_map(|a| &a.parts).map(|p| p.stored_len).sum();
    let desc = BackupDescription {
        format_version: envelope::FORMAT_VERSION,
        id: id.clone(),
        label,
        start_lsn,
        stop_lsn: streamed.stop_lsn,
        timeline,
        stop_timeline: streamed.stop_timeline,
        start_time: started,
        stop_time: streamed.stopped,
        pg_version_num: src.version,
        system_identifier: src.system_identifier.to_string(),
        wal_segment_size: src.segment_size,
        archives: streamed.archives,
        manifest_bytes: streamed.manifest.len() as u64,
        raw_bytes,
        stored_bytes,
        duration_seconds: t0.elapsed().as_secs_f64(),
        parent: parent.as_ref().map(|p| p.desc.id.clone()),
        incremental_from: parent.as_ref().map(|p| p.desc.start_lsn),
        chain_depth: parent.as_ref().map(|p| p.desc.chain_depth + 1).unwrap_or(0),
        manifest_sha256: Some(backup::manifest_sha256(&streamed.manifest)),
        block_size: Some(src.block_size),
        relseg_blocks: Some(src.relseg_blocks),
    };
    let dkey = names::backup_description(&id);
    writer.store().put(&dkey, writer.encode_metadata(&dkey, &desc), PutMode::IfAbsent).await?;
    writer.store().delete(&[names::backup_lock(&id)]).await?;
    tracing::info!(
        backup = %id,
        kind = desc.kind(),
        raw_mib = raw_bytes >> 20,
        stored_mib = stored_bytes >> 20,
        seconds = format!("{:.1}", desc.duration_seconds),
        "base backup complete"
    );
    Ok(desc)
}
