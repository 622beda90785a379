//! `walvault-recover wal-fetch WALFILE DEST`: PostgreSQL's `restore_command`.
//!
//! * `TTTTTTTT.history`: the archived history file.
//! * a segment: its whole-segment object if there is one; otherwise the segment is assembled
//!   from its chunks, contiguous from the segment's first byte, and padded with zeros to the
//!   segment size (PostgreSQL reads zeros as the end of WAL, which is exactly where the archive
//!   ends).
//! * The file is written to a temporary name beside DEST, fsynced and renamed: a corrupt
//!   object (checksum mismatch) — or, with `--verify-key`, one whose signature does not
//!   verify — is never handed to PostgreSQL.
//!
//! Exit codes, chosen for what PostgreSQL does with them:
//! * 0: DEST written;
//! * 1: the archive has no such file; recovery treats this as the end of the archived WAL;
//! * 126: the file could not be fetched (archive unreachable, corrupt object, disk error).
//!   PostgreSQL treats exit codes above 125 as fatal and stops recovery, instead of taking the
//!   failure for the end of WAL and promoting early with data missing.

use std::path::Path;

use std::process::ExitCode;

use anyhow::Result;
use walvault_shared::archive::names;
use walvault_shared::archive::read::{Reader, WalListing, Want};
use walvault_shared::wal::{SegmentName, WalFileName};

use crate::cli::ArchiveArgs;

pub enum Fetched {
    Written,
    NotInArchive,
}

/// The content PostgreSQL asked for, or `None` when the archive does not have it.
pub async fn content(reader: &Reader, file: &str, segment_size: u64) -> Result<Option<Vec<u8>>> {
    match WalFileName::parse(file, segment_size)? {
        WalFileName::History(tli) => Ok(reader.read_opt(&names::history(tli), Want::HISTORY).await?.map(|d| d.content)),
        WalFileName::Partial(_) => Ok(None),
        WalFileName::Segment(seg) => segment(reader, &seg, segment_size).await,
    }
}

async fn segment(reader: &Reader, seg: &SegmentName, segment_size: u64) -> Result<Option<Vec<u8>>> {
    let key = names::segment(seg, segment_size);
    if let Some(d) = reader.read_opt(&key, Want::segment(segment_size)).await? {
        if d.content.len() as u64 != segment_size {
            anyhow::bail!("object {key} holds {} bytes, not a whole segment of {segment_size}", d.content.len());
        }
        return Ok(Some(d.content));
    }
    // Chunks only: the newest, not yet complete segment (or one whose consolidation is pending).
    let objects = reader.store().list_all(&names::chunks_of(seg, segment_size)).await?;
    let listing = WalListing::new(objects, segment_size);
    let start = seg.start_lsn(segment_size);
    let end = listing.catalog.contiguous_end(seg.timeline, start);
    if end == start {
        return Ok(None);
    }
    let mut out = reader.read_wal(&listing, seg.timeline, start, end).await?.bytes;
    out.resize(segment_size as usize, 0);
    Ok(Some(out))
}

/// `wal-fetch`: serve `walfile` into `dest` (from the prefetch spool if it is there), then
/// start the prefetcher for the segments after it. Exit 0 written, 1 not in the archive.
pub async fn run(
    reader: &Reader,
    archive: &ArchiveArgs,
    prefetch: u32,
    walfile: &str,
    dest: &Path,
) -> Result<ExitCode> {
    let spool = spool_dir(dest);
    let id = walvault_shared::archive::identity::load_existing(reader).await?;
    let seg = SegmentName::parse(walfile, id.wal_segment_size).ok();
    let fetched = if seg.is_some() && take_from_spool(&spool, walfile, dest) {
        Fetched::Written
    } else {
        fetch(reader, walfile, dest, id.wal_segment_size).await?
    };
    match fetched {
        Fetched::Written => {
            if let (Some(seg), true) = (seg, prefetch > 0) {
                prune_spool(&spool, &seg, id.wal_segment_size);
                spawn_prefetcher(archive, &spool, walfile, prefetch);
            }
            Ok(ExitCode::SUCCESS)
        }
        Fetched::NotInArchive => Ok(ExitCode::from(1)),
    }
}

/// The hidden `wal-prefetch` subcommand.
pub async fn run_prefetch(reader: &Reader, spool: &Path, count: u32, after: &str) -> Result<u32> {
    let id = walvault_shared::archive::identity::load_existing(reader).await?;
    let seg = SegmentName::parse(after, id.wal_segment_size)?;
    prefetch(reader, spool, &seg, count, id.wal_segment_size).await
}

/// Start the background prefetcher, detached: PostgreSQL waits only for this process.
fn spawn_prefetcher(archive: &ArchiveArgs, spool: &Path, after: &str, count: u32) {
    use std::os::unix::process::CommandExt;
    let (Ok(exe), Ok(args)) = (std::env::current_exe(), archive.args()) else { return };
    let mut c = std::process::Command::new(exe);
    c.arg("wal-prefetch").args(args);
    c.arg("--spool").arg(spool).arg("--count").arg(count.to_string()).arg(after);
    c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: setsid in the child before exec; it only detaches from our session.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let _ = c.spawn();
}

pub async fn fetch(reader: &Reader, file: &str, dest: &Path, segment_size: u64) -> Result<Fetched> {
    match content(reader, file, segment_size).await? {
        None => Ok(Fetched::NotInArchive),
        Some(c) => {
            walvault_shared::fsutil::write_atomically(dest, &c, 0o600)?;
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
    reader: &Reader,
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
        (name, reader.read_opt(&key, Want::segment(segment_size)).await)
    }))
    .await;
    let mut n = 0;
    for (name, r) in fetches {
        match r {
            Ok(Some(d)) if d.content.len() as u64 == segment_size => {
                walvault_shared::fsutil::write_atomically(&spool.join(&name), &d.content, 0o600)?;
                n += 1;
            }
            // Not (yet) a whole segment, or unreadable: PostgreSQL will ask wal-fetch for it
            // directly, which reports errors properly.
            _ => break,
        }
    }
    Ok(n)
}
