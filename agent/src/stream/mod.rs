//! `walvault-agent run`: WAL receiver → chunker → uploader → archived watermark → feedback.
//!
//! One *session* is one replication connection:
//! 1. connect, `IDENTIFY_SYSTEM`, read the segment size and major version, and check (or stamp)
//!    the repository identity: another cluster's archive is refused;
//! 2. make sure the physical slot exists (`RESERVE_WAL`) and read its restart LSN `R`;
//! 3. archive the server's timeline history files;
//! 4. list the archive once and find the frontier `F`: on the timeline that holds `R` (per the
//!    server's history), the end of the archive's contiguous WAL from the start of `R`'s
//!    segment. Stream from the start of `F`'s segment, as pg_receivewal does (the slot keeps
//!    that whole segment on the server): the bytes before `F` are read back from the archive
//!    and compared with what the server sends (a difference is split brain: two histories of
//!    the cluster meeting in one archive), and the segment can be written whole at its end;
//! 5. stream: every XLogData must start where the last ended (a gap is a hard error); the
//!    chunker seals chunks on time, size and segment end; the uploader makes them durable; the
//!    watermark is reported as flush and apply LSN (write LSN = received), at once when it
//!    moves, on every keepalive that asks, and every `status_interval`;
//! 6. at the end of a timeline (promotion upstream) archive the new history file and continue on
//!    the next timeline from the start of the switch point's segment, as pg_receivewal does.
//!
//! When a session fails (PostgreSQL restarted, network cut) the uploader first drains what was
//! received, then the agent reconnects with backoff and starts again at step 1; the archive is
//! the only state carried over. An archive that cannot be reached — at start or later — is
//! retried the same way (`/healthz` answers 503 and `walvault_up` is 0 meanwhile, with a log
//! line per attempt). What cannot heal stops the agent: split brain, another cluster's archive,
//! a missing bucket or refused access, a refused password, and a first connection to PostgreSQL
//! that fails (a misconfiguration should fail fast, not retry in silence).
//!
//! Shutdown (the token is cancelled at SIGTERM): the open chunk is sealed and the uploader gets
//! `shutdown_timeout` to make everything received durable; if the archive is down past that,
//! the uploader is cancelled and [`run`] fails, saying how much WAL stays in the slot.
//!
//! Memory bound: chunks are compressed as WAL arrives ([`chunker`]), so what is held is
//! compressed: the open chunk's frames (at most `chunk_max_bytes` of WAL) + `(queue_depth +
//! concurrency)` sealed chunks waiting or uploading + the frames of the segment being filled +
//! one compressed segment per consolidation in flight. With the defaults (4 MiB chunks, depth 4,
//! concurrency 4, 16 MiB segments): at most about 4 + 8 × 4 + 2 × 16 ≈ 70 MiB for incompressible
//! WAL, a fifth of that for ordinary WAL, whatever the rate (measured peak RSS 29–41 MiB at
//! 100 MB/s of WAL); when the archive is slower than WAL, the receiver stops reading and
//! PostgreSQL (through the slot) holds the rest.

pub mod chunker;
pub mod uploader;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use walvault_shared::archive::envelope::{self as env, ObjectKind as Kind};
use walvault_shared::archive::envelope::{Compression, ObjectKind};
use walvault_shared::archive::identity::{self, Identity};
use walvault_shared::archive::names;
use walvault_shared::archive::read::{Reader, WalListing};
use walvault_shared::archive::walcat::WalCatalog;
use walvault_shared::archive::walcat::{ChunkRecord, WalObjectMeta};
use walvault_shared::archive::write::{PutOnceError, Writer};
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::storage::retry::RetryPolicy;
use walvault_shared::storage::StorageError;
use walvault_shared::wal::TimelineHistory;

