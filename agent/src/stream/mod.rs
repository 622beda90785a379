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
//! the only state carried over. Split brain, another cluster's archive, and a refused password
//! stop the agent.
//!
//! Memory bound: one segment (the segment being assembled) + `(queue_depth + concurrency) ×
//! chunk_max_bytes` (sealed chunks waiting or uploading) + one segment per consolidation in
//! flight. With the defaults and 16 MiB segments: 16 + (8 + 4) × 8 + 16 ≈ 130 MiB at most,
//! whatever the WAL rate; when the archive is slower than WAL, the receiver stops reading and
//! PostgreSQL (through the slot) holds the rest.

pub mod chunker;
pub mod uploader;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use walvault_shared::archive::envelope::{self, Compression, ObjectKind};
use walvault_shared::archive::identity::{self, Identity};
use walvault_shared::archive::walcat::{ChunkRecord, WalCatalog};
use walvault_shared::archive::{names, put_once};
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::storage::ObjectStore;
use walvault_shared::wal::TimelineHistory;

use crate::metrics::Metrics;
use crate::replication::conninfo::ConnParams;
use crate::replication::{Connection, PgError, ReplicationMessage};
use chunker::{Chunker, Job};
use uploader::{FatalUpload, UploadConfig};

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
    pub zstd_level: i32,
    pub reconnect_max_delay: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            slot: "walvault".into(),
            create_slot: true,
            chunk_interval: Duration::from_secs(1),
            chunk_max_bytes: 8 << 20,
            queue_depth: 8,
            upload_concurrency: 4,
            upload_timeout: Duration::from_secs(60),
            status_interval: Duration::from_secs(10),
            zstd_level: 1,
            reconnect_max_delay: Duration::from_secs(30),
        }
    }
}

/// An error after which reconnecting cannot help.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct Fatal(pub anyhow::Error);

fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<Fatal>().is_some()
            || c.downcast_ref::<FatalUpload>().is_some()
            || c.downcast_ref::<PgError>().is_some_and(PgError::is_auth_failure)
    })
}

