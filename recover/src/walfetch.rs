//! `walvault-recover wal-fetch WALFILE DEST`: PostgreSQL's `restore_command`.
//!
//! * `TTTTTTTT.history`: the archived history file.
//! * a segment: its whole-segment object if there is one; otherwise the segment is assembled
//!   from its chunks, contiguous from the segment's first byte, and padded with zeros to the
//!   segment size (PostgreSQL reads zeros as the end of WAL, which is exactly where the archive
//!   ends).
//! * The file is written to a temporary name beside DEST and renamed: DEST appears whole or not
//!   at all, and a corrupt object (checksum mismatch) — or, with `--verify-key`, one whose
//!   signature does not verify — is never handed to PostgreSQL. DEST is not fsynced: PostgreSQL
//!   reads it as soon as the command returns and deletes it after replay, and where it keeps a
//!   restored segment (standby mode) it fsyncs it itself (`durable_rename`); after a crash,
//!   recovery asks for the file again.
//!
//! Exit codes, chosen for what PostgreSQL does with them:
//! * 0: DEST written;
//! * 1: the archive has no such file; recovery treats this as the end of the archived WAL;
//! * 126: the file could not be fetched (archive unreachable, corrupt object, disk error).
//!   PostgreSQL treats exit codes above 125 as fatal and stops recovery, instead of taking the
//!   failure for the end of WAL and promoting early with data missing.
//!
//! ## Prefetch (`--prefetch N`, default 4)
//!
//! Replay asks for one segment at a time and waits for each; fetching the next ones while it
//! replays hides the archive's latency and the decompression. Like pgBackRest's asynchronous
//! archive-get, a long-lived background process (`wal-prefetch`, started by the first
//! `wal-fetch` and again whenever none is running) keeps the N whole segments after the last
//! one PostgreSQL asked for in a spool, `pg_wal/walvault-prefetch/` beside DEST:
//!
//! * `wal-fetch` of a spooled segment writes its name into `.requested`, then renames it into
//!   DEST (in that order: the prefetcher reads `.requested` again after finding what is
//!   missing and before writing each fetched segment, so a segment just taken is not fetched
//!   back into the spool) —
//!   before opening the archive or starting an async runtime, so a spooled segment costs a
//!   process start and a rename;
//! * the prefetcher (one per spool: an exclusive `flock` on `.lock`) polls `.requested`,
//!   removes spooled segments outside the window, fetches the missing ones in order (one at a
//!   time from a local archive, two from S3), each verified like any read and written as the
//!   local store writes (fsynced, then renamed: the disk write happens here, off replay's
//!   path, and PostgreSQL's own fsync of the restored file finds it clean), and waits while the next segment is not yet a whole segment
//!   in the archive (the newest, still growing one is never prefetched: `wal-fetch` assembles it
//!   from its chunks when asked);
//! * it removes the spool and exits when recovery has ended (the data directory has neither
//!   `recovery.signal` nor `standby.signal`) or after [`IDLE_EXIT`] without a new request
//!   (replay paused at its target, or the server stopped), and exits when the spool is gone:
//!   nothing is left in `pg_wal` once replay is over.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use walvault_shared::archive::names;
use walvault_shared::archive::read::{Reader, WalListing, Want};
use walvault_shared::wal::{SegmentName, WalFileName};

use crate::cli::ArchiveArgs;

