//! Reading the archive back: the one layer every reader goes through (agent resume, `list`,
//! `restore`, `wal-fetch`, `audit`, `verify`).
//!
//! [`Reader`] fetches an object with a bound on its size chosen by its kind ([`limits`]),
//! checks the envelope (checksums, and with a verify key the signature, before any byte is
//! used), decrypts it (unwrapping its epoch key with the reader's age identity, once per
//! epoch) and decompresses it with the same bound. A reader given an identity refuses a
//! confidential object stored in clear: in an encrypted archive only someone without the keys
//! writes those. On top of that it knows the archive's
//! vocabulary: the identity, the WAL catalogue from one listing, WAL byte ranges assembled from
//! chunks and segments together with their chunk records, and commit statistics.
//!
//! Bounds exist because the archive is not trusted to be well-formed: a forged object that
//! claims 4 GiB of content must cost a reader an error, not 4 GiB of memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};

use super::crypt::{EpochKey, Identities};
use super::envelope::{self, Decoded, Expect, Header, ObjectKind};
use super::names::{self, ArchiveKey};
use super::sign::VerifyKeys;
use super::walcat::{ChunkRecord, CommitStats, WalCatalog, WalObjectMeta};
use super::write::KeyMeta;
use crate::lsn::{Lsn, TimelineId};
use crate::storage::{ObjectMeta, ObjectStore, StorageError};

/// The largest plain content a reader accepts for each kind of object. Writers never come
/// close: they are bounds against forged objects, not formats.
pub mod limits {
    /// `walvault.repository`: metadata only.
    pub const IDENTITY: u64 = 1 << 20;
    /// A timeline history file (a line per timeline switch).
    pub const HISTORY: u64 = 1 << 20;
    /// `backup.json`, `backup.lock`: metadata only.
    pub const DESCRIPTION: u64 = 1 << 20;
    /// A commit index object (a day of 1-second chunks is ~20 MiB).
    pub const INDEX: u64 = 256 << 20;
    /// An epoch key object: an age file holding 48 bytes, a stanza per recipient.
    pub const KEY: u64 = 1 << 20;
    /// A backup manifest, before the description's own `manifest_bytes` narrows it.
    pub const MANIFEST: u64 = 1 << 30;
    /// A backup part, before the description's own `plain_len` narrows it; the agent refuses
    /// part sizes above this.
    pub const PART: u64 = 1 << 30;
    /// Bytes read for an object's header and metadata alone (metadata of a consolidated
    /// segment lists its chunks: a few hundred bytes each).
    pub const HEADER_READ: u64 = 4 << 20;
}

/// What a reader wants from one object.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub kind: ObjectKind,
    pub max_plain: u64,
    pub what: &'static str,
}

impl Want {
    pub const IDENTITY: Want =
        Want { kind: ObjectKind::Identity, max_plain: limits::IDENTITY, what: "repository identity" };
    pub const HISTORY: Want = Want { kind: ObjectKind::History, max_plain: limits::HISTORY, what: "timeline history" };
    pub const DESCRIPTION: Want =
        Want { kind: ObjectKind::Metadata, max_plain: limits::DESCRIPTION, what: "backup description" };
    pub const INDEX: Want = Want { kind: ObjectKind::Metadata, max_plain: limits::INDEX, what: "commit index" };
    pub const KEY: Want = Want { kind: ObjectKind::Key, max_plain: limits::KEY, what: "epoch key" };

    pub fn segment(segment_size: u64) -> Want {
        Want { kind: ObjectKind::WalSegment, max_plain: segment_size, what: "WAL segment" }
    }
    pub fn chunk(segment_size: u64) -> Want {
        Want { kind: ObjectKind::WalChunk, max_plain: segment_size, what: "WAL chunk" }
    }
    pub fn manifest(recorded: u64) -> Want {
        Want { kind: ObjectKind::Metadata, max_plain: recorded.min(limits::MANIFEST), what: "backup manifest" }
    }
    pub fn part(recorded: u64) -> Want {
        Want { kind: ObjectKind::BackupPart, max_plain: recorded.min(limits::PART), what: "backup part" }
    }
}

