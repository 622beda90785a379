//! `walvault-agent copy --from URL --to URL`: keep a second archive (another provider, another
//! region) an object-for-object replica of the first, restorable at every moment.
//!
//! Each pass lists both archives and copies what the copy lacks, byte for byte (names, the
//! envelope, signatures and encryption untouched; every object is checked with
//! [`envelope::check_stored`] — header, payload checksum, signed hash — before it is written,
//! and written write-once: a different object already under the name stops the copier, as
//! split brain does the agent). Order makes the copy usable at every instant:
//! 1. the identity, epoch keys and timeline history files;
//! 2. WAL (whole segments, then chunks not covered by a segment), oldest first; once a segment
//!    is in the copy its chunks there are deleted, as the agent does;
//! 3. base backups: parts and manifest, and the description (`backup.json`, which makes a
//!    backup visible) last, only once the copy holds the WAL from the backup's start to its
//!    stop: the copy never lists a backup it cannot restore;
//! 4. the commit index and drill records.
//!
//! The copier deletes nothing the source deleted: the copy keeps its own retention
//! (`--retain-full`/`--retain-days`, applied after each pass as `expire` would). It keeps no
//! state of its own: after a crash the next pass finds from the listings where it was, and an
//! object interrupted mid-write is not visible (local: rename; S3: a PUT is atomic).
//!
//! Metrics (`--listen`): `walvault_copy_lag_seconds` (since when the copy has been missing
//! something the source had: 0 right after a complete pass), objects and bytes copied, passes,
//! errors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use walvault_shared::archive::backup::{self, BackupDescription};
use walvault_shared::archive::envelope;
use walvault_shared::archive::names::{self, ArchiveKey};
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::sign::VerifyKeys;
use walvault_shared::archive::walcat::WalCatalog;
use walvault_shared::archive::write::Writer;
use walvault_shared::storage::{ObjectMeta, ObjectStore, PutMode, StorageError};

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct CopyMetrics {
    pub objects: AtomicU64,
    pub bytes: AtomicU64,
    pub passes: AtomicU64,
    pub errors: AtomicU64,
    /// Unix ms of the listing of the last complete pass: the copy held everything the source
    /// held then (the process start until a pass completes).
    pub in_step_at_ms: AtomicU64,
}

impl CopyMetrics {
    pub fn new() -> Self {
        let m = CopyMetrics::default();
        m.in_step_at_ms.store(chrono::Utc::now().timestamp_millis() as u64, Ordering::Relaxed);
        m
    }

    /// How long ago the copy last held everything the source had.
    pub fn lag_seconds(&self) -> f64 {
        let at = self.in_step_at_ms.load(Ordering::Relaxed);
        let now = chrono::Utc::now().timestamp_millis() as u64;
        now.saturating_sub(at) as f64 / 1000.0
    }

    pub fn prometheus(&self) -> String {
        use crate::metrics::Series;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        crate::metrics::expose(vec![
            Series {
                name: "copy_lag_seconds",
                help: "How long ago the copy last held every object the source had (its last complete pass).",
                counter: false,
                value: self.lag_seconds(),
            },
            Series { name: "copy_objects_total", help: "Objects copied.", counter: true, value: n(&self.objects) },
            Series { name: "copy_bytes_total", help: "Bytes copied.", counter: true, value: n(&self.bytes) },
            Series { name: "copy_passes_total", help: "Complete passes.", counter: true, value: n(&self.passes) },
            Series {
                name: "copy_errors_total",
                help: "Passes that failed (retried).",
                counter: true,
                value: n(&self.errors),
            },
        ])
    }
}

