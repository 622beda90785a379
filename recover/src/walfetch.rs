//! `walvault-recover wal-fetch WALFILE DEST`: PostgreSQL's `restore_command`.
//!
//! * `TTTTTTTT.history`: the archived history file.
//! * a segment: its whole-segment object if there is one; otherwise the segment is assembled
//!   from its chunks, contiguous from the segment's first byte, and padded with zeros to the
//!   segment size (PostgreSQL reads zeros as the end of WAL, which is exactly where the archive
//!   ends).
//! * The file is written to a temporary name beside DEST, fsynced and renamed: a corrupt
//!   object (checksum mismatch) is never handed to PostgreSQL.
//!
//! Exit codes, chosen for what PostgreSQL does with them:
//! * 0: DEST written;
//! * 1: the archive has no such file; recovery treats this as the end of the archived WAL;
//! * 126: the file could not be fetched (archive unreachable, corrupt object, disk error).
//!   PostgreSQL treats exit codes above 125 as fatal and stops recovery, instead of taking the
//!   failure for the end of WAL and promoting early with data missing.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use walvault_shared::archive::envelope;
use walvault_shared::archive::names;
use walvault_shared::storage::ObjectStore;
use walvault_shared::wal::{SegmentName, WalFileName};

pub enum Fetched {
    Written,
    NotInArchive,
}

/// The content PostgreSQL asked for, or `None` when the archive does not have it.
pub async fn content(store: &dyn ObjectStore, file: &str, segment_size: u64) -> Result<Option<Vec<u8>>> {
    let name = WalFileName::parse(file, segment_size)?;
    match name {
        WalFileName::History(tli) => get_decoded(store, &names::history(tli)).await,
        WalFileName::Partial(_) => Ok(None),
        WalFileName::Segment(seg) => segment(store, &seg, segment_size).await,
    }
}

async fn get_decoded(store: &dyn ObjectStore, key: &str) -> Result<Option<Vec<u8>>> {
    match store.get(key).await {
        Ok(raw) => Ok(Some(envelope::decode(key, &raw)?.content)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn segment(store: &dyn ObjectStore, seg: &SegmentName, segment_size: u64) -> Result<Option<Vec<u8>>> {
    let key = names::segment(seg, segment_size);
    if let Some(c) = get_decoded(store, &key).await? {
        if c.len() as u64 != segment_size {
            anyhow::bail!("object {key} holds {} bytes, not a whole segment of {segment_size}", c.len());
        }
        return Ok(Some(c));
    }
    // Chunks only: the newest, not yet complete segment (or one whose consolidation is pending).
    let mut cat = walvault_shared::archive::walcat::WalCatalog::empty(segment_size);
    for o in store.list_all(&format!("{key}.")).await? {
        cat.add_key(&o.key);
    }
    let start = seg.start_lsn(segment_size);
    let end = cat.contiguous_end(seg.timeline, start);
    if end == start {
        return Ok(None);
    }
    let pieces = cat.pieces_for(seg.timeline, start, end).map_err(|at| anyhow::anyhow!("chunk at {at} vanished"))?;
    let mut out = Vec::with_capacity(segment_size as usize);
    let mut pos = start;
    for p in pieces {
        let c = get_decoded(store, &p.key).await?.with_context(|| format!("chunk {} vanished while reading", p.key))?;
        let a = (pos.0 - p.start.0) as usize;
        let b = (p.end.0 - p.start.0) as usize;
        if c.len() < b {
            anyhow::bail!("object {} is shorter than its name says", p.key);
        }
        out.extend_from_slice(&c[a..b]);
        pos = p.end;
    }
    out.resize(segment_size as usize, 0);
    Ok(Some(out))
}

/// Write `data` to `dest` atomically (temp name, fsync, rename, fsync dir).
pub fn write_atomically(dest: &Path, data: &[u8]) -> Result<()> {
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.walvault-tmp", dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal")));
    let r = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(data).with_context(|| format!("write {}", tmp.display()))?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest).with_context(|| format!("rename to {}", dest.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

pub async fn fetch(store: &dyn ObjectStore, file: &str, dest: &Path, segment_size: u64) -> Result<Fetched> {
    match content(store, file, segment_size).await? {
        None => Ok(Fetched::NotInArchive),
        Some(c) => {
            write_atomically(dest, &c)?;
            Ok(Fetched::Written)
        }
    }
}