/// Stream until `shutdown` turns true. Reconnects on failure; returns an error only for fatal
/// failures, or when the very first connection cannot be made (a misconfiguration should fail
/// fast, not retry forever in silence).
pub async fn run(
    params: ConnParams,
    store: Arc<dyn ObjectStore>,
    cfg: StreamConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut attempt = 0u32;
    let mut ever_streamed = false;
    loop {
        let r = session(&params, &store, &cfg, &metrics, &mut shutdown, &mut ever_streamed).await;
        metrics.up.set(0);
        match r {
            Ok(()) => return Ok(()),
            Err(e) if is_fatal(&e) || !ever_streamed => return Err(e),
            Err(e) => {
                attempt += 1;
                metrics.reconnects.inc();
                metrics.set_error(format!("{e:#}"));
                let delay =
                    (Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(10))).min(cfg.reconnect_max_delay);
                tracing::warn!(
                    "replication session ended: {e:#}; reconnecting in {delay:?} (WAL not yet archived stays in the slot)"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
        }
    }
}

/// Server facts a session needs.
struct Server {
    system: crate::replication::SystemInfo,
    segment_size: u64,
    history: TimelineHistory,
}

async fn session(
    params: &ConnParams,
    store: &Arc<dyn ObjectStore>,
    cfg: &StreamConfig,
    metrics: &Arc<Metrics>,
    shutdown: &mut watch::Receiver<bool>,
    ever_streamed: &mut bool,
) -> Result<()> {
    let mut conn = Connection::connect(params).await?;
    tracing::info!(host = %conn.host, port = conn.port, "connected for replication");
    let system = conn.identify_system().await?;
    let segment_size = conn.wal_segment_size().await?;
    let version = conn.server_version_num().await?;
    if version < 150000 {
        return Err(Fatal(anyhow!(
            "PostgreSQL {}.{} is not supported: walvault needs PostgreSQL 15 or later (READ_REPLICATION_SLOT)",
            version / 10000,
            version % 10000 / 100
        ))
        .into());
    }
    let ours = Identity::new(system.system_identifier, version / 10000, segment_size);
    // Another cluster's archive is final; a store that is down is retried like any outage.
    identity::ensure(&**store, &ours).await.map_err(|e| {
        if e.downcast_ref::<identity::Mismatch>().is_some() {
            anyhow::Error::new(Fatal(e))
        } else {
            e.context("check the archive's identity")
        }
    })?;
    metrics.system_identifier.set(system.system_identifier);
    metrics.segment_size.set(segment_size);

    if cfg.create_slot && conn.create_physical_slot(&cfg.slot).await? {
        tracing::info!(slot = %cfg.slot, "created physical replication slot");
    }
    let slot = conn.read_slot(&cfg.slot).await?.ok_or_else(|| {
        Fatal(anyhow!(
            "replication slot {:?} does not exist\nHINT: let the agent create it (drop --no-create-slot), or create it with \
             SELECT pg_create_physical_replication_slot('{}', true)",
            cfg.slot,
            cfg.slot
        ))
    })?;

    let history = archive_histories(&mut conn, &**store, system.timeline).await?;
    let server = Server { system, segment_size, history };
    let restart = slot.restart_lsn.unwrap_or(server.system.xlogpos);

    let catalog = WalCatalog::load(&**store, segment_size).await?;
    let redundant = catalog.redundant_chunks();
    if !redundant.is_empty() {
        tracing::info!("removing {} chunks already consolidated into segments", redundant.len());
        store.delete(&redundant).await?;
    }
    let (mut tli, frontier) = choose_start(&catalog, &server, restart, slot.restart_timeline);
    let (mut start, verify, inherited) = match load_prefix(&**store, &catalog, tli, frontier).await? {
        Some((prefix, records)) => (frontier.segment_start(segment_size), prefix, records),
        None => (frontier, Bytes::new(), Vec::new()),
    };
    tracing::info!(
        system_identifier = server.system.system_identifier,
        server_timeline = server.system.timeline.0,
        slot_restart_lsn = %restart,
        archived_up_to = %frontier,
        "starting replication at {start} on timeline {tli}"
    );

    let upload_cfg = UploadConfig {
        concurrency: cfg.upload_concurrency.max(1),
        upload_timeout: cfg.upload_timeout,
        zstd_level: cfg.zstd_level,
        segment_size,
    };
    let (watermark_tx, mut watermark_rx) = watch::channel(frontier);
    let (job_tx, job_rx) = mpsc::channel::<Job>(cfg.queue_depth.max(1));
    let uploader =
        tokio::spawn(uploader::run(store.clone(), upload_cfg, job_rx, 0, watermark_tx, metrics.clone(), inherited));
    metrics.archived_lsn.set(metrics.archived_lsn.get().max(frontier.0));

    let mut chunker = Chunker::new(tli, start, segment_size, cfg.chunk_max_bytes, verify, 0);
    conn.start_replication(&cfg.slot, start, tli).await?;
    *ever_streamed = true;
    metrics.up.set(1);
    metrics.timeline.set(tli.0 as u64);
    metrics.set_received(frontier);

    let mut status_tick = tokio::time::interval(cfg.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut jobs = Vec::new();
    let result: Result<bool> = async {
        loop {
            let seal_at = chunker.chunk_opened().map(|t| tokio::time::Instant::from_std(t + cfg.chunk_interval));
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return Ok(true);
                    }
                }
                _ = async { tokio::time::sleep_until(seal_at.expect("guarded")).await }, if seal_at.is_some() => {
                    chunker.seal(&mut jobs);
                }
                changed = watermark_rx.changed() => {
                    if changed.is_err() {
                        // The uploader stopped: it failed. Its error is reported below.
                        return Ok(false);
                    }
                    let w = *watermark_rx.borrow_and_update();
                    conn.send_status(chunker.position().max(w), w, w, false).await?;
                }
                _ = status_tick.tick() => {
                    let w = *watermark_rx.borrow();
                    conn.send_status(chunker.position().max(w), w, w, false).await?;
                }
                msg = conn.next_message() => match msg? {
                    ReplicationMessage::XLogData { start, wal_end, data } => {
                        chunker.push(start, &data, &mut jobs).map_err(|e| match e {
                            e @ chunker::StreamError::Diverged { .. } => anyhow::Error::new(Fatal(e.into())),
                            e => e.into(),
                        })?;
                        metrics.set_received(chunker.position().max(chunker.archived_from()));
                        metrics.server_lsn.set(wal_end.0.max(chunker.position().0));
                    }
                    ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                        metrics.server_lsn.set(wal_end.0);
                        if reply_requested {
                            let w = *watermark_rx.borrow();
                            conn.send_status(chunker.position().max(w), w, w, false).await?;
                        }
                    }
                    ReplicationMessage::EndOfTimeline { next_timeline, next_start } => {
                        chunker.seal(&mut jobs);
                        for j in jobs.drain(..) {
                            job_tx.send(j).await.map_err(|_| anyhow!("uploader stopped"))?;
                        }
                        tracing::info!("timeline {tli} ended at {next_start}; following timeline {next_timeline}");
                        archive_history(&mut conn, &**store, next_timeline).await?;
                        tli = next_timeline;
                        start = next_start.segment_start(segment_size);
                        chunker = Chunker::new(tli, start, segment_size, cfg.chunk_max_bytes, Bytes::new(), chunker.next_seq());
                        conn.start_replication(&cfg.slot, start, tli).await?;
                        metrics.timeline.set(tli.0 as u64);
                    }
                }
            }
            for j in jobs.drain(..) {
                job_tx.send(j).await.map_err(|_| anyhow!("uploader stopped"))?;
            }
        }
    }
    .await;

    // Whatever ended the stream: make what was received durable before going on.
    let shutting_down = matches!(result, Ok(true));
    chunker.seal(&mut jobs);
    for j in jobs.drain(..) {
        let _ = job_tx.send(j).await;
    }
    drop(job_tx);
    if shutting_down {
        tracing::info!("shutting down: archiving the WAL received so far");
    }
    let upload_result = uploader.await.expect("uploader task");
    let w = *watermark_rx.borrow();
    if shutting_down {
        let _ = conn.send_status(chunker.position().max(w), w, w, false).await;
        tracing::info!(archived_lsn = %w, "all received WAL is archived; last feedback sent");
        conn.close().await;
    }
    upload_result?;
    match result {
        Ok(true) => Ok(()),
        Ok(false) => bail!("uploader stopped"),
        Err(e) => Err(e),
    }
}