use crate::metrics::Metrics;
use crate::replication::conninfo::ConnParams;
use crate::replication::{Connection, PgError, ReplicationMessage, SlotInfo};
use chunker::{ArchivedPiece, Chunker, Job};
use uploader::{UploadConfig, UploadStop, Uploader};

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub slot: String,
    pub create_slot: bool,
    pub chunk_interval: Duration,
    pub chunk_max_bytes: usize,
    pub queue_depth: usize,
    pub upload_concurrency: usize,
    pub upload_timeout: Duration,
    pub status_interval: Duration,
    pub shutdown_timeout: Duration,
    pub zstd_level: i32,
    pub reconnect_max_delay: Duration,
    /// Synchronous mode: seal as soon as nothing more is waiting in the socket and fewer than
    /// `upload_concurrency` chunks are on their way (group commit), read without coalescing.
    pub synchronous: bool,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            slot: "walvault".into(),
            create_slot: true,
            chunk_interval: Duration::from_secs(1),
            chunk_max_bytes: 4 << 20,
            queue_depth: 4,
            upload_concurrency: 4,
            upload_timeout: Duration::from_secs(60),
            status_interval: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            zstd_level: 1,
            reconnect_max_delay: Duration::from_secs(30),
            synchronous: false,
        }
    }
}

/// An error after which reconnecting cannot help.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct Fatal(pub anyhow::Error);

/// The archive could not be reached (or answered with an error that may heal): retried.
#[derive(Debug, thiserror::Error)]
#[error("archive unreachable: {0:#}")]
pub struct ArchiveDown(pub anyhow::Error);

fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<Fatal>().is_some()
            || matches!(c.downcast_ref::<UploadStop>(), Some(UploadStop::Fatal(_)))
            || c.downcast_ref::<PgError>().is_some_and(PgError::is_auth_failure)
    })
}

fn is_archive_outage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<ArchiveDown>().is_some())
}

/// Classify an error from an archive operation: what cannot heal (another cluster's archive,
/// split brain, a missing bucket, refused access, a key the store rejects) is [`Fatal`];
/// everything else is an [`ArchiveDown`] outage, retried.
fn archive_err(e: anyhow::Error) -> anyhow::Error {
    let permanent = e.chain().any(|c| {
        c.downcast_ref::<identity::Mismatch>().is_some()
            || matches!(c.downcast_ref::<PutOnceError>(), Some(PutOnceError::SplitBrain { .. }))
            || matches!(c.downcast_ref::<StorageError>(), Some(StorageError::Permanent { .. }))
    });
    if permanent {
        anyhow::Error::new(Fatal(e))
    } else {
        anyhow::Error::new(ArchiveDown(e))
    }
}

/// The PostgreSQL majors walvault supports, or why not (`READ_REPLICATION_SLOT` is 15+).
pub fn check_supported(version_num: u32) -> Result<()> {
    if version_num < 150000 {
        return Err(Fatal(anyhow!(
            "PostgreSQL {} is not supported: walvault needs PostgreSQL 15 or later (READ_REPLICATION_SLOT)\nHINT: upgrade the server, or keep using your current backup tool for it",
            version_text(version_num)
        ))
        .into());
    }
    Ok(())
}

/// `server_version_num` as PostgreSQL writes the version: `14.23`, `9.6.24`.
pub fn version_text(v: u32) -> String {
    if v >= 100000 {
        format!("{}.{}", v / 10000, v % 10000)
    } else {
        format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
    }
}

