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
    let mut out = cat.read_range(store, seg.timeline, start, end).await?;
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

/// Prefetch spool for a `restore_command` whose destination is `dest` (`pg_wal/RECOVERYXLOG`):
/// `pg_wal/walvault-prefetch/`, inside the data directory, so a rename moves a spooled segment
/// into place without copying.
pub fn spool_dir(dest: &Path) -> std::path::PathBuf {
    dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("walvault-prefetch")
}

/// Serve `file` from the spool if a prefetcher already fetched it (complete and verified: files
/// appear there only by an atomic rename after decoding).
pub fn take_from_spool(spool: &Path, file: &str, dest: &Path) -> bool {
    let p = spool.join(file);
    if p.is_file() && std::fs::rename(&p, dest).is_ok() {
        if let Some(d) = dest.parent() {
            let _ = std::fs::File::open(if d.as_os_str().is_empty() { Path::new(".") } else { d })
                .and_then(|f| f.sync_all());
        }
        return true;
    }
    false
}

/// Remove spooled segments of `after`'s timeline at or before it (already replayed), and
/// leftovers of interrupted writes.
pub fn prune_spool(spool: &Path, after: &SegmentName, segment_size: u64) {
    let Ok(rd) = std::fs::read_dir(spool) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = match SegmentName::parse(&name, segment_size) {
            Ok(s) => s.timeline == after.timeline && s.segno <= after.segno,
            Err(_) => name.ends_with(".walvault-tmp"),
        };
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The background prefetcher: fetch up to `count` whole segments after `after` into `spool`,
/// in parallel, skipping those already there; stop at the first one the archive does not hold
/// as a whole segment (the newest, still growing segment is never prefetched). One prefetcher
/// per spool at a time (an exclusive lock on `spool/.lock`).
pub async fn prefetch(
    store: &dyn ObjectStore,
    spool: &Path,
    after: &SegmentName,
    count: u32,
    segment_size: u64,
) -> Result<u32> {
    std::fs::create_dir_all(spool)?;
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(spool.join(".lock"))?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(0); // another prefetcher is at work
    }
    let mut wanted = Vec::new();
    let mut seg = *after;
    for _ in 0..count {
        seg = seg.next();
        let name = seg.file_name(segment_size);
        if !spool.join(&name).exists() {
            wanted.push((seg, name));
        }
    }
    let fetches = futures::future::join_all(wanted.into_iter().map(|(seg, name)| async move {
        let key = names::segment(&seg, segment_size);
        (name, get_decoded(store, &key).await)
    }))
    .await;
    let mut n = 0;
    for (name, r) in fetches {
        match r {
            Ok(Some(c)) if c.len() as u64 == segment_size => {
                write_atomically(&spool.join(&name), &c)?;
                n += 1;
            }
            // Not (yet) a whole segment, or unreadable: PostgreSQL will ask wal-fetch for it
            // directly, which reports errors properly.
            _ => break,
        }
    }
    Ok(n)
}