impl crate::http::Endpoint for CopyMetrics {
    fn prometheus(&self) -> String {
        CopyMetrics::prometheus(self)
    }
    fn status_json(&self) -> serde_json::Value {
        serde_json::json!({
            "lag_seconds": self.lag_seconds(),
            "objects_copied": self.objects.load(Ordering::Relaxed),
            "bytes_copied": self.bytes.load(Ordering::Relaxed),
            "passes": self.passes.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

pub struct Copier {
    pub from: Arc<dyn ObjectStore>,
    pub to: Arc<dyn ObjectStore>,
    /// Objects must carry a signature by one of these keys to be copied.
    pub verify: Option<VerifyKeys>,
    pub metrics: Arc<CopyMetrics>,
}

/// What one pass did.
#[derive(Debug, Default, serde::Serialize)]
pub struct PassReport {
    pub copied: usize,
    pub bytes: u64,
    /// Backups whose description waits for WAL the copy does not hold yet.
    pub backups_waiting: Vec<String>,
    pub chunks_removed: usize,
}

/// Upper bound of any object the archive holds (a backup part or segment plus envelope).
const MAX_OBJECT: u64 = 1 << 31;

impl Copier {
    /// Copy one object (checked) unless the copy has it.
    async fn copy_one(&self, key: &str, have: &BTreeSet<String>, report: &mut PassReport) -> Result<()> {
        if have.contains(key) {
            return Ok(());
        }
        let bytes = self.from.get_bounded(key, MAX_OBJECT).await?;
        envelope::check_stored(key, &bytes, self.verify.as_ref())
            .with_context(|| format!("the source's {key} does not check; not copied"))?;
        let len = bytes.len() as u64;
        match self.to.put(key, bytes.clone(), PutMode::IfAbsent).await {
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => {
                let there = self.to.get_bounded(key, MAX_OBJECT).await?;
                if there != bytes {
                    bail!("the copy already holds a different {key}\nHINT: the copy is another archive's, or was written by something else; give the copier an archive of its own");
                }
            }
            Err(e) => return Err(e.into()),
        }
        report.copied += 1;
        report.bytes += len;
        self.metrics.objects.fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// One pass: everything the source holds that the copy lacks, in the order of the module
    /// doc.
    pub async fn pass(&self) -> Result<PassReport> {
        let mut report = PassReport::default();
        let src: Vec<ObjectMeta> = self.from.list_all("").await?;
        let mut have: BTreeSet<String> = self.to.list_all("").await?.into_iter().map(|o| o.key).collect();
        if !src.iter().any(|o| o.key == names::IDENTITY) {
            bail!("{} holds no walvault archive (no {})", self.from.url(), names::IDENTITY);
        }
        // The segment size, from the source's identity (keys parse by it).
        let reader = Reader::new(self.from.clone(), self.verify.clone());
        let identity = walvault_shared::archive::identity::load_existing(&reader).await?;
        if have.contains(names::IDENTITY) {
            let theirs = Reader::new(self.to.clone(), None);
            let other = walvault_shared::archive::identity::load_existing(&theirs).await?;
            if other.system_identifier != identity.system_identifier {
                bail!(
                    "the copy {} belongs to another cluster (system {}, the source's is {})\nHINT: give the copier an empty archive, or that cluster's copy",
                    self.to.url(),
                    other.system_identifier,
                    identity.system_identifier
                );
            }
        }
        let seg = identity.wal_segment_size;
        let mut groups: BTreeMap<u8, Vec<&ObjectMeta>> = BTreeMap::new();
        for o in &src {
            let rank = match names::parse(&o.key, seg) {
                Some(ArchiveKey::Identity) => 0,
                Some(ArchiveKey::EpochKey { .. }) | Some(ArchiveKey::History(_)) => 1,
                Some(ArchiveKey::Segment(_)) => 2,
                Some(ArchiveKey::Chunk { .. }) => 3,
                Some(ArchiveKey::BackupPart { .. }) | Some(ArchiveKey::BackupManifest { .. }) => 4,
                Some(ArchiveKey::BackupDescription { .. }) => 5,
                Some(ArchiveKey::IndexBatch { .. })
                | Some(ArchiveKey::IndexDay { .. })
                | Some(ArchiveKey::Drill { .. }) => 6,
                // Locks of running backups, and anything not in the catalogue, stay behind.
                _ => continue,
            };
            groups.entry(rank).or_default().push(o);
        }
        for (rank, objs) in &mut groups {
            objs.sort_by(|a, b| a.key.cmp(&b.key));
            if *rank == 3 {
                // Chunks already covered by a whole segment (in the source or the copy) are
                // not copied.
                objs.retain(|o| !covered_by_segment(&o.key, seg, &src, &have));
            }
            if *rank == 5 {
                continue; // descriptions: below, once their WAL is in the copy
            }
            for o in objs.iter() {
                self.copy_one(&o.key, &have, &mut report).await?;
                have.insert(o.key.clone());
            }
            if *rank == 3 {
                report.chunks_removed += self.remove_consolidated_chunks(&mut have, seg).await?;
            }
        }
        // Chunks copied by an earlier pass whose segment arrived in this one, when the source
        // holds no chunks any more (nothing of rank 3 above).
        if !groups.contains_key(&3) {
            report.chunks_removed += self.remove_consolidated_chunks(&mut have, seg).await?;
        }
        // Descriptions: only when the copy holds the backup's parts and WAL.
        let copy_listing = Reader::new(self.to.clone(), None).wal_listing(seg).await?;
        for o in groups.get(&5).map(Vec::as_slice).unwrap_or_default() {
            let Some(ArchiveKey::BackupDescription { id }) = names::parse(&o.key, seg) else { continue };
            if have.contains(&o.key) {
                continue;
            }
            let desc = backup::read_description(&reader, &id).await?;
            if restorable_in_copy(&desc, &have, &copy_listing.catalog) {
                self.copy_one(&o.key, &have, &mut report).await?;
                have.insert(o.key.clone());
            } else {
                report.backups_waiting.push(id);
            }
        }
        Ok(report)
    }

    /// Delete the copy's chunks of segments it holds whole.
    async fn remove_consolidated_chunks(&self, have: &mut BTreeSet<String>, seg: u64) -> Result<usize> {
        let doomed: Vec<String> = have
            .iter()
            .filter(|k| match names::parse(k, seg) {
                Some(ArchiveKey::Chunk { segment, .. }) => have.contains(&names::segment(&segment, seg)),
                _ => false,
            })
            .cloned()
            .collect();
        if !doomed.is_empty() {
            self.to.delete(&doomed).await?;
            for k in &doomed {
                have.remove(k);
            }
        }
        Ok(doomed.len())
    }
}

/// Whether a chunk is covered by a whole segment in the source or the copy.
fn covered_by_segment(key: &str, seg: u64, src: &[ObjectMeta], have: &BTreeSet<String>) -> bool {
    let Some(ArchiveKey::Chunk { segment, .. }) = names::parse(key, seg) else { return false };
    let whole = names::segment(&segment, seg);
    have.contains(&whole) || src.iter().any(|o| o.key == whole)
}

/// A backup can become visible in the copy once its parts and manifest are there and the
/// copy's WAL covers its start to its stop.
fn restorable_in_copy(d: &BackupDescription, have: &BTreeSet<String>, cat: &WalCatalog) -> bool {
    let parts = d.archives.iter().flat_map(|a| &a.parts).all(|p| have.contains(&names::backup_part(&d.id, p.n)));
    parts
        && have.contains(&names::backup_manifest(&d.id))
        && cat.pieces_for(d.timeline, d.start_lsn, d.stop_lsn).is_ok()
}

/// Run passes until cancelled (or once): lag and counters in `metrics`, retention on the copy
/// after each pass.
pub async fn run(
    copier: Copier,
    interval: Duration,
    once: bool,
    retention: crate::retention::RetentionPolicy,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let writer = Writer::new(copier.to.clone(), None);
    loop {
        let started_ms = chrono::Utc::now().timestamp_millis() as u64;
        let t0 = Instant::now();
        match copier.pass().await {
            Ok(r) => {
                copier.metrics.passes.fetch_add(1, Ordering::Relaxed);
                if r.backups_waiting.is_empty() {
                    copier.metrics.in_step_at_ms.store(started_ms, Ordering::Relaxed);
                }
                tracing::info!(
                    copied = r.copied,
                    mib = r.bytes >> 20,
                    seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
                    backups_waiting = ?r.backups_waiting,
                    "copy pass complete"
                );
                if retention.is_set() {
                    let seg = {
                        let reader = Reader::new(copier.to.clone(), None);
                        walvault_shared::archive::identity::load_existing(&reader).await?.wal_segment_size
                    };
                    crate::retention::expire(&writer, seg, &retention, false).await.context("retention on the copy")?;
                }
                if once {
                    return Ok(());
                }
            }
            Err(e) => {
                copier.metrics.errors.fetch_add(1, Ordering::Relaxed);
                let fatal = format!("{e:#}");
                if once || fatal.contains("HINT") {
                    return Err(e);
                }
                tracing::warn!("copy pass failed, retrying: {fatal}");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