/// Stream until `shutdown` is cancelled. Reconnects on failure; returns an error only for
/// fatal failures, a first connection to PostgreSQL that cannot be made, or a shutdown that
/// could not archive everything received within its deadline.
pub async fn run(
    params: ConnParams,
    writer: Writer,
    cfg: StreamConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let backoff = RetryPolicy { initial: Duration::from_millis(500), max: cfg.reconnect_max_delay, max_attempts: None };
    let mut attempt = 0u32;
    let mut ever_streamed = false;
    loop {
        metrics.set_state("connecting");
        let r = session(&params, &writer, &cfg, &metrics, &shutdown, &mut ever_streamed).await;
        metrics.up.set(0);
        match r {
            Ok(()) => return Ok(()),
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) if !ever_streamed && !is_archive_outage(&e) => return Err(e),
            Err(e) => {
                attempt += 1;
                metrics.reconnects.inc();
                metrics.set_error(format!("{e:#}"));
                metrics.set_state(format!("{e:#}"));
                let delay = backoff.delay(attempt).max(Duration::from_millis(250));
                tracing::warn!(
                    attempt,
                    "replication session ended: {e:#}; retrying in {delay:?} (WAL not yet archived stays in the slot)"
                );
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// With encryption: a new epoch key every `interval` (the previous one is forgotten), until
/// `cancel`. A key that cannot be written is retried; the current epoch stays in use meanwhile.
pub fn rotate_keys(writer: Writer, interval: Duration, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let r = RetryPolicy::forever()
                .retry("write a new epoch key", &cancel, |_: &anyhow::Error| true, |_| writer.new_epoch())
                .await;
            match r {
                Ok(epoch) => tracing::info!(epoch = %epoch, "encryption: rotated to a new key epoch"),
                Err(_) => return, // cancelled
            }
        }
    })
}

/// Server facts a session needs.
struct Server {
    system: crate::replication::SystemInfo,
    segment_size: u64,
    version: u32,
}

/// Connect, identify the server and check that walvault supports it.
async fn connect(params: &ConnParams) -> Result<(Connection, Server)> {
    let mut conn = Connection::connect(params).await?;
    tracing::info!(host = %conn.host, port = conn.port, "connected for replication");
    let system = conn.identify_system().await?;
    let segment_size = conn.wal_segment_size().await?;
    let version = conn.server_version_num().await?;
    check_supported(version)?;
    Ok((conn, Server { system, segment_size, version }))
}

/// The slot, created if allowed and missing.
async fn ensure_slot(conn: &mut Connection, cfg: &StreamConfig, metrics: &Metrics) -> Result<SlotInfo> {
    if cfg.create_slot && conn.create_physical_slot(&cfg.slot).await? {
        tracing::info!(slot = %cfg.slot, "created physical replication slot");
    }
    // A physical slot made with RESERVE_WAL always has a restart LSN, unless the server
    // invalidated it (max_slot_wal_keep_size exceeded, or removed WAL): the WAL it held is gone
    // from the server, and the archive will have a gap there, which list and audit report.
    // Recreate it and go on: stopping would only make the gap grow.
    if let Some(SlotInfo { restart_lsn: None, .. }) = conn.read_slot(&cfg.slot).await? {
        if !cfg.create_slot {
            return Err(Fatal(anyhow!(
                "replication slot {:?} was invalidated by the server (it kept more WAL than max_slot_wal_keep_size allows, or its WAL was removed)\nHINT: drop and recreate it (SELECT pg_drop_replication_slot('{}'); SELECT pg_create_physical_replication_slot('{}', true)), or let the agent do it (drop --no-create-slot); the archive will have a gap, which walvault-recover list and audit show",
                cfg.slot, cfg.slot, cfg.slot
            ))
            .into());
        }
        let msg = format!(
            "replication slot {:?} was invalidated by the server: WAL it held is lost to the archive (a gap, shown by walvault-recover list and audit); recreating the slot and archiving from the server's current position. Take a new base backup: restores cannot cross the gap",
            cfg.slot
        );
        tracing::error!("{msg}");
        metrics.set_error(msg);
        conn.drop_slot(&cfg.slot).await?;
        conn.create_physical_slot(&cfg.slot).await?;
    }
    conn.read_slot(&cfg.slot).await?.ok_or_else(|| {
        Fatal(anyhow!(
            "replication slot {:?} does not exist\nHINT: let the agent create it (drop --no-create-slot), or create it with \
             SELECT pg_create_physical_replication_slot('{}', true)",
            cfg.slot,
            cfg.slot
        ))
        .into()
    })
}

/// Where a session resumes: the timeline and LSN to stream from, the archived frontier, and
/// what the archive already holds of the first segment (to verify, and to build it whole).
struct Resume {
    timeline: TimelineId,
    start: Lsn,
    frontier: Lsn,
    /// The archived pieces of the segment before the frontier (to verify), and their records.
    prefix: Vec<ArchivedPiece>,
    records: Vec<ChunkRecord>,
}