/// Reads archive objects, bounded and checked. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Reader {
    store: Arc<dyn ObjectStore>,
    verify: Option<Arc<VerifyKeys>>,
    identities: Option<Arc<Identities>>,
    /// Epoch keys unwrapped so far.
    epochs: Arc<tokio::sync::Mutex<BTreeMap<[u8; 16], Arc<EpochKey>>>>,
}

impl Reader {
    /// `verify`: the key every object's signature must verify with (never taken from the
    /// archive); `None` checks integrity only.
    pub fn new(store: Arc<dyn ObjectStore>, verify: Option<VerifyKeys>) -> Self {
        Reader { store, verify: verify.map(Arc::new), identities: None, epochs: Default::default() }
    }

    /// Decrypt with these age identities (or passphrase); confidential objects in clear are
    /// then refused.
    pub fn with_identities(mut self, identities: Option<Identities>) -> Self {
        self.identities = identities.map(Arc::new);
        self
    }

    pub fn has_identities(&self) -> bool {
        self.identities.is_some()
    }

    /// The epoch key with id `epoch`, unwrapped once with the reader's identities.
    pub async fn epoch_key(&self, epoch: &[u8; 16]) -> Result<Arc<EpochKey>> {
        let mut cache = self.epochs.lock().await;
        if let Some(k) = cache.get(epoch) {
            return Ok(k.clone());
        }
        let id = hex::encode(epoch);
        let key = names::epoch_key(&id);
        let Some(ids) = &self.identities else {
            bail!("the archive is encrypted (epoch key {id}), and no key to read it was given\nHINT: pass the age identity the archive is encrypted to (--identity FILE) or its passphrase (--passphrase-file FILE)");
        };
        // Key objects are read without a signature check: a forged one can only hold a key
        // the forger chose, and every object it would decrypt must still carry a valid
        // signature (with --verify-key) and authenticate under it.
        let raw = match self.store.get_bounded(&key, envelope::max_stored_len(limits::KEY)).await {
            Ok(raw) => raw,
            Err(e) if e.is_not_found() => bail!("epoch key object {key} is missing\nHINT: the objects of that epoch cannot be decrypted; was the keys/ prefix deleted?"),
            Err(e) => return Err(e.into()),
        };
        let want = Want::KEY;
        let d = envelope::decode(
            &key,
            &raw,
            &Expect { kind: Some(want.kind), max_plain: want.max_plain, what: want.what, verify: None, epoch: None },
        )?;
        let meta: KeyMeta = d.metadata_as(&key)?;
        let Some(k) = ids.unwrap(&d.content)? else {
            bail!(
                "the identity given cannot unwrap epoch key {id}: it is wrapped to {}{}\nHINT: give the identity (or passphrase) of one of those recipients; after a rekey, the new one",
                meta.recipients.join(", "),
                ids.fingerprints().map(|f| format!(" (yours: {})", f.join(", "))).unwrap_or_default()
            );
        };
        if k.id != *epoch {
            bail!("epoch key object {key} holds the key of another epoch ({}); refusing it", k.id_hex());
        }
        let k = Arc::new(k);
        cache.insert(*epoch, k.clone());
        Ok(k)
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn url(&self) -> String {
        self.store.url()
    }

    pub fn verify_keys(&self) -> Option<&VerifyKeys> {
        self.verify.as_deref()
    }

    fn expect(&self, want: Want) -> Expect<'_> {
        Expect {
            kind: Some(want.kind),
            max_plain: want.max_plain,
            what: want.what,
            verify: self.verify.as_deref(),
            epoch: None,
        }
    }

    /// The whole object, checked; a missing object is an error.
    pub async fn read(&self, key: &str, want: Want) -> Result<Decoded> {
        self.read_opt(key, want).await?.ok_or_else(|| StorageError::NotFound { op: "get", key: key.to_string() }.into())
    }

