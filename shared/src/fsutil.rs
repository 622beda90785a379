//! Crash-safe file writes: a file appears whole under its name or not at all.
//!
//! [`write_new`] writes and fsyncs a new file (never over an existing one); [`write_atomically`]
//! does that under a temporary name beside the destination, renames it into place and fsyncs
//! the directory, so a crash leaves the old file, the new one, or at worst a stray temporary
//! file — never a torn one. The local object store writes this way. [`write_renamed`] only
//! renames (no fsync), for a file a crash makes its reader ask for again (`wal-fetch`'s output).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Create `path` (it must not exist) with `mode`, write `data`, fsync.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// fsync a directory, so that a rename or link inside it survives a crash.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `dest` atomically: `.<name>.walvault-tmp` beside it, fsync, rename, fsync
/// the directory. The temporary file is removed if anything fails.
pub fn write_atomically(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(dest, data, mode, true)
}

/// Write `data` to `dest` under `.<name>.walvault-tmp` and rename it into place, without any
/// fsync: readers see the old file or the whole new one, but a crash may leave either torn.
/// For a file whose reader asks for it again after a crash (`wal-fetch`'s output).
pub fn write_renamed(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(dest, data, mode, false)
}

fn write_via_temp(dest: &Path, data: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.walvault-tmp"));
    let _ = std::fs::remove_file(&tmp); // a leftover of an interrupted earlier write
    let written = if sync {
        write_new(&tmp, data, mode)
    } else {
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).and_then(|mut f| f.write_all(data))
    };
    let r =
        written.and_then(|()| std::fs::rename(&tmp, dest)).and_then(|()| if sync { fsync_dir(dir) } else { Ok(()) });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Remove the tree at `root` like `remove_dir_all`, unlinking its files from `threads` threads:
/// removing a restored data directory is dominated by freeing the page cache of its large
/// relation files, which several cores do faster than one.
pub fn remove_tree_parallel(root: &Path, threads: usize) -> io::Result<()> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        for e in std::fs::read_dir(&dirs[i])? {
            let e = e?;
            if e.file_type()?.is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
        i += 1;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(f) = files.get(k) else { break };
                let _ = std::fs::remove_file(f);
            });
        }
    });
    // What is left (directories, and anything that appeared meanwhile), deepest first.
    std::fs::remove_dir_all(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomically(&p, b"one", 0o600).unwrap();
        write_atomically(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        write_renamed(&p, b"three", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert!(write_new(&p, b"x", 0o600).is_err(), "never over an existing file");
    }

    #[test]
    fn removes_a_whole_tree() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        for (i, p) in ["f", "a/g", "a/b/h", "a/b/i"].iter().enumerate() {
            std::fs::write(root.join(p), vec![0u8; i * 1000]).unwrap();
        }
        std::os::unix::fs::symlink("/nonexistent", root.join("a/link")).unwrap();
        remove_tree_parallel(&root, 3).unwrap();
        assert!(!root.exists());
        assert!(remove_tree_parallel(&root, 3).is_err(), "a missing tree is an error, as remove_dir_all");
    }
}