/// List the archive, clean up chunks already consolidated, and find where to resume.
async fn plan_resume(writer: &Writer, server: &Server, history: &TimelineHistory, slot: &SlotInfo) -> Result<Resume> {
    let reader = Reader::new(writer.store().clone(), None);
    let listing = reader.wal_listing(server.segment_size).await?;
    let redundant = listing.catalog.redundant_chunks();
    if !redundant.is_empty() {
        tracing::info!("removing {} chunks already consolidated into segments", redundant.len());
        writer.store().delete(&redundant).await?;
    }
    let restart = slot.restart_lsn.unwrap_or(server.system.xlogpos);
    let (timeline, frontier) = choose_start(&listing.catalog, server, history, restart, slot.restart_timeline);
    let (start, prefix, records) = match archived_prefix(&reader, &listing, timeline, frontier).await? {
        Some((pieces, records)) => (frontier.segment_start(server.segment_size), pieces, records),
        None => (frontier, Vec::new(), Vec::new()),
    };
    tracing::info!(
        system_identifier = server.system.system_identifier,
        server_timeline = server.system.timeline.0,
        slot_restart_lsn = %restart,
        archived_up_to = %frontier,
        "starting replication at {start} on timeline {timeline}"
    );
    Ok(Resume { timeline, start, frontier, prefix, records })
}

async fn session(
    params: &ConnParams,
    writer: &Writer,
    cfg: &StreamConfig,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    ever_streamed: &mut bool,
) -> Result<()> {
    let (mut conn, server) = connect(params).await?;
    let ours = Identity::new(server.system.system_identifier, server.version / 10000, server.segment_size);
    identity::ensure(writer, &ours).await.context("check the archive's identity").map_err(archive_err)?;
    if let Some(epoch) = writer.ensure_epoch().await.context("write the first epoch key").map_err(archive_err)? {
        tracing::info!(epoch = %epoch, "encryption: started a key epoch");
    }
    metrics.system_identifier.set(server.system.system_identifier);
    metrics.segment_size.set(server.segment_size);
    let slot = ensure_slot(&mut conn, cfg, metrics).await?;
    let history = archive_histories(&mut conn, writer, server.system.timeline).await?;
    let resume = plan_resume(writer, &server, &history, &slot).await.map_err(archive_err)?;
    stream(conn, &server, resume, writer, cfg, metrics, shutdown, ever_streamed).await
}