    /// The whole object, checked, or `None` when it does not exist.
    pub async fn read_opt(&self, key: &str, want: Want) -> Result<Option<Decoded>> {
        let raw = match self.store.get_bounded(key, envelope::max_stored_len(want.max_plain)).await {
            Ok(raw) => raw,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Which epoch key, if the object is encrypted (the header is checked here, and again by
        // the full decode).
        let (h, _) = envelope::decode_header(key, &raw, self.verify.as_deref())?;
        let epoch = match &h.encryption_block {
            Some(b) => Some(self.epoch_key(&b.epoch).await?),
            None if self.identities.is_some() && names::is_confidential(key) => {
                return Err(envelope::EnvelopeError::NotEncrypted { key: key.to_string() }.into());
            }
            None => None,
        };
        let key = key.to_string();
        let verify = self.verify.clone();
        // Checksums, decryption and decompression are CPU work: off the async threads for big
        // objects.
        let decode = move || {
            let e = Expect {
                kind: Some(want.kind),
                max_plain: want.max_plain,
                what: want.what,
                verify: verify.as_deref(),
                epoch: epoch.as_deref(),
            };
            envelope::decode(&key, &raw, &e)
        };
        let d = if want.max_plain > (1 << 20) {
            tokio::task::spawn_blocking(decode).await.context("decode task")??
        } else {
            decode()?
        };
        Ok(Some(d))
    }

    /// An object's header and metadata only (one ranged read), checked and, with a verify key,
    /// authenticated; its payload is not read.
    pub async fn read_meta(&self, key: &str, kind: ObjectKind) -> Result<(Header, Vec<u8>)> {
        let raw = self.store.get_range(key, 0..limits::HEADER_READ).await?;
        let (h, meta) = envelope::decode_header(key, &raw, self.verify.as_deref())?;
        if h.kind != kind {
            return Err(
                envelope::EnvelopeError::WrongKind { key: key.to_string(), expected: kind, found: h.kind }.into()
            );
        }
        Ok((h, meta.to_vec()))
    }

    /// Only to check the expectation machinery in tests.
    #[doc(hidden)]
    pub fn expectation(&self, want: Want) -> Expect<'_> {
        self.expect(want)
    }

    /// A timeline's history file (decoded), or `None`.
    pub async fn history(&self, tli: TimelineId) -> Result<Option<crate::wal::TimelineHistory>> {
        let key = names::history(tli);
        let Some(d) = self.read_opt(&key, Want::HISTORY).await? else { return Ok(None) };
        let text = std::str::from_utf8(&d.content).with_context(|| format!("history object {key} is not UTF-8"))?;
        Ok(Some(crate::wal::TimelineHistory::parse(text).with_context(|| format!("parse {key}"))?))
    }

    /// List `wal/` once and catalogue it.
    pub async fn wal_listing(&self, segment_size: u64) -> Result<WalListing> {
        let objects = self.store.list_all(names::WAL_PREFIX).await?;
        Ok(WalListing::new(objects, segment_size))
    }

    /// WAL bytes `[from, to)` of `tli`, assembled from the objects that hold them (each read
    /// whole, bounded and checked), with the records of the objects read (range, sealed and
    /// durable time, commit statistics). Fails naming the first missing LSN or a short object.
    pub async fn read_wal(&self, listing: &WalListing, tli: TimelineId, from: Lsn, to: Lsn) -> Result<WalRange> {
        let cat = &listing.catalog;
        let seg = cat.segment_size;
        let pieces = cat
            .pieces_for(tli, from, to)
            .map_err(|at| anyhow::anyhow!("the archive has no WAL at {at} on timeline {tli}"))?;
        let mut bytes = Vec::with_capacity(to.0.saturating_sub(from.0) as usize);
        let mut records = Vec::new();
        let mut pos = from;
        // A chunk listed but gone when read was consolidated meanwhile: its segment holds the
        // bytes (read once, then sliced for every chunk of it).
        let mut segments: BTreeMap<String, Decoded> = BTreeMap::new();
        for p in pieces {
            let want = if p.whole_segment { Want::segment(seg) } else { Want::chunk(seg) };
            let (key, own, base) = match self.read(&p.key, want).await {
                Ok(d) => (p.key.clone(), Some(d), p.start),
                Err(e) if !p.whole_segment && is_not_found(&e) => {
                    let name = crate::wal::SegmentName::containing(tli, p.start, seg);
                    let whole = names::segment(&name, seg);
                    if !segments.contains_key(&whole) {
                        let d = self.read(&whole, Want::segment(seg)).await.with_context(|| {
                            format!("{} vanished while being read, and its segment cannot be read either", p.key)
                        })?;
                        segments.insert(whole.clone(), d);
                    }
                    (whole, None, name.start_lsn(seg))
                }
                Err(e) => return Err(e),
            };
            let d = match &own {
                Some(d) => d,
                None => &segments[&key],
            };
            let meta: WalObjectMeta = d.metadata_as(&key)?;
            let (rs, re) = if key == p.key { (p.start, p.end) } else { (base, Lsn(base.0 + seg)) };
            records.extend(
                listing
                    .records_of(&key, tli, rs, re, &meta)
                    .into_iter()
                    .filter(|r| r.end_lsn > p.start && r.start_lsn < p.end),
            );
            let a = (pos.0 - base.0) as usize;
            let b = (p.end.min(to).0 - base.0) as usize;
            let whole_len_wrong = (p.whole_segment || key != p.key) && d.content.len() as u64 != seg;
            if d.content.len() < b || whole_len_wrong {
                bail!("object {} holds {} bytes, not what its name says", key, d.content.len());
            }
            bytes.extend_from_slice(&d.content[a..b]);
            pos = p.end.min(to);
        }
        sort_dedup(&mut records);
        Ok(WalRange { bytes, records })
    }

    /// Every archived chunk's record (range, commit statistics, durable time): the commit index
    /// first, then the metadata of the objects it does not cover yet (one ranged read each),
    /// then, for objects written without commit statistics, their WAL itself. Returns the
    /// records (sorted, deduplicated) and how many objects were read.
    pub async fn chunk_records(&self, listing: &WalListing) -> Result<(Vec<ChunkRecord>, usize)> {
        let (mut records, mut objects_read) = super::index::load_all(self).await?;
        let indexed: std::collections::BTreeSet<(TimelineId, Lsn, Lsn)> =
            records.iter().map(|r| (r.timeline, r.start_lsn, r.end_lsn)).collect();
        let covered =
            |tli: TimelineId, s: Lsn, e: Lsn| indexed.range((tli, s, Lsn(0))..(tli, e, Lsn(0))).next().is_some();
        let seg = listing.catalog.segment_size;
        let mut segments_read = std::collections::BTreeSet::new();
        for o in &listing.objects {
            let Some(k) = names::parse(&o.key, seg) else { continue };
            let (tli, s, e, kind) = match k {
                ArchiveKey::Segment(sg) => {
                    (sg.timeline, sg.start_lsn(seg), Lsn(sg.start_lsn(seg).0 + seg), ObjectKind::WalSegment)
                }
                ArchiveKey::Chunk { segment, start, end } => (segment.timeline, start, end, ObjectKind::WalChunk),
                _ => continue,
            };
            if covered(tli, s, e) {
                continue;
            }
            let (key, kind, s, e) = match self.read_meta(&o.key, kind).await {
                Ok((_, meta)) => {
                    objects_read += 1;
                    let m: WalObjectMeta = envelope::metadata_as(&o.key, &meta)?;
                    records.extend(listing.records_of(&o.key, tli, s, e, &m));
                    continue;
                }
                // Consolidated between the listing and this read: the segment's metadata
                // holds the chunk's record (read once for all its chunks).
                Err(err) if kind == ObjectKind::WalChunk && is_not_found(&err) => {
                    let name = crate::wal::SegmentName::containing(tli, s, seg);
                    let start = name.start_lsn(seg);
                    (names::segment(&name, seg), ObjectKind::WalSegment, start, Lsn(start.0 + seg))
                }
                Err(err) => return Err(err),
            };
            if !segments_read.insert(key.clone()) {
                continue;
            }
            let (_, meta) = self.read_meta(&key, kind).await.with_context(|| {
                format!("{} vanished while being read, and its segment cannot be read either", o.key)
            })?;
            objects_read += 1;
            let m: WalObjectMeta = envelope::metadata_as(&key, &meta)?;
            records.extend(listing.records_of(&key, tli, s, e, &m));
        }
        objects_read += self.rebuild_missing_commit_stats(listing, &mut records).await?;
        sort_dedup(&mut records);
        Ok((records, objects_read))
    }

    /// Records without commit statistics (objects written by an older agent, or by a session
    /// that could not parse its WAL): read their WAL from the segment's start and count the
    /// commits ending inside each record's range. One read per object involved.
    async fn rebuild_missing_commit_stats(&self, listing: &WalListing, records: &mut [ChunkRecord]) -> Result<usize> {
        if records.iter().all(|r| r.commits.is_some()) {
            return Ok(0);
        }
        let cat = &listing.catalog;
        let seg = cat.segment_size;
        let mut reads = 0;
        let mut cache: BTreeMap<(TimelineId, Lsn), Vec<u8>> = BTreeMap::new();
        for r in records.iter_mut().filter(|r| r.commits.is_none()) {
            let start = r.start_lsn.segment_start(seg);
            if let std::collections::btree_map::Entry::Vacant(slot) = cache.entry((r.timeline, start)) {
                let end = cat.contiguous_end(r.timeline, start).min(Lsn(start.0 + seg));
                reads += cat.pieces_for(r.timeline, start, end).map(|p| p.len()).unwrap_or(0);
                let Ok(w) = self.read_wal(listing, r.timeline, start, end).await else { continue };
                slot.insert(w.bytes);
            }
            let bytes = &cache[&(r.timeline, start)];
            let upto = (r.end_lsn.0 - start.0) as usize;
            if upto > bytes.len() {
                continue; // not held contiguously from the segment start
            }
            r.commits = Some(commit_stats(&bytes[..upto], start, seg, r.start_lsn, r.end_lsn));
        }
        Ok(reads)
    }
}

/// Commit statistics of the commits whose records end in `(from, to]`, from WAL `bytes` that
/// start at the segment start `seg_start`.
pub fn commit_stats(bytes: &[u8], seg_start: Lsn, segment_size: u64, from: Lsn, to: Lsn) -> CommitStats {
    let mut stats = CommitStats::recording_restore_points();
    let mut reader = crate::walreader::WalReader::new(seg_start, segment_size);
    for e in reader.feed(bytes) {
        if e.end > from && e.end <= to {
            match &e.kind {
                _ if e.is_commit() => stats.add(e.time()),
                crate::walreader::EventKind::RestorePoint(n) => stats.add_restore_point(n.clone(), e.lsn, e.time()),
                _ => {}
            }
        }
    }
    stats
}

/// Sort by position and drop repeats (the same range recorded by the index and by a segment).
pub fn sort_dedup(records: &mut Vec<ChunkRecord>) {
    records.sort_by_key(|r| (r.timeline, r.start_lsn, r.end_lsn));
    records.dedup_by_key(|r| (r.timeline, r.start_lsn, r.end_lsn));
}

/// One listing of `wal/`: its objects (with the store's modification times) and their
/// catalogue.
#[derive(Clone, Debug)]
pub struct WalListing {
    pub objects: Vec<ObjectMeta>,
    pub catalog: WalCatalog,
    modified: BTreeMap<String, DateTime<Utc>>,
}

impl WalListing {
    pub fn new(objects: Vec<ObjectMeta>, segment_size: u64) -> Self {
        let mut catalog = WalCatalog::empty(segment_size);
        let mut modified = BTreeMap::new();
        for o in &objects {
            catalog.add_key(&o.key);
            if let Some(t) = o.last_modified {
                modified.insert(o.key.clone(), t);
            }
        }
        WalListing { objects, catalog, modified }
    }