/// Where to start streaming: `(timeline, lsn)`. See the module doc, step 4.
fn choose_start(
    catalog: &WalCatalog,
    server: &Server,
    restart: Lsn,
    restart_tli: Option<TimelineId>,
) -> (TimelineId, Lsn) {
    let seg = server.segment_size;
    let mut tli = restart_tli.unwrap_or_else(|| server.history.timeline_of(restart, server.system.timeline));
    let mut from = restart.segment_start(seg);
    loop {
        let pos = catalog.contiguous_end(tli, from);
        // Where does `tli` end, by the server's history?
        let end = server.history.entries.iter().find(|e| e.parent == tli).map(|e| e.switchpoint);
        match end {
            Some(switch) if pos >= switch => {
                // Everything of this timeline is archived; continue on the next one.
                let next = server
                    .history
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

/// Bytes of `start`'s segment before `start`, read back from the archive, with the records of
/// the chunks they came from (so the segment's metadata keeps their commit statistics and
/// durable times). `None` if they cannot be had.
async fn load_prefix(
    store: &dyn ObjectStore,
    catalog: &WalCatalog,
    tli: TimelineId,
    start: Lsn,
) -> Result<Option<(Bytes, Vec<ChunkRecord>)>> {
    let seg_start = start.segment_start(catalog.segment_size);
    if seg_start == start {
        return Ok(Some((Bytes::new(), Vec::new())));
    }
    let Ok(pieces) = catalog.pieces_for(tli, seg_start, start) else { return Ok(None) };
    let mut out = bytes::BytesMut::new();
    let mut records = Vec::new();
    let mut pos = seg_start;
    for p in pieces {
        let raw = store.get(&p.key).await?;
        let d = envelope::decode(&p.key, &raw)?;
        if let Ok(m) = d.metadata_as::<walvault_shared::archive::walcat::WalObjectMeta>(&p.key) {
            let durable = store
                .head(&p.key)
                .await
                .ok()
                .and_then(|h| h.last_modified)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                .unwrap_or_else(|| m.sealed_at.clone());
            records.push(ChunkRecord {
                timeline: tli,
                start_lsn: p.start,
                end_lsn: p.end,
                sealed_at: m.sealed_at,
                durable_at: durable,
                commits: m.commits,
            });
        }
        let from = (pos.0 - p.start.0) as usize;
        let to = (p.end.min(start).0 - p.start.0) as usize;
        if d.content.len() < to {
            bail!("object {} is shorter than its name says", p.key);
        }
        out.extend_from_slice(&d.content[from..to]);
        pos = p.end.min(start);
    }
    Ok(Some((out.freeze(), records)))
}

/// Archive the history files of `tli` and its ancestors; returns `tli`'s history.
async fn archive_histories(conn: &mut Connection, store: &dyn ObjectStore, tli: TimelineId) -> Result<TimelineHistory> {
    if tli.0 <= 1 {
        return Ok(TimelineHistory::default());
    }
    let history = archive_history(conn, store, tli).await?;
    for e in &history.entries {
        if e.parent.0 > 1 {
            archive_history(conn, store, e.parent).await?;
        }
    }
    Ok(history)
}

async fn archive_history(conn: &mut Connection, store: &dyn ObjectStore, tli: TimelineId) -> Result<TimelineHistory> {
    let (name, content) = conn.timeline_history(tli).await?;
    let text = std::str::from_utf8(&content).with_context(|| format!("history file {name} is not UTF-8"))?;
    let history = TimelineHistory::parse(text).with_context(|| format!("parse {name}"))?;
    let key = names::history(tli);
    let meta = serde_json::json!({ "timeline": tli, "file_name": name });
    let object = envelope::encode(ObjectKind::History, &meta, &content, Compression::None, 0);
    put_once(store, &key, object.into(), &content).await.map_err(|e| match e {
        e @ walvault_shared::archive::PutOnceError::SplitBrain { .. } => anyhow::Error::new(Fatal(e.into())),
        e => e.into(),
    })?;
    Ok(history)
}