/// The stream itself: the uploader task, the receive loop, and the drain at its end.
#[allow(clippy::too_many_arguments)]
async fn stream(
    mut conn: Connection,
    server: &Server,
    resume: Resume,
    writer: &Writer,
    cfg: &StreamConfig,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    ever_streamed: &mut bool,
) -> Result<()> {
    let seg = server.segment_size;
    let upload_cfg = UploadConfig {
        concurrency: cfg.upload_concurrency.max(1),
        upload_timeout: cfg.upload_timeout,
        segment_size: seg,
    };
    let Resume { timeline, start, frontier, prefix, records } = resume;
    let (watermark_tx, mut watermark_rx) = watch::channel(frontier);
    let (job_tx, job_rx) = mpsc::channel::<Job>(cfg.queue_depth.max(1));
    let upload_cancel = CancellationToken::new();
    let uploader =
        Uploader::new(writer.clone(), upload_cfg, watermark_tx, metrics.clone(), upload_cancel.clone(), records);
    let uploader = tokio::spawn(uploader.run(job_rx));
    metrics.archived_lsn.set(metrics.archived_lsn.get().max(frontier.0));
    let chunker = Chunker::new(timeline, start, seg, cfg.chunk_max_bytes, cfg.zstd_level, prefix, 0);
    conn.low_latency = cfg.synchronous;
    metrics.durable_seq.set(0);
    metrics.synchronous.set(cfg.synchronous as u64);
    conn.start_replication(&cfg.slot, start, timeline).await?;
    *ever_streamed = true;
    metrics.up.set(1);
    metrics.set_state("");
    metrics.timeline.set(timeline.0 as u64);
    metrics.set_received(frontier);
    let mut receive = Receive { conn, chunker, timeline, job_tx, jobs: Vec::new() };
    let result = receive.run(writer, cfg, metrics, shutdown, &mut watermark_rx).await;
    // Whatever ended the stream: make what was received durable before going on.
    let shutting_down = matches!(result, Ok(true));
    receive.chunker.seal(&mut receive.jobs);
    for j in receive.jobs.drain(..) {
        let _ = receive.job_tx.send(j).await;
    }
    drop(receive.job_tx);
    if shutting_down {
        tracing::info!("shutting down: archiving the WAL received so far (at most {:?})", cfg.shutdown_timeout);
    }
    let upload_result = drain(uploader, &upload_cancel, shutdown, cfg.shutdown_timeout).await;
    let w = *watermark_rx.borrow();
    let received = receive.chunker.position().max(w);
    if shutting_down && upload_result.is_ok() {
        let _ = receive.conn.send_status(received, w, w, false).await;
        tracing::info!(archived_lsn = %w, "all received WAL is archived; last feedback sent");
        receive.conn.close().await;
        sweep_redundant(writer, timeline, seg).await;
    }
    match upload_result {
        Err(UploadStop::Cancelled) => bail!(
            "stopped with WAL from {w} to {received} ({} bytes) received but not archived: the archive did not take it within the shutdown deadline\nHINT: it stays in the replication slot and is archived when the agent runs again",
            received.0.saturating_sub(w.0)
        ),
        Err(e) => return Err(e.into()),
        Ok(()) => {}
    }
    match result {
        Ok(true) => Ok(()),
        Ok(false) => bail!("uploader stopped"),
        Err(e) => Err(e),
    }
}

/// At a clean stop: delete chunks of this timeline whose segment is archived whole (left by a
/// listing that lagged when the segment was consolidated). Best effort; the next start does the
/// same over the whole archive.
async fn sweep_redundant(writer: &Writer, timeline: TimelineId, seg: u64) {
    match writer.store().list_all(&names::timeline_dir(timeline)).await {
        Ok(objects) => {
            let redundant = WalListing::new(objects, seg).catalog.redundant_chunks();
            if !redundant.is_empty() {
                tracing::info!("removing {} chunks already consolidated into segments", redundant.len());
                if let Err(e) = writer.store().delete(&redundant).await {
                    tracing::warn!("could not remove chunks already consolidated: {e} (the next start does)");
                }
            }
        }
        Err(e) => tracing::warn!("could not list {} to remove consolidated chunks: {e}", names::timeline_dir(timeline)),
    }
}

/// Wait for the uploader to finish; once `shutdown` is cancelled, for at most `deadline` more,
/// then cancel it.
async fn drain(
    mut uploader: tokio::task::JoinHandle<Result<(), UploadStop>>,
    cancel: &CancellationToken,
    shutdown: &CancellationToken,
    deadline: Duration,
) -> Result<(), UploadStop> {
    let joined = |r: Result<Result<(), UploadStop>, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| panic!("uploader task panicked: {e}"))
    };
    tokio::select! {
        r = &mut uploader => return joined(r),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(deadline, &mut uploader).await {
        Ok(r) => joined(r),
        Err(_) => {
            cancel.cancel();
            joined(uploader.await)
        }
    }
}

/// The receive side of a stream: the connection, the chunker, and jobs on their way to the
/// uploader.
struct Receive {
    conn: Connection,
    chunker: Chunker,
    timeline: TimelineId,
    job_tx: mpsc::Sender<Job>,
    jobs: Vec<Job>,
}