    /// When the store acknowledged `key` (its last-modified time), if the listing says.
    pub fn modified(&self, key: &str) -> Option<DateTime<Utc>> {
        self.modified.get(key).copied()
    }

    /// The chunk records an object stands for. A consolidated segment carries its chunks'
    /// records; a chunk (or a segment written whole, without them) is one record whose durable
    /// time is when the store acknowledged it — the listing's modification time — or, failing
    /// that, when the agent sealed it (the *durable_at rule*).
    pub fn records_of(&self, key: &str, tli: TimelineId, start: Lsn, end: Lsn, m: &WalObjectMeta) -> Vec<ChunkRecord> {
        if !m.chunks.is_empty() {
            return m
                .chunks
                .iter()
                .cloned()
                .map(|mut c| {
                    c.timeline = tli;
                    c
                })
                .collect();
        }
        vec![ChunkRecord {
            timeline: tli,
            start_lsn: start,
            end_lsn: end,
            sealed_at: m.sealed_at,
            durable_at: self.modified(key).unwrap_or(m.sealed_at),
            commits: m.commits.clone(),
        }]
    }
}

/// WAL bytes read back, with the records of the objects they came from.
#[derive(Debug, Default)]
pub struct WalRange {
    pub bytes: Vec<u8>,
    pub records: Vec<ChunkRecord>,
}

/// Whether a read failed because the object does not exist (any more).
fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<StorageError>(), Some(StorageError::NotFound { .. })))
}