/// A prefetcher with no new request for this long removes the spool and exits (the next
/// `wal-fetch` starts another).
pub const IDLE_EXIT: Duration = Duration::from_secs(60);
/// How often an idle prefetcher looks at `.requested`.
const POLL: Duration = Duration::from_millis(10);
/// How long it waits before asking the archive again for a segment it does not hold yet.
const NOT_YET: Duration = Duration::from_millis(500);

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
    if let Some(c) = whole_segment(reader, seg, segment_size).await? {
        return Ok(Some(c));
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

/// The segment's whole-segment object, checked to hold exactly one segment.
async fn whole_segment(reader: &Reader, seg: &SegmentName, segment_size: u64) -> Result<Option<Vec<u8>>> {
    let key = names::segment(seg, segment_size);
    match reader.read_opt(&key, Want::segment(segment_size)).await? {
        Some(d) if d.content.len() as u64 != segment_size => {
            anyhow::bail!("object {key} holds {} bytes, not a whole segment of {segment_size}", d.content.len())
        }
        d => Ok(d.map(|d| d.content)),
    }
}

/// The fast path, tried before the archive is opened: serve `walfile` from the prefetch spool.
/// `Some(exit code)` when DEST was written.
pub fn serve_from_spool(archive: &ArchiveArgs, prefetch: u32, walfile: &str, dest: &Path) -> Option<ExitCode> {
    if prefetch == 0 || !looks_like_segment(walfile) {
        return None;
    }
    let spool = spool_dir(dest);
    if !take_from_spool(&spool, walfile, dest) {
        return None;
    }
    ensure_prefetcher(archive, &spool, walfile, prefetch);
    Some(ExitCode::SUCCESS)
}

/// Record the request, then move a spooled `walfile` into `dest`.
///
/// The request comes first: were the file renamed away first, a prefetcher still working from
/// the previous request would see a hole in its window and fetch `walfile` again. The prefetcher
/// keeps the requested segment itself while it is the last one asked for (see [`prune`]), so
/// the rename still finds it.
fn take_from_spool(spool: &Path, walfile: &str, dest: &Path) -> bool {
    if !spool.join(walfile).is_file() {
        return false;
    }
    request(spool, walfile);
    std::fs::rename(spool.join(walfile), dest).is_ok()
}

/// `wal-fetch` when the spool does not have the file: fetch it from the archive into `dest`,
/// then (for a segment, with prefetch on) point the prefetcher at the segments after it.
/// Exit 0 written, 1 not in the archive.
pub async fn run(
    reader: &Reader,
    archive: &ArchiveArgs,
    prefetch: u32,
    walfile: &str,
    dest: &Path,
) -> Result<ExitCode> {
    let id = walvault_shared::archive::identity::load_existing(reader).await?;
    match fetch(reader, walfile, dest, id.wal_segment_size).await? {
        Fetched::Written => {
            if prefetch > 0 && SegmentName::parse(walfile, id.wal_segment_size).is_ok() {
                let spool = spool_dir(dest);
                if std::fs::create_dir_all(&spool).is_ok() {
                    request(&spool, walfile);
                    ensure_prefetcher(archive, &spool, walfile, prefetch);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Fetched::NotInArchive => Ok(ExitCode::from(1)),
    }
}

pub async fn fetch(reader: &Reader, file: &str, dest: &Path, segment_size: u64) -> Result<Fetched> {
    match content(reader, file, segment_size).await? {
        None => Ok(Fetched::NotInArchive),
        Some(c) => {
            walvault_shared::fsutil::write_renamed(dest, &c, 0o600)?;
            Ok(Fetched::Written)
        }
    }
}

/// Prefetch spool for a `restore_command` whose destination is `dest` (`pg_wal/RECOVERYXLOG`):
/// `pg_wal/walvault-prefetch/`, inside the data directory, so a rename moves a spooled segment
/// into place without copying.
pub fn spool_dir(dest: &Path) -> PathBuf {
    dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("walvault-prefetch")
}

fn looks_like_segment(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Record the segment PostgreSQL asked for last (the prefetcher's window starts after it).
fn request(spool: &Path, walfile: &str) {
    let tmp = spool.join(".requested.tmp");
    if std::fs::write(&tmp, walfile).is_ok() {
        let _ = std::fs::rename(&tmp, spool.join(".requested"));
    }
}

/// Try to take the spool's lock without blocking; `None` when another process holds it.
fn lock_spool(spool: &Path) -> Option<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(spool.join(".lock")).ok()?;
    // SAFETY: flock on a file descriptor we own; released when it is closed.
    (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(f)
}

/// Start the background prefetcher unless one holds the spool's lock.
fn ensure_prefetcher(archive: &ArchiveArgs, spool: &Path, after: &str, count: u32) {
    match lock_spool(spool) {
        Some(probe) => drop(probe),
        None => return, // one is running; it reads `.requested`
    }
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

/// The hidden `wal-prefetch` subcommand: the long-lived prefetcher (see the module docs).
pub async fn run_prefetch(reader: &Reader, archive: &ArchiveArgs, spool: &Path, count: u32, after: &str) -> Result<()> {
    let Some(_lock) = lock_spool(spool) else { return Ok(()) }; // another prefetcher is at work
    let id = walvault_shared::archive::identity::load_existing(reader).await?;
    let size = id.wal_segment_size;
    let parallel = match walvault_shared::storage::RepoUrl::parse(&archive.archive)? {
        walvault_shared::storage::RepoUrl::Local(_) => 1,
        _ => 2,
    };
    let data_dir = spool.parent().and_then(Path::parent).map(Path::to_path_buf);
    let mut last = SegmentName::parse(after, size)?;
    let mut changed = Instant::now();
    let mut pruned = false;
    loop {
        if !spool.is_dir() {
            return Ok(());
        }
        if data_dir.as_deref().is_some_and(recovery_ended) {
            let _ = std::fs::remove_dir_all(spool);
            return Ok(());
        }
        if let Some(r) = requested(spool, size) {
            if r != last {
                (last, changed, pruned) = (r, Instant::now(), false);
            }
        }
        if changed.elapsed() > IDLE_EXIT {
            // Replay paused or stopped: the spool is a cache, not worth leaving in pg_wal.
            let _ = std::fs::remove_dir_all(spool);
            return Ok(());
        }
        if !pruned {
            prune(spool, &last, count, size);
            pruned = true;
        }
        let missing: Vec<SegmentName> = std::iter::successors(Some(last.next()), |s| Some(s.next()))
            .take(count as usize)
            .filter(|s| !spool.join(s.file_name(size)).exists())
            .collect();
        if missing.is_empty() {
            tokio::time::sleep(POLL).await;
            continue;
        }
        // wal-fetch records a request before it takes the segment from the spool: had it done
        // both since `.requested` was read above, the taken segment would look missing here.
        if requested(spool, size).is_some_and(|r| r != last) {
            continue;
        }
        let mut fetches = futures::stream::iter(missing)
            .map(|s| async move { (s, whole_segment(reader, &s, size).await) })
            .buffered(parallel);
        let mut stalled = false;
        while let Some((s, r)) = fetches.next().await {
            match r {
                // Not once PostgreSQL has asked for it (or for a later one) meanwhile.
                Ok(Some(_))
                    if requested(spool, size).is_some_and(|r| r.timeline == s.timeline && r.segno >= s.segno) => {}
                Ok(Some(content)) => {
                    walvault_shared::fsutil::write_atomically(&spool.join(s.file_name(size)), &content, 0o600)?;
                }
                // Not (yet) a whole segment, or unreadable: wait and ask again; PostgreSQL asks
                // wal-fetch for it directly meanwhile, which reports errors properly.
                _ => {
                    stalled = true;
                    break;
                }
            }
        }
        drop(fetches);
        if stalled {
            tokio::time::sleep(NOT_YET).await;
        }
    }
}

/// The segment PostgreSQL asked for last, from `.requested`.
fn requested(spool: &Path, size: u64) -> Option<SegmentName> {
    std::fs::read_to_string(spool.join(".requested")).ok().and_then(|s| SegmentName::parse(s.trim(), size).ok())
}

/// Recovery is over in this data directory: it is one (PG_VERSION) and has no signal file.
fn recovery_ended(data: &Path) -> bool {
    data.join("PG_VERSION").is_file() && !data.join("recovery.signal").exists() && !data.join("standby.signal").exists()
}

/// Remove spooled segments outside `last` and the window after it (already replayed, another
/// timeline, or too far ahead) and leftovers of interrupted writes.
fn prune(spool: &Path, last: &SegmentName, count: u32, size: u64) {
    let Ok(rd) = std::fs::read_dir(spool) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = match SegmentName::parse(&name, size) {
            Ok(s) => {
                // The last one asked for stays: wal-fetch renames it away right after asking.
                s.timeline != last.timeline || s.segno < last.segno || s.segno.0 > last.segno.0 + u64::from(count)
            }
            Err(_) => name.ends_with(".walvault-tmp"),
        };
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_shared::lsn::{SegNo, TimelineId};

    #[test]
    fn a_spooled_segment_is_moved_into_place() {
        let d = tempfile::tempdir().unwrap();
        let spool = d.path().join("walvault-prefetch");
        std::fs::create_dir_all(&spool).unwrap();
        let name = "000000010000000000000003";
        std::fs::write(spool.join(name), b"x").unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        assert_eq!(spool_dir(&dest), spool);
        assert!(!take_from_spool(&spool, "000000010000000000000004", &dest));
        assert!(take_from_spool(&spool, name, &dest));
        assert_eq!(std::fs::read(&dest).unwrap(), b"x");
        assert!(!spool.join(name).exists());
        assert_eq!(std::fs::read_to_string(spool.join(".requested")).unwrap(), name);
    }

    #[test]
    fn prune_keeps_only_the_window() {
        let seg = |t, n| SegmentName::new(TimelineId(t), SegNo(n)).file_name(16 << 20);
        let d = tempfile::tempdir().unwrap();
        let size = 16 << 20;
        let last = SegmentName::new(TimelineId(1), SegNo(10));
        for (tli, segno) in [(1, 9), (1, 10), (1, 11), (1, 14), (1, 15), (2, 11)] {
            std::fs::write(d.path().join(SegmentName::new(TimelineId(tli), SegNo(segno)).file_name(size)), b"")
                .unwrap();
        }
        std::fs::write(d.path().join(".x.walvault-tmp"), b"").unwrap();
        std::fs::write(d.path().join(".requested"), b"").unwrap();
        prune(d.path(), &last, 4, size);
        let mut left: Vec<String> =
            std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, vec![".requested".to_string(), seg(1, 10), seg(1, 11), seg(1, 14)]);
    }
}