impl Receive {
    /// Receive until shutdown (`Ok(true)`), the uploader stops (`Ok(false)`) or an error.
    async fn run(
        &mut self,
        writer: &Writer,
        cfg: &StreamConfig,
        metrics: &Metrics,
        shutdown: &CancellationToken,
        watermark_rx: &mut watch::Receiver<Lsn>,
    ) -> Result<bool> {
        let mut status_tick = tokio::time::interval(cfg.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let seal_at = self.chunker.chunk_opened().map(|t| tokio::time::Instant::from_std(t + cfg.chunk_interval));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(true),
                _ = async { tokio::time::sleep_until(seal_at.expect("guarded")).await }, if seal_at.is_some() => {
                    self.chunker.seal(&mut self.jobs);
                }
                changed = watermark_rx.changed() => {
                    if changed.is_err() {
                        return Ok(false); // the uploader stopped: its error is reported by the caller
                    }
                    let w = *watermark_rx.borrow_and_update();
                    self.feedback(w).await?;
                }
                _ = status_tick.tick() => {
                    let w = *watermark_rx.borrow();
                    self.feedback(w).await?;
                }
                msg = self.conn.next_message() => self.on_message(msg?, writer, cfg, metrics, watermark_rx).await?,
            }
            if cfg.synchronous {
                self.seal_for_sync(cfg, metrics);
            }
            for j in self.jobs.drain(..) {
                self.job_tx.send(j).await.map_err(|_| anyhow!("uploader stopped"))?;
            }
        }
    }

    /// Synchronous mode's group commit: seal the open chunk once nothing more is waiting in
    /// the socket, unless `upload_concurrency` chunks are already on their way (then what
    /// arrives meanwhile goes in the next one, sealed when one of them is durable: every
    /// watermark move passes here).
    fn seal_for_sync(&mut self, cfg: &StreamConfig, metrics: &Metrics) {
        if self.chunker.chunk_opened().is_none() || self.conn.has_buffered_message() {
            return;
        }
        let outstanding = self.chunker.next_seq().saturating_sub(metrics.durable_seq.get());
        if outstanding < cfg.upload_concurrency.max(1) as u64 {
            self.chunker.seal(&mut self.jobs);
        }
    }

    /// Report `w` as flushed and applied; what was received as written.
    async fn feedback(&mut self, w: Lsn) -> Result<()> {
        self.conn.send_status(self.chunker.position().max(w), w, w, false).await
    }

    async fn on_message(
        &mut self,
        msg: ReplicationMessage,
        writer: &Writer,
        cfg: &StreamConfig,
        metrics: &Metrics,
        watermark_rx: &watch::Receiver<Lsn>,
    ) -> Result<()> {
        match msg {
            ReplicationMessage::XLogData { start, wal_end, data } => {
                self.chunker.push(start, &data, &mut self.jobs).map_err(|e| match e {
                    e @ chunker::StreamError::Diverged { .. } => anyhow::Error::new(Fatal(e.into())),
                    e => e.into(),
                })?;
                metrics.set_received(self.chunker.position().max(self.chunker.archived_from()));
                metrics.server_lsn.set(wal_end.0.max(self.chunker.position().0));
            }
            ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                metrics.server_lsn.set(wal_end.0);
                if reply_requested {
                    let w = *watermark_rx.borrow();
                    self.feedback(w).await?;
                }
            }
            ReplicationMessage::EndOfTimeline { next_timeline, next_start } => {
                self.chunker.seal(&mut self.jobs);
                for j in self.jobs.drain(..) {
                    self.job_tx.send(j).await.map_err(|_| anyhow!("uploader stopped"))?;
                }
                tracing::info!("timeline {} ended at {next_start}; following timeline {next_timeline}", self.timeline);
                archive_history(&mut self.conn, writer, next_timeline).await?;
                self.timeline = next_timeline;
                let seg = self.chunker.segment_size();
                let start = next_start.segment_start(seg);
                self.chunker = Chunker::new(
                    next_timeline,
                    start,
                    seg,
                    cfg.chunk_max_bytes,
                    cfg.zstd_level,
                    vec![],
                    self.chunker.next_seq(),
                );
                self.conn.start_replication(&cfg.slot, start, next_timeline).await?;
                metrics.timeline.set(next_timeline.0 as u64);
            }
        }
        Ok(())
    }
}

/// Where to start streaming: `(timeline, lsn)`. See the module doc, step 4.
fn choose_start(
    catalog: &WalCatalog,
    server: &Server,
    history: &TimelineHistory,
    restart: Lsn,
    restart_tli: Option<TimelineId>,
) -> (TimelineId, Lsn) {
    let seg = server.segment_size;
    let mut tli = restart_tli.unwrap_or_else(|| history.timeline_of(restart, server.system.timeline));
    let mut from = restart.segment_start(seg);
    loop {
        let pos = catalog.contiguous_end(tli, from);
        // Where does `tli` end, by the server's history?
        let end = history.entries.iter().find(|e| e.parent == tli).map(|e| e.switchpoint);
        match end {
            Some(switch) if pos >= switch => {
                // Everything of this timeline is archived; continue on the next one.
                let next = history
                    .entries
                    .iter()
                    .skip_while(|e| e.parent != tli)
                    .nth(1)
                    .map(|e| e.parent)
                    .unwrap_or(server.system.timeline);
                tli = next;
                from = switch.segment_start(seg);
            }
            _ => return (tli, pos),
        }
    }
}

/// What the archive holds of `start`'s segment before `start`: each piece's range and plain
/// crc32 (to verify against the server's bytes) and the records of the chunks (so the segment's
/// metadata keeps their commit statistics and durable times). Read from the objects' headers
/// and metadata only: the agent never reads WAL content back (it may be encrypted). `None` if
/// the archive does not hold the segment's beginning contiguously.
async fn archived_prefix(
    reader: &Reader,
    listing: &WalListing,
    tli: TimelineId,
    start: Lsn,
) -> Result<Option<(Vec<ArchivedPiece>, Vec<ChunkRecord>)>> {
    let seg_start = start.segment_start(listing.catalog.segment_size);
    if seg_start == start {
        return Ok(Some((Vec::new(), Vec::new())));
    }
    let Ok(pieces) = listing.catalog.pieces_for(tli, seg_start, start) else { return Ok(None) };
    let mut archived = Vec::new();
    let mut records = Vec::new();
    for p in pieces {
        let kind = if p.whole_segment { Kind::WalSegment } else { Kind::WalChunk };
        let (h, meta) = reader.read_meta(&p.key, kind).await?;
        if h.plain_len != p.end.0 - p.start.0 {
            bail!("object {} holds {} bytes, not what its name says", p.key, h.plain_len);
        }
        let m: WalObjectMeta = env::metadata_as(&p.key, &meta)?;
        records.extend(listing.records_of(&p.key, tli, p.start, p.end, &m));
        archived.push(ArchivedPiece { start: p.start, end: p.end, crc: h.plain_crc });
    }
    Ok(Some((archived, records)))
}

/// Archive the history files of `tli` and its ancestors; returns `tli`'s history.
async fn archive_histories(conn: &mut Connection, writer: &Writer, tli: TimelineId) -> Result<TimelineHistory> {
    if tli.0 <= 1 {
        return Ok(TimelineHistory::default());
    }
    let history = archive_history(conn, writer, tli).await?;
    for e in &history.entries {
        if e.parent.0 > 1 {
            archive_history(conn, writer, e.parent).await?;
        }
    }
    Ok(history)
}

async fn archive_history(conn: &mut Connection, writer: &Writer, tli: TimelineId) -> Result<TimelineHistory> {
    let (name, content) = conn.timeline_history(tli).await?;
    let text = std::str::from_utf8(&content).with_context(|| format!("history file {name} is not UTF-8"))?;
    let history = TimelineHistory::parse(text).with_context(|| format!("parse {name}"))?;
    let key = names::history(tli);
    let meta = serde_json::json!({ "timeline": tli, "file_name": name });
    let object = writer.encode(&key, ObjectKind::History, &meta, &content, Compression::None, 0);
    writer.put_once(&key, object, &content).await.map_err(|e| archive_err(e.into()))?;
    Ok(history)
}
